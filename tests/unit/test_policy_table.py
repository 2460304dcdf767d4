"""The policy table (charts/nubes/files/policy.yaml) and what derives from it
cannot drift: README.md's table, the ClusterRoles the chart renders, and the
admission policies that check the table's admission verbs."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import yaml

from tests import policy_table
from tests.helpers import ROOT

POLICIES = ROOT / "charts" / "nubes" / "templates" / "policies"


def rendered_cluster_roles() -> dict[str, list[dict[str, Any]]]:
    helm = os.path.join(
        os.environ.get("NUBES_CACHE", os.path.expanduser("~/.cache/nubes")), "bin", "helm"
    )
    argv = [helm, "template", "nubes", str(ROOT / "charts" / "nubes")]
    argv += ["--namespace", "nubes-system"]
    argv += ["--set", "controller.enabled=false", "--set", "agent.enabled=false"]
    argv += ["--set", "crds.enabled=false"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return {
        doc["metadata"]["name"]: doc.get("rules") or []
        for doc in yaml.safe_load_all(out)
        if doc and doc.get("kind") == "ClusterRole"
    }


def rbac_allows(rules: list[dict[str, Any]], kind: policy_table.Kind, verb: str, name: str) -> bool:
    return any(
        (kind.group in r["apiGroups"] or "*" in r["apiGroups"])
        and (kind.resource in r["resources"] or "*" in r["resources"])
        and (verb in r["verbs"] or "*" in r["verbs"])
        and (not r.get("resourceNames") or name in r["resourceNames"])
        for r in rules
    )


def test_readme_table_is_generated_from_the_policy() -> None:
    text = policy_table.README.read_text()
    assert policy_table.readme_with_table(text) == text, (
        "README.md's policy table is stale: run `.venv/bin/python -m tests.policy_table`"
    )


def test_rendered_cluster_roles_grant_what_the_table_says() -> None:
    roles = rendered_cluster_roles()
    names = ["", "nubes:project-admin", "nubes:project-member", "nubes:project-reader"]
    names += ["nubes:cloud-admin", "other"]
    checked = 0
    for role, cluster_role in policy_table.policy()["roles"].items():
        rules = roles[cluster_role]
        for kind in policy_table.kinds():
            for verb in [*policy_table.verbs(), "escalate", "impersonate"]:
                for name in names:
                    got = rbac_allows(rules, kind, verb, name)
                    want = policy_table.allows(role, kind.group, kind.resource, verb, name)
                    assert got == want, (cluster_role, kind, verb, name)
                    checked += 1
    assert checked > 1000


def test_every_admission_verb_is_checked_by_the_policy_the_table_names() -> None:
    templates = {}
    for path in POLICIES.glob("*.yaml"):
        text = path.read_text()
        pattern = r"kind: ValidatingAdmissionPolicy\n(?:.*\n){0,2}?\s*name: (\S+)"
        for name in re.findall(pattern, text):
            templates[name] = text
    verbs = policy_table.policy()["admissionVerbs"]
    assert verbs
    for verb, spec in verbs.items():
        text = templates[spec["policy"]]
        assert f"check('{verb}')" in text, (verb, spec["policy"])
        assert f"authorizer.group('{spec['group']}').resource('{spec['resource']}')" in text, verb
        # Someone holds it: otherwise the policy refuses everybody.
        assert any(
            policy_table.allows(role, spec["group"], spec["resource"], verb)
            for role in policy_table.roles()
        ), verb
