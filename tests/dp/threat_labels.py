"""The threats a capture's manifest says each flow raises (tests/data/*/MANIFEST.json), shared by
the capture tests: a flow entry's ``"threats": [names]`` (absent: none), plus ``sqlinjection`` for
a flow labelled so; a flow the manifest does not list raises none."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Key = tuple[str, int, frozenset[str]]


def expected(label: Mapping[str, Any] | None) -> list[str]:
    """The threat names ``label``'s flow must raise, sorted (``None``: an unlisted flow, none)."""
    if label is None:
        return []
    names = set(label.get("threats") or ())
    if label.get("label") == "sqlinjection":
        names.add("sqlinjection")
    return sorted(names)


def _key(proto: str, vlan: int, a: str, b: str) -> Key:
    return proto, vlan, frozenset({a.lower(), b.lower()})


def mismatches(flows: Iterable[Mapping[str, Any]], labels: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every classified flow whose threats are not exactly its label's, described."""
    index = {_key(lb["proto"], lb.get("vlan", 0), lb.get("client", lb.get("a", "")),
                  lb.get("server", lb.get("b", ""))): lb for lb in labels}
    wrong = []
    for f in flows:
        want = expected(index.get(_key(f["l4"], f.get("vlan", 0), f["client"], f["server"])))
        got = sorted({t["name"] for t in f.get("threats") or ()})
        if got != want:
            wrong.append(f"{f['l4']} {f['client']} -> {f['server']} app={f['app']}: threats {got}, want {want} "
                         f"({[t['snippet'] for t in f.get('threats') or ()]})")
    return wrong
