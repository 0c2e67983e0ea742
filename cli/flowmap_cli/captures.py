"""``flowmap capture``'s pure side: flags into a PacketCapture, statuses into lines, the API's
refusals into one line, and a downloaded capture checked against its status.

No I/O here (flowmap_cli.capture is the edge). The spec holds only what a flag gave: the schema
fills in its defaults and refuses what is wrong, with a message naming the field, so its rules are
not copied here; the few things decided here are those no schema can see (a flag's syntax: a
size, a duration, ``k=v`` labels).

Everything shown comes from the cluster, where whoever may write an object chose its strings:
names, messages and node names are shown through :func:`clean` (control characters escaped,
length bounded), never raw.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowmap_api.text import printable
from flowmap_operator.capturing import FINISHED, STOP_ANNOTATION

GROUP, VERSION, PLURAL, KIND = "flowmap.dev", "v1alpha1", "packetcaptures", "PacketCapture"
RESULTS_GROUP = "results.flowmap.dev"  # served by the operator's aggregated API, not by the API server
MAX_SHOWN = 200  # characters of one string from the cluster on the terminal
MAX_ERROR_BODY = 64 * 1024  # bytes of an error answer read: a Status is far smaller


def clean(text: object, limit: int = MAX_SHOWN) -> str:
    """``text`` safe for a terminal line (flowmap_api.text.printable)."""
    return printable(text, limit)


# -- flags into a spec -------------------------------------------------------------------------------

_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES = {"": 1, "k": 1000, "K": 1000, "Ki": 1024, "KiB": 1024, "M": 1000**2, "Mi": 1024**2, "MiB": 1024**2,
          "G": 1000**3, "Gi": 1024**3, "GiB": 1024**3}


def seconds(text: str) -> int:
    """``90``, ``90s``, ``5m``, ``2h``, ``7d`` as seconds (argparse type)."""
    found = re.fullmatch(r"\s*(\d{1,9})\s*([smhd]?)\s*", text)
    if not found:
        raise ValueError(f"{text!r} is not a duration: give seconds, or a number with s, m, h or d")
    return int(found[1]) * _SECONDS[found[2]]


def size(text: str) -> int:
    """``1048576``, ``512Ki``, ``4Mi`` (or ``4MiB``), ``1M`` (10^6) as bytes (argparse type)."""
    found = re.fullmatch(r"\s*(\d{1,12})\s*([kKMG]i?B?|)\s*", text)
    if not found or found[2] not in _BYTES:
        raise ValueError(f"{text!r} is not a size: give bytes, or a number with Ki, Mi, Gi (1024s) or k, M, G")
    return int(found[1]) * _BYTES[found[2]]


def labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` as matchLabels; the empty string is ``{}`` (every pod of the namespace)."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def spec(flags: Any) -> dict[str, Any]:
    """The spec ``flowmap capture start``'s flags give (an argparse Namespace): only what was given.

    The filter flags make one filter; several are written in a manifest (``kubectl apply``)."""
    out: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    if flags.group:
        targets["groups"] = list(dict.fromkeys(flags.group))
    if flags.selector is not None:
        targets["podSelector"] = {"matchLabels": flags.selector} if flags.selector else {}
    out["targets"] = targets
    one: dict[str, Any] = {}
    peer = {k: v for k, v in (("group", flags.peer_group), ("cidr", flags.peer_cidr)) if v is not None}
    if peer:
        one["peer"] = peer
    for key, value in (("protocol", flags.protocol), ("port", flags.port), ("direction", flags.direction)):
        if value is not None:
            one[key] = value
    if one:
        out["filters"] = [one]
    for key, value in (("durationSeconds", flags.duration), ("maxBytesPerNode", flags.max_bytes),
                       ("maxPacketsPerNode", flags.max_packets), ("snapLength", flags.snap_length),
                       ("ttlSecondsAfterFinished", flags.ttl)):
        if value is not None:
            out[key] = value
    if flags.whole_packets:
        out["wholePackets"] = True
    if flags.trigger is not None or flags.pre_trigger is not None:
        # Without --trigger the schema refuses the trigger ("on" is required), naming the field.
        trigger: dict[str, Any] = {"on": flags.trigger} if flags.trigger is not None else {}
        if flags.pre_trigger is not None:
            trigger["preTriggerSeconds"] = flags.pre_trigger
        out["trigger"] = trigger
    return out


def body(name: str, spec_: Mapping[str, Any]) -> dict[str, Any]:
    """The PacketCapture to create (its namespace is the request's)."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name}, "spec": dict(spec_)}


def stop_patch() -> dict[str, Any]:
    """The merge patch ``flowmap capture stop`` sends: metadata only (the spec is immutable)."""
    return {"metadata": {"annotations": {STOP_ANNOTATION: "true"}}}


# -- refusals ----------------------------------------------------------------------------------------


def explain(code: int, answer: bytes | str | None, *, results: bool = False) -> str:
    """One line for an API error: the ``Status`` message when the answer is one (kind Status:
    message, reason, code), else the HTTP code. ``results``: the answer of the results API
    (results.flowmap.dev), which the API server only proxies; its absence is said as such."""
    try:
        status = json.loads(answer[:MAX_ERROR_BODY] if answer else b"{}")
    except (ValueError, UnicodeDecodeError):
        status = {}
    status = status if isinstance(status, dict) and status.get("kind") == "Status" else {}
    message = clean(_message(status), 400)
    if results and code == 503:
        return (f"the results API ({RESULTS_GROUP}) is registered but not answering (503"
                f"{': ' + message if message else ''}): is the operator running?")
    if results and code == 404 and not (status.get("details") or {}).get("name"):
        # The API server's own 404 for a group it does not serve: no details, no name.
        return (f"the API server does not serve {RESULTS_GROUP}: the operator's results API is not installed "
                f"({message or '404 Not Found'})")
    if code == 401:
        return f"the API server does not accept these credentials (401 Unauthorized{': ' + message if message else ''})"
    if message:
        return message
    return f"the API server answered {code}" + (f" {clean(status.get('reason'), 60)}" if status.get("reason") else "")


def _message(status: Mapping[str, Any]) -> str:
    """The Status's message; for a schema's refusal (Invalid), its causes, field by field, without
    the API server's note that CEL rules were left unchecked (field ``<nil>``) when there are others."""
    message = str(status.get("message") or "")
    details = status.get("details") or {}
    causes = [c for c in details.get("causes") or [] if isinstance(c, Mapping)] if isinstance(details, Mapping) else []
    named = [c for c in causes if c.get("field") and c.get("field") != "<nil>"]
    if status.get("reason") != "Invalid" or not named or ": " not in message:
        return message
    head = message.split(": ", 1)[0]  # 'PacketCapture.flowmap.dev "x" is invalid'
    return f"{head}: " + "; ".join(f"{c['field']}: {c.get('message', '')}" for c in named)


# -- statuses into lines -----------------------------------------------------------------------------


def human(count: int | float) -> str:
    """Bytes as people read them: ``512 B``, ``1.8 KiB``, ``4.0 MiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def age(seconds_: float) -> str:
    """kubectl's AGE: ``45s``, ``3m``, ``2h``, ``4d``."""
    s = max(0, int(seconds_))
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{s // span}{unit}"
    return f"{s}s"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _nodes(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    nodes = status.get("nodes")
    return [n for n in nodes if isinstance(n, Mapping)] if isinstance(nodes, list) else []


def row(obj: Mapping[str, Any], now: float, created: float | None) -> list[str]:
    """One PacketCapture as ``list`` shows it: NAME PHASE TRIGGER PACKETS SIZE AGE NODES (nodes
    finished of those that ran it)."""
    meta, spec_ = obj.get("metadata") or {}, obj.get("spec") or {}
    status = obj.get("status") or {}
    totals = status.get("totals") or {}
    nodes = _nodes(status)
    done = sum(n.get("phase") in FINISHED for n in nodes)
    phase = clean(status.get("phase") or "Pending", 20)
    if (meta.get("annotations") or {}).get(STOP_ANNOTATION) == "true" and phase not in FINISHED:
        phase += "(stopping)"
    return [clean(meta.get("name", ""), 63), phase, clean((spec_.get("trigger") or {}).get("on") or "-", 20),
            str(_int(totals.get("packets"))), human(_int(totals.get("fileBytes"))),
            age(now - created) if created is not None else "-", f"{done}/{len(nodes)}"]


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows under the list's header, columns aligned as kubectl aligns them."""
    every = [["NAME", "PHASE", "TRIGGER", "PACKETS", "SIZE", "AGE", "NODES"], *rows]
    widths = [max(len(r[i]) for r in every) for i in range(len(every[0]))]
    return ["   ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in every]


def progress(status: Mapping[str, Any]) -> str:
    """A running capture in one line: its phase, then each node's phase, packets, bytes and file."""
    totals = status.get("totals") or {}
    parts = [f"{clean(status.get('phase') or 'Pending', 20)}: {_int(totals.get('packets'))} packets, "
             f"{human(_int(totals.get('bytes')))} captured, file {human(_int(totals.get('fileBytes')))}"]
    for n in _nodes(status)[:8]:
        parts.append(f"{clean(n.get('node'), 40)} {clean(n.get('phase') or 'Pending', 20)} "
                     f"{_int(n.get('packets'))} pkts {human(_int(n.get('fileBytes')))}")
    if len(_nodes(status)) > 8:
        parts.append(f"{len(_nodes(status)) - 8} more nodes")
    return " | ".join(parts)


def outcome(status: Mapping[str, Any]) -> str:
    """How a finished capture ended: its Complete (else Ready) condition, reason and message."""
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}
    said = conditions.get("Complete") or conditions.get("Ready") or {}
    return clean(f"{said.get('reason') or status.get('phase') or '?'}: {said.get('message') or ''}".rstrip(": "), 400)


# -- a download checked against the status -----------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One node's file as the status says it is: where it sits in the download, and its digest."""

    node: str
    size: int
    sha256: str
    packets: int = 0


def parts(status: Mapping[str, Any], node: str | None = None) -> list[Part]:
    """What the results API sends for this status: the files of the nodes whose entry has a
    sha256 (finished), sorted by node name, concatenated (each a pcapng section); ``node``: that
    node's alone. Empty: nothing to get (yet)."""
    found = sorted((Part(str(n["node"]), _int(n.get("fileBytes")), str(n["sha256"]), _int(n.get("packets")))
                    for n in _nodes(status) if isinstance(n.get("node"), str) and isinstance(n.get("sha256"), str)),
                   key=lambda p: p.node)
    return [p for p in found if p.node == node] if node is not None else found


@dataclass
class Verdict:
    """What a download held, part by part."""

    parts: list[Part]
    got: list[int] = field(default_factory=list)  # bytes received of each part
    digests: list[str] = field(default_factory=list)
    extra: int = 0  # bytes after the last part

    @property
    def ok(self) -> bool:
        return self.extra == 0 and all(g == p.size and d == p.sha256
                                       for p, g, d in zip(self.parts, self.got, self.digests, strict=True))

    def lines(self) -> list[str]:
        """Per node: its size, packets and whether its bytes are the ones the status names."""
        out = []
        for p, got, digest in zip(self.parts, self.got, self.digests, strict=True):
            if got != p.size:
                said = f"MISMATCH: {got} bytes received, the status says {p.size}"
            elif digest != p.sha256:
                said = f"MISMATCH: sha256 {digest[:12]}…, the status says {p.sha256[:12]}…"
            else:
                said = f"sha256 {p.sha256[:12]}… ok"
            out.append(f"{clean(p.node, 63)}: {human(p.size)}, {p.packets} packets, {said}")
        if self.extra:
            out.append(f"MISMATCH: {self.extra} bytes more than the status's files")
        return out


class Checker:
    """Fed the download chunk by chunk (never all of it at once): each node's slice hashed as it passes."""

    def __init__(self, expected: Sequence[Part]) -> None:
        self.verdict = Verdict(list(expected))
        self._index, self._left = 0, expected[0].size if expected else 0
        self._hash = hashlib.sha256()
        self._got = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        while view:
            if self._index >= len(self.verdict.parts):
                self.verdict.extra += len(view)
                return
            take = view[:self._left]
            self._hash.update(take)
            self._got += len(take)
            self._left -= len(take)
            view = view[len(take):]
            if self._left == 0:
                self._close()

    def _close(self) -> None:
        self.verdict.got.append(self._got)
        self.verdict.digests.append(self._hash.hexdigest())
        self._index += 1
        self._hash, self._got = hashlib.sha256(), 0
        self._left = self.verdict.parts[self._index].size if self._index < len(self.verdict.parts) else 0

    def done(self) -> Verdict:
        """The verdict once the download ended (a part cut short is counted as received)."""
        while self._index < len(self.verdict.parts):
            self._close()
        return self.verdict


def check(expected: Sequence[Part], chunks: Iterable[bytes]) -> Verdict:
    """Every chunk through a :class:`Checker`."""
    checker = Checker(expected)
    for chunk in chunks:
        checker.feed(chunk)
    return checker.done()
