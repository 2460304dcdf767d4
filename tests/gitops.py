"""What GitOps tools see of Nubes objects: every kind in every state an object
can be in, with the conditions the reconciler itself writes
(nubes.runtime.reconcile.conditions_for), judged by the real kstatus library
(hack/kstatus, built by hack/build-tools.sh) and by the Argo CD health check
shipped in charts/nubes/files/argocd (run by a Lua interpreter).

`python -m tests.gitops` rewrites charts/nubes/files/argocd/argocd-cm.yaml
from health.lua and the list of kinds."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from typing import Any

import yaml

from nubes.api.crdgen import file_name
from nubes.api.registry import ALL_KINDS
from nubes.runtime.reconcile import Outcome, conditions_for
from tests.helpers import ROOT

ARGOCD = ROOT / "charts" / "nubes" / "files" / "argocd"
CACHE = os.environ.get("NUBES_CACHE", os.path.expanduser("~/.cache/nubes"))
GENERATION = 3

# state -> (what the controller wrote, deleting?, kstatus, Argo CD health)
STATES: dict[str, tuple[Outcome | None, int | None, bool, str, str]] = {
    # outcome, status.observedGeneration, deleting, kstatus, Argo CD
    "ready": (Outcome.ready(message="up"), GENERATION, False, "Current", "Healthy"),
    "in-progress": (
        Outcome.progressing("Scheduling", "waiting for a node"),
        GENERATION,
        False,
        "InProgress",
        "Progressing",
    ),
    "stalled": (
        Outcome.stalled("IpAddressExhausted", "no free address in 10.0.0.0/30"),
        GENERATION,
        False,
        "Failed",
        "Degraded",
    ),
    "deleting": (Outcome.ready(message="up"), GENERATION, True, "Terminating", "Progressing"),
    # Just created, nothing written its status yet: the API server drops
    # status on create and serves the CRD's structural defaults instead,
    # `status: {observedGeneration: 0}` (api/crdgen.py says why). Without
    # them kstatus would judge the object Current (no status, no conditions).
    "new": (None, 0, False, "InProgress", "Progressing"),
    # The user changed the spec; the controller has not acted on it yet.
    "spec-changed": (
        Outcome.ready(message="up"),
        GENERATION - 1,
        False,
        "InProgress",
        "Progressing",
    ),
}


def obj(kind: type[Any], state: str) -> dict[str, Any]:
    outcome, observed, deleting, _, _ = STATES[state]
    crd = kind.crd
    meta: dict[str, Any] = {"name": f"{crd.singular}-{state}", "generation": GENERATION}
    if crd.scope == "Namespaced":
        meta["namespace"] = "gitops"
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        meta["finalizers"] = ["nubes.io/cleanup"]
    o: dict[str, Any] = {"apiVersion": crd.api_version, "kind": crd.kind, "metadata": meta}
    if outcome is not None:
        conditions = conditions_for(outcome, [], observed or GENERATION)
        o["status"] = {"observedGeneration": observed, "conditions": conditions}
    return served(kind, o)


def served(kind: type[Any], o: dict[str, Any]) -> dict[str, Any]:
    """The object as the API server returns it: with the structural defaults
    of the generated CRD (crds/) filled in, as it does on every read from
    etcd (k8s.io/apiextensions-apiserver's defaulting algorithm: a missing
    property takes its default, then defaults apply inside it)."""
    crd = yaml.safe_load((ROOT / "crds" / file_name(kind)).read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    out = copy.deepcopy(o)
    _default(out, schema)
    return out


def _default(x: Any, schema: dict[str, Any]) -> None:
    if isinstance(x, dict):
        props = schema.get("properties", {})
        for k, prop in props.items():
            if k not in x and "default" in prop:
                x[k] = copy.deepcopy(prop["default"])
        for k, v in x.items():
            if k in props:
                _default(v, props[k])
            elif isinstance(schema.get("additionalProperties"), dict):
                _default(v, schema["additionalProperties"])
    elif isinstance(x, list) and isinstance(schema.get("items"), dict):
        for item in x:
            _default(item, schema["items"])


def kstatus(objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    """sigs.k8s.io/cli-utils/pkg/kstatus's verdict on each object."""
    checker = os.path.join(CACHE, "bin", "kstatus-check")
    out = subprocess.run(
        [checker], input=json.dumps(objects), capture_output=True, text=True, check=True
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def lua_literal(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid Lua string here (ASCII escapes)
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    items = ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items())
    return "{" + items + "}"


def argocd_health(o: dict[str, Any]) -> tuple[str, str]:
    """Run health.lua on one object, as Argo CD does (the object as `obj`)."""
    lua = shutil.which("lua5.4") or shutil.which("lua")
    assert lua, "no Lua interpreter (Debian package lua5.4)"
    script = (ARGOCD / "health.lua").read_text()
    program = (
        f"obj = {lua_literal(o)}\n"
        f"local hs = (function()\n{script}\nend)()\n"
        'io.write(hs.status, "\\n", hs.message or "", "\\n")\n'
    )
    out = subprocess.run(
        [lua, "-"], input=program, capture_output=True, text=True, check=True
    ).stdout
    status, message = [*out.split("\n", 1), ""][:2]
    return status, message.rstrip("\n")


def argocd_cm() -> str:
    """The argocd-cm entries for every kind (one script for all)."""
    script = (ARGOCD / "health.lua").read_text()
    body = "".join("    " + line if line else "" for line in script.splitlines(keepends=True))
    lines = [
        "# Generated by `python -m tests.gitops` from health.lua: merge into Argo CD's",
        "# argocd-cm ConfigMap so Argo CD judges Nubes objects by their kstatus conditions.",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: argocd-cm",
        "  namespace: argocd",
        "data:",
    ]
    for kind in ALL_KINDS:
        lines.append(f"  resource.customizations.health.{kind.crd.group}_{kind.crd.kind}: |")
        lines.append(body.rstrip("\n"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    (ARGOCD / "argocd-cm.yaml").write_text(argocd_cm())
