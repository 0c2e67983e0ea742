"""Classify every nDPI capture listed in tests/data/ndpi/MANIFEST.json and compare each
labeled flow with its label.

Done criteria (issue 3): >= 99 % agreement on the non-``uncertain`` flows, overall and for every
label separately, and no flow labeled ``unknown`` (uncertain or not) may come out as one of our 21
protocols. A flow labeled ``sqlinjection`` agrees when its app is http and its threats include
sqlinjection. The per-label table is printed and carried in the assertion message.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from flowmap_dp.classify import classify_file
from flowmap_dp.detectors import NAMES
from tests.dp.test_own_captures import threat_mismatches

NDPI = Path(__file__).resolve().parents[1] / "data" / "ndpi"
MANIFEST = NDPI / "MANIFEST.json"
THRESHOLD = 0.99

def _endpoint(text: str) -> str:
    return text.lower()


@cache
def _classified(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(classify_file(NDPI / name))


def _find(flows: tuple[dict[str, Any], ...], label: dict[str, Any]) -> dict[str, Any] | None:
    if "client" in label:
        pairs = [(label["client"], label["server"])]
        if label.get("dir_evidence") in (None, "well-known-port"):
            pairs.append((label["server"], label["client"]))
    else:
        pairs = [(label["a"], label["b"]), (label["b"], label["a"])]
    pairs = [(_endpoint(c), _endpoint(s)) for c, s in pairs]
    for f in flows:
        if f["l4"] != label["proto"] or f.get("vlan", 0) != label.get("vlan", 0):
            continue
        if (_endpoint(f["client"]), _endpoint(f["server"])) in pairs:
            return f
    # The session table may orient a flow differently from nDPI: the 5-tuple still decides.
    for f in flows:
        same = f["l4"] == label["proto"] and f.get("vlan", 0) == label.get("vlan", 0)
        if same and (_endpoint(f["server"]), _endpoint(f["client"])) in pairs:
            return f
    return None


def _outcome(flow: dict[str, Any] | None) -> str:
    if flow is None:
        return "<missing>"
    if flow["app"] == "http" and any(t["name"] == "sqlinjection" for t in flow["threats"]):
        return "sqlinjection"
    return str(flow["app"])


def _results() -> list[dict[str, Any]]:
    out = []
    for entry in json.loads(MANIFEST.read_text()):
        flows = _classified(entry["file"])
        for label in entry["flows"]:
            got = _outcome(_find(flows, label))
            out.append({"file": entry["file"], "label": label["label"], "got": got,
                        "uncertain": bool(label.get("uncertain")), "flow": label})
    return out


def _table(results: list[dict[str, Any]]) -> tuple[str, dict[str, tuple[int, int]]]:
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        if r["uncertain"]:
            continue
        per[r["label"]][1] += 1
        per[r["label"]][0] += r["got"] == r["label"]
    agree = sum(a for a, _ in per.values())
    total = sum(t for _, t in per.values())
    lines = [f"{'label':<14}{'agree':>7}{'total':>7}{'rate':>8}"]
    for label in sorted(per):
        a, t = per[label]
        lines.append(f"{label:<14}{a:>7}{t:>7}{a / t:>8.1%}")
    lines.append(f"{'ALL':<14}{agree:>7}{total:>7}{agree / max(total, 1):>8.1%}")
    wrong = [f"  {r['file']}: {r['flow'].get('client', r['flow'].get('a'))} -> "
             f"{r['flow'].get('server', r['flow'].get('b'))} label={r['label']} got={r['got']}"
             + (" (uncertain)" if r["uncertain"] else "")
             for r in results if r["got"] != r["label"]]
    if wrong:
        lines += ["disagreements:", *wrong]
    return "\n".join(lines), {k: (v[0], v[1]) for k, v in per.items()}


def test_ndpi_agreement(capsys: pytest.CaptureFixture[str]) -> None:
    results = _results()
    text, per = _table(results)
    with capsys.disabled():  # the table is the point of this test: show it even without -s
        sys.stdout.write("\nnDPI capture agreement (non-uncertain flows)\n" + text + "\n")
    agree = sum(a for a, _ in per.values())
    total = sum(t for _, t in per.values())
    assert total >= 150, text
    assert agree / total >= THRESHOLD, text
    low = {label: f"{a}/{t}" for label, (a, t) in per.items() if a / t < THRESHOLD}
    assert not low, f"labels below {THRESHOLD:.0%}: {low}\n{text}"


def test_no_unknown_flow_is_named() -> None:
    named = [r for r in _results() if r["label"] == "unknown" and r["got"] in NAMES]
    text, _ = _table(_results())
    assert not named, f"unknown flows given one of our protocols: {named}\n{text}"


def test_every_labeled_flow_is_found() -> None:
    # Uncertain flows may be ones nDPI saw inside a tunnel (dtls.pcap's GTP-U flow); ours are not.
    missing = [r for r in _results() if r["got"] == "<missing>" and not r["uncertain"]]
    assert not missing, missing


@pytest.mark.parametrize("entry", json.loads(MANIFEST.read_text()), ids=lambda e: e["file"])
def test_every_flow_raises_exactly_the_threats_listed(entry: dict[str, Any]) -> None:
    """nDPI's captures are benign but for their sqlinjection flows: every flow raises exactly the
    threats its entry lists (a flow not listed, none)."""
    wrong = threat_mismatches(_classified(entry["file"]), entry["flows"])
    assert not wrong, f"{entry['file']}:\n  " + "\n  ".join(wrong)


def test_the_vendored_captures_are_ndpis_unmodified() -> None:
    entries = json.loads(MANIFEST.read_text())
    on_disk = {p.name for p in NDPI.iterdir()} - {"MANIFEST.json", "README.md", "COPYING"}
    assert on_disk == {e["file"] for e in entries}, "every capture here is listed in MANIFEST.json, and only those"
    for e in entries:
        data = (NDPI / e["file"]).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (e["sha256"], e["bytes"]), f"{e['file']} is not nDPI's"
        assert e["source"] == f"ntop/nDPI tests/cfgs/default/pcap/{e['file']}", e["source"]
