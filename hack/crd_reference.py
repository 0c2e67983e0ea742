"""Write docs/crd-reference.md from the CRDs' schemas (``make docs``; tests/test_generated.py
fails when the committed page differs from what this writes).

Usage: hack/crd_reference.py [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
GROUP = "flowmap.dev"  # kopf's own ClusterKopfPeering CRD is installed too, but is not ours to document
ORDER = ("Group", "Connection", "NetworkLearningPolicy", "PacketCapture")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type(schema: dict[str, Any]) -> str:
    kind = str(schema.get("type", "any"))
    if kind == "array":
        kind = f"array of {_type(schema.get('items', {}))}"
    elif kind == "object" and "additionalProperties" in schema:
        kind = f"map of {_type(schema['additionalProperties'])}"
    if "format" in schema:
        kind += f" ({schema['format']})"
    return kind


def _bounds(schema: dict[str, Any], required: bool) -> str:
    parts = ["required"] if required else []
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for low, high, what in (("minLength", "maxLength", "length"), ("minimum", "maximum", "value"),
                            ("minItems", "maxItems", "items"), ("minProperties", "maxProperties", "entries")):
        lo, hi = schema.get(low), schema.get(high)
        if lo is not None and hi is not None:
            parts.append(f"{what} {lo}–{hi}")
        elif hi is not None:
            parts.append(f"{what} ≤ {hi}")
        elif lo is not None:
            parts.append(f"{what} ≥ {lo}")
    items = schema.get("items", {})
    for key, bound in (("maxLength", "each ≤ {} long"), ("maximum", "each ≤ {}")):
        if key in items and items.get("type") != "object":
            parts.append(bound.format(items[key]))
    if "enum" in items:
        parts.append("each one of " + ", ".join(f"`{v}`" for v in items["enum"]))
    if schema.get("x-kubernetes-list-type") == "set":
        parts.append("a set")
    elif schema.get("x-kubernetes-list-type") == "map":
        parts.append("keyed by " + ", ".join(f"`{k}`" for k in schema.get("x-kubernetes-list-map-keys", [])))
    if "pattern" in schema:
        parts.append(f"pattern `{schema['pattern']}`")
    return "; ".join(parts)


def _rules(schema: dict[str, Any], each: bool = False) -> list[str]:
    return [_cell(f"{'Each item: rule' if each else 'Rule'} `{r['rule']}`: {r.get('message', '')}.")
            for r in schema.get("x-kubernetes-validations", [])]


def _rows(schema: dict[str, Any], path: str, required: bool, out: list[str]) -> None:
    array = schema.get("type") == "array"
    target = schema.get("items", {}) if array else schema
    item_rules = _rules(target, each=True) if array and target.get("type") != "object" else []
    note = " ".join(filter(None, [_cell(schema.get("description", "")), *_rules(schema), *item_rules]))
    out.append(f"| `{path}` | {_type(schema)} | {_cell(_bounds(schema, required))} | {note} |")
    prefix = f"{path}[]" if array else path
    if array and target.get("type") == "object" and _rules(target):
        out.append(f"| `{prefix}` | object | | {' '.join(_rules(target))} |")
    needed = set(target.get("required", []))
    for name, sub in target.get("properties", {}).items():
        _rows(sub, f"{prefix}.{name}", name in needed, out)


def render(crds: list[dict[str, Any]]) -> str:
    """The whole page, for the CRDs of GROUP, in the order users meet them."""
    ours = sorted((c for c in crds if c["spec"]["group"] == GROUP), key=lambda c: ORDER.index(c["spec"]["names"]["kind"]))
    out = ["# Custom resource reference", "",
           "<!-- Generated from crds/*.yaml by hack/crd_reference.py (`make docs`); do not edit. -->", "",
           f"Group `{GROUP}`. Every bound below is enforced by the API server, which refuses an object "
           "that breaks one with a message naming the field.", ""]
    for crd in ours:
        names, spec = crd["spec"]["names"], crd["spec"]
        for version in spec["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            out += [f"## {names['kind']} (`{names['plural']}.{GROUP}/{version['name']}`)", "",
                    f"{spec['scope']}-scoped; short name `{', '.join(names.get('shortNames', []))}`; "
                    f"categories `{', '.join(names.get('categories', []))}`"
                    + ("; status is a subresource (only the operator writes it)." if "status" in version.get(
                        "subresources", {}) else "."), "", _cell(schema.get("description", "")), ""]
            columns = version.get("additionalPrinterColumns", [])
            if columns:
                out += ["`kubectl get` columns: " + ", ".join(f"{c['name'].upper()} (`{c['jsonPath']}`)"
                                                              for c in columns) + ".", ""]
            out += ["| field | type | bounds | description |", "|---|---|---|---|"]
            needed = set(schema.get("required", []))
            for top in ("spec", "status"):
                if top in schema.get("properties", {}):
                    _rows(schema["properties"][top], top, top in needed, out)
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "crd-reference.md")
    args = parser.parse_args(argv)
    crds = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("*_*.yaml"))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(crds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
