"""Generate CustomResourceDefinitions from the pydantic models.

Pydantic's JSON Schema is close to what the API server wants; this module
turns it into a *structural* OpenAPI v3 schema: references inlined, optional
fields expressed by absence rather than `anyOf [T, null]`, literals as enums,
no titles, and the Kubernetes extensions (`x-kubernetes-*`) kept.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml

from .meta import Resource
from .registry import ALL_KINDS

Schema = dict[str, Any]

# Keys of pydantic's output that structural schemas do not take.
_DROP = {"title", "$defs", "discriminator"}


def _resolve(node: Any, defs: dict[str, Schema]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        node = _merge(target, node)
    if "allOf" in node and len(node["allOf"]) == 1:
        only = node.pop("allOf")[0]
        node = _merge(_resolve(only, defs), node)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"union types are not structural: {node['anyOf']}")
        node.pop("anyOf")
        node = _merge(_resolve(branches[0], defs), node)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    # JSON Schema 2020-12 exclusive bounds are numbers; OpenAPI v3.0 wants flags.
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node[bound], bool):
            node[flag] = node.pop(bound)
            node[bound] = True
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "default" and value is None:
            continue
        if key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _resolve(value, defs)
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = _enum_type(out["enum"])
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def _merge(base: Schema, extra: Schema) -> Schema:
    """Field-level keys (description, default, rules) win over the type's."""
    merged = dict(base)
    for key, value in extra.items():
        if key == "x-kubernetes-validations" and key in merged:
            merged[key] = [*merged[key], *value]
        else:
            merged[key] = value
    return merged


def _enum_type(values: list[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "boolean"
    if all(isinstance(v, int) for v in values):
        return "integer"
    return "string"


def structural(model: type[Any]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    resolved: Schema = _resolve(raw, defs)
    return resolved


def _without_rules(node: Any) -> Any:
    """Status is written by our own processes: no CEL cost spent on it."""
    if isinstance(node, list):
        return [_without_rules(i) for i in node]
    if isinstance(node, dict):
        return {k: _without_rules(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    return node


def crd_for(kind: type[Resource[Any, Any]]) -> dict[str, Any]:
    info = kind.crd
    fields = kind.model_fields
    spec_model: type[Any] = fields["spec"].annotation  # type: ignore[assignment]
    status_model: type[Any] = fields["status"].annotation  # type: ignore[assignment]
    spec = structural(spec_model)
    status = _without_rules(structural(status_model))
    spec["description"] = (spec_model.__doc__ or "").strip()
    status["description"] = "Observed state, written by the controller and the node agents."
    # The API server drops status on create, and kstatus judges an object
    # without status (or without observedGeneration) Current: a GitOps tool
    # would report success before the controller acted. Structural defaults
    # apply whenever the API server reads the object from etcd (every get,
    # list, watch and the create's own response), so a fresh object reads
    # `status: {observedGeneration: 0}`, behind metadata.generation (>= 1):
    # InProgress for kstatus, Progressing for the Argo CD check. Nothing is
    # stored; the controller's first status write replaces the 0.
    status["default"] = {}
    status["properties"]["observedGeneration"]["default"] = 0
    if info.spec_validations:
        spec.setdefault("x-kubernetes-validations", []).extend(info.spec_validations)
    root: Schema = {
        "type": "object",
        "description": info.description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if spec.get("required"):
        root["required"] = ["spec"]
    names: dict[str, Any] = {
        "kind": info.kind,
        "listKind": f"{info.kind}List",
        "plural": info.plural,
        "singular": info.singular,
    }
    if info.short_names:
        names["shortNames"] = list(info.short_names)
    if info.categories:
        names["categories"] = list(info.categories)
    columns = [
        {
            "name": c.name,
            "type": c.type,
            "jsonPath": c.json_path,
            **({"description": c.description} if c.description else {}),
            **({"priority": c.priority} if c.priority else {}),
        }
        for c in info.printer_columns
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": info.crd_name},
        "spec": {
            "group": info.group,
            "names": names,
            "scope": info.scope,
            "versions": [
                {
                    "name": info.version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    **(
                        {"selectableFields": [{"jsonPath": p} for p in info.selectable_fields]}
                        if info.selectable_fields
                        else {}
                    ),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def file_name(kind: type[Resource[Any, Any]]) -> str:
    return f"{kind.crd.group}_{kind.crd.plural}.yaml"


HEADER = "# Generated from the pydantic models in api/ by `make crds`. Do not edit.\n"


def render_all() -> dict[str, str]:
    return {
        file_name(kind): HEADER + yaml.safe_dump(crd_for(kind), sort_keys=False, width=100)
        for kind in ALL_KINDS
    }


def write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rendered = render_all()
    for stale in directory.glob("*.yaml"):
        if stale.name not in rendered:
            stale.unlink()
    for name, text in rendered.items():
        (directory / name).write_text(text)


def check(directory: Path) -> list[str]:
    """Differences between the committed YAML and the models, as unified diffs."""
    problems: list[str] = []
    rendered = render_all()
    present = {p.name for p in directory.glob("*.yaml")}
    for name in sorted(present - rendered.keys()):
        problems.append(f"{name}: no model generates this file")
    for name, text in rendered.items():
        path = directory / name
        current = path.read_text() if path.exists() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), f"committed/{name}", f"models/{name}"
            )
            problems.append("\n".join(diff))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nubes crds", description=__doc__)
    parser.add_argument("action", choices=["write", "check"])
    parser.add_argument("directory", type=Path, nargs="?", default=Path("crds"))
    args = parser.parse_args(argv)
    if args.action == "write":
        write(args.directory)
        return 0
    problems = check(args.directory)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("CRDs drifted from the models: run `make crds` and commit.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
