"""The CRDs are generated from the models, and the committed YAML matches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nubes.api import crdgen
from nubes.api.registry import ALL_KINDS

ROOT = Path(__file__).resolve().parents[2]
SERVICE_CATEGORIES = {"keystone", "glance", "nova", "neutron", "cinder"}


def test_committed_crds_match_models() -> None:
    problems = crdgen.check(ROOT / "crds")
    assert not problems, "\n".join(problems)


def test_check_reports_drift(tmp_path: Path) -> None:
    crdgen.write(tmp_path)
    victim = next(tmp_path.glob("*networks.yaml"))
    victim.write_text(victim.read_text().replace("default: vxlan", "default: gre"))
    (tmp_path / "stale.yaml").write_text("kind: Nothing\n")
    problems = crdgen.check(tmp_path)
    assert any("default: gre" in p and "default: vxlan" in p for p in problems)
    assert any("stale.yaml" in p for p in problems)


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        found += walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        found += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += walk(schema["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.crd.kind)
def test_crd_is_structural_and_documented(kind: Any) -> None:
    crd = crdgen.crd_for(kind)
    version = crd["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    for path, node in walk(root):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        for banned in ("anyOf", "oneOf", "allOf", "$ref", "title"):
            assert banned not in node, f"{path} has {banned}"
    spec = root["properties"]["spec"]
    for path, node in walk(spec, ".spec"):
        if path != ".spec" and not path.endswith("[]") and not path.endswith("{}"):
            assert node.get("description"), f"{kind.crd.kind}{path} has no description"
    assert version["subresources"] == {"status": {}}
    assert "observedGeneration" in root["properties"]["status"]["properties"]


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.crd.kind)
def test_every_spec_field_is_bounded(kind: Any) -> None:
    """Whatever a user writes has a size limit in the schema (the API server
    refuses more at once, and the components cache it): strings, lists and
    maps all, not only what a tenant is expected to fill in."""
    spec = crdgen.crd_for(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(spec["properties"]["spec"], ".spec"):
        where = f"{kind.crd.kind}{path}"
        if node.get("type") == "string":
            assert "maxLength" in node or "enum" in node, f"{where}: a string without maxLength"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{where}: a list without maxItems"
        if isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, f"{where}: a map without maxProperties"


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.crd.kind)
def test_names_and_columns(kind: Any) -> None:
    names = crdgen.crd_for(kind)["spec"]["names"]
    assert names["shortNames"]
    if kind.crd.kind == "Allocation":
        assert names["categories"] == ["nubes-internal"]
        return
    assert "nubes" in names["categories"]
    assert SERVICE_CATEGORIES & set(names["categories"])
    columns = {
        c["name"] for c in crdgen.crd_for(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert "Age" in columns


def test_short_names_unique_and_clear_of_builtins() -> None:
    builtin = {
        "po",
        "svc",
        "ns",
        "no",
        "pv",
        "pvc",
        "cm",
        "ep",
        "ds",
        "rs",
        "deploy",
        "sa",
        "ing",
        "netpol",
        "pc",
        "sc",
        "crd",
        "hpa",
        "cs",
        "ev",
        "limits",
        "quota",
        "rc",
        "csr",
        "pdb",
        "psp",
    }
    seen: set[str] = set()
    for kind in ALL_KINDS:
        for short in kind.crd.short_names:
            assert short not in builtin, f"{short} shadows a built-in kind"
            assert short not in seen, f"{short} used twice"
            seen.add(short)
