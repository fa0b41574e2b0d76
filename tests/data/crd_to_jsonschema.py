"""Turn a Kubernetes CustomResourceDefinition into a JSON Schema that ``jsonschema`` can check.

Usage (see tests/data/README.md for the exact sources)::

    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayservices.yaml \\
        | python tests/data/crd_to_jsonschema.py --version v1 \\
              --source "github.com/ray-project/kuberay@v1.7.0 (<commit>): <path>" \\
        > tests/data/rayservice-crd-schema.json

It takes the ``openAPIV3Schema`` of the named served version and rewrites the Kubernetes
extensions into plain JSON Schema (draft 2020-12), so the check is at least as strict as the API
server's structural-schema validation with ``kubectl apply --validate=strict``:

* ``x-kubernetes-int-or-string: true``: an integer or a string (``pattern`` still applies to
  strings only, as in Kubernetes).
* ``x-kubernetes-preserve-unknown-fields: true``: fields the schema does not list are allowed
  (an untyped node with this flag accepts any value).
* every other object that lists ``properties`` rejects fields it does not list
  (``additionalProperties: false``): the API server prunes them silently, or with strict field
  validation refuses them, and either way a misspelt key would otherwise go unnoticed.
* ``x-kubernetes-embedded-resource: true``: ``apiVersion``, ``kind`` and ``metadata`` are allowed.
* ``x-kubernetes-list-type: set``: ``uniqueItems``.
* ``nullable: true``: ``null`` is accepted too.
* ``x-kubernetes-validations`` (CEL rules), ``x-kubernetes-list-map-keys`` and
  ``x-kubernetes-map-type`` are dropped: they have no JSON Schema equivalent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

DROPPED = (
    "x-kubernetes-validations",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-list-type",
)


def convert(node: Any) -> Any:
    """The JSON Schema for one OpenAPI v3 (structural) schema node, recursively."""
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: convert(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = convert(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [convert(sub) for sub in value]
        elif key.startswith("x-kubernetes-") or key == "nullable":
            continue
        else:
            out[key] = value

    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        # Kubernetes lists the two branches itself in anyOf; keep them, or add them when absent
        # (moving an unrelated anyOf under allOf).
        branches = out.get("anyOf", [])
        if not any(isinstance(b, dict) and "type" in b for b in branches):
            if branches:
                out["allOf"] = [*out.get("allOf", []), {"anyOf": branches}]
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if node.get("nullable") and "type" in out:
        kinds = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*kinds, "null"]

    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if "properties" in out and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def served_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            if not entry.get("served", False):
                raise ValueError(f"version {version} of {crd['metadata']['name']} is not served")
            return entry["schema"]["openAPIV3Schema"]
    names = [entry["name"] for entry in crd["spec"]["versions"]]
    raise ValueError(f"{crd['metadata']['name']} has no version {version}; it has {names}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", nargs="?", help="the CRD YAML file (default: stdin)")
    parser.add_argument("--version", required=True, help="the served version, e.g. v1")
    parser.add_argument(
        "--source", required=True, help="where the CRD came from (kept in $comment)"
    )
    args = parser.parse_args(argv)
    text = Path(args.crd).read_text() if args.crd else sys.stdin.read()
    crd = next(doc for doc in yaml.safe_load_all(text) if doc)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema = convert(served_schema(crd, args.version))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$comment"] = (
        f"{group}/{args.version} {kind} from {args.source}; see crd_to_jsonschema.py"
    )
    # apiVersion and kind are fixed for this resource; the CRD leaves them as free strings.
    schema["properties"]["apiVersion"] = {"const": f"{group}/{args.version}"}
    schema["properties"]["kind"] = {"const": kind}
    required = {*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"}
    schema["required"] = sorted(required)
    json.dump(schema, sys.stdout, sort_keys=True, separators=(",", ":"))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
