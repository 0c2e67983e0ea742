"""dns-tunnel: data carried in DNS names or answers.

A **scanner** over each settled ``dns`` session (its queries and answers, parsed by
``detectors.dns``) fires on the first of:

- a query name longer than ``name_length`` characters (default 180; DNS allows 253): Kubernetes
  search-path expansion (``<name>.<ns>.svc.cluster.local``) of a long external name stays under;
- a *random label*: at least ``label_length`` characters (default 32) with no ``-`` or ``_``
  breaking it into words, and a Shannon entropy of at least ``label_entropy`` bits per character
  (default 3.3). Base32 and hex encodings of 32+ bytes measure 3.4-4.6; host names long enough
  are hyphenated words (``kube-state-metrics-shard-0``), and a run of 32 letters without a break
  is rare in a name a person chose (words run together that long measure like base32, and fire);
- a TXT or NULL answer record of at least ``answer_bytes`` bytes (default 200) that carries no
  text: a NULL record, or a TXT record whose strings, joined, hold no space and do not start with
  a ``tag=`` (SPF ``v=spf1 …``, DKIM ``v=DKIM1; k=rsa; p=…``, DMARC, site verifications all do);
- a client datagram to UDP port 53 of more than ``query_bytes`` bytes (default 512: a query is
  a header, one name of at most 255 bytes and an EDNS record).

A **watch** over every dns session's report counts, per client address and registered domain (the
last two labels, three under a two-letter country code whose second label is short: ``co.uk``),
the distinct query names within ``window`` seconds (default 60), and fires on the session that
brings them to ``unique_names`` (default 150), once per episode: again only after a window in
which that client asked fewer than half as many there. Names under ``cluster.local`` or holding
an ``svc`` label (Kubernetes search-path expansion) are not counted. Its clock is the sessions'
own ``last_seen`` (offline: the capture's time). At most ``_MAX_KEYS`` pairs are followed; the
longest idle is forgotten first.

What it cannot see: tunnels that stay under every threshold (short labels, few names a minute,
A/AAAA answers only); DNS over TLS or HTTPS; queries after the inspector's first packets (a
session's later queries, on a reused 5-tuple, are a new session only after a pause). Services
whose design is a tunnel (antivirus reputation lookups with hashes in labels, DNSBL) fire too.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from flowmap_dp.detectors import dns
from flowmap_dp.detectors.base import Flow, Threat
from flowmap_dp.threats.base import WITH_METADATA, Limits, Scanner, Seen, Watcher

NAME = "dns-tunnel"
LIMITS: Limits = {"name_length": 180.0, "label_length": 32.0, "label_entropy": 3.3, "answer_bytes": 200.0,
                  "query_bytes": 512.0}
WATCH_LIMITS: Limits = {"unique_names": 150.0, "window": 60.0}
_SNIPPET = 120
_MAX_KEYS = 4096  # (client, domain) pairs the watch follows at once


def entropy(text: str) -> float:
    """Shannon entropy of ``text``'s characters, in bits per character."""
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values()) if n else 0.0


def _random_label(name: str, limits: Limits) -> str | None:
    least = max(1, int(limits["label_length"]))
    for label in name.split("."):
        if len(label) < least:
            continue
        word = max(label.replace("_", "-").split("-"), key=len)
        if len(word) >= least and entropy(label.lower()) >= limits["label_entropy"]:
            return label
    return None


def _no_text(rtype: str, rdata: bytes) -> bool:
    if rtype == "NULL":
        return True
    parts, off = [], 0
    while off < len(rdata):  # TXT: <length><string>, repeated
        n = rdata[off]
        parts.append(rdata[off + 1 : off + 1 + n])
        off += 1 + n
    joined = b"".join(parts)
    head = joined[:33].split(b"=", 1)
    tagged = len(head) == 2 and head[0].strip().replace(b"-", b"").replace(b"_", b"").isalnum()
    return b" " not in joined and not tagged


def scan(flow: Flow, app: str, metadata: Mapping[str, Any], limits: Limits) -> Sequence[Threat]:
    """The first sign of a tunnel in one DNS session (see the module docstring)."""
    queries, answers = dns.messages(flow, True), dns.messages(flow, False)
    for m in queries + answers:
        for q in m["questions"]:
            name = q["name"]
            if len(name) > limits["name_length"]:
                return [Threat(NAME, f"{len(name)}-character name {name[:_SNIPPET - 24]}", "dns.name")]
            if label := _random_label(name, limits):
                return [Threat(NAME, f"random label {label[:_SNIPPET - 14]}", "dns.label")]
    for m in answers:
        for rtype, rdata in m["blobs"]:
            if len(rdata) >= limits["answer_bytes"] and _no_text(rtype, rdata):
                return [Threat(NAME, f"{rtype} answer of {len(rdata)} bytes", "dns.answer")]
    if flow.l4 == "udp" and flow.server_port == 53:
        big = max((len(p) for p in flow.c2s), default=0)
        if big > limits["query_bytes"]:
            return [Threat(NAME, f"{big}-byte query datagram", "dns.query")]
    return []


def registered_domain(name: str) -> str:
    """The last two labels of ``name``; three under a two-letter country code whose second label
    is at most three characters (``example.co.uk``). No public-suffix list: an approximation."""
    labels = name.lower().rstrip(".").split(".")
    keep = 3 if len(labels) >= 3 and len(labels[-1]) == 2 and len(labels[-2]) <= 3 else 2
    return ".".join(labels[-keep:])


class UniqueNames:
    """The watch's state in one packet loop (see the module docstring)."""

    def __init__(self, limits: Limits) -> None:
        self.limit = max(1, int(limits["unique_names"]))
        self.window = limits["window"]
        # (client, domain) -> name -> last time asked; and whether the pair is in an episode
        self.names: OrderedDict[tuple[bytes, str], dict[str, float]] = OrderedDict()
        self.firing: set[tuple[bytes, str]] = set()

    def observe(self, session: Seen, now: float) -> Sequence[Threat]:
        if session.app != "dns" or not session.metadata:
            return []
        meta = session.metadata.get("dns") or {}
        t = session.last_seen
        out: list[Threat] = []
        for q in meta.get("questions", ()):
            name = str(q.get("name", "")).lower().rstrip(".")
            if not name or name.endswith("cluster.local") or "svc" in name.split("."):
                continue
            hit = self._count(session.client, registered_domain(name), name, t)
            if hit is not None and not out:
                out.append(hit)
        return out

    def _count(self, client: bytes, domain: str, name: str, t: float) -> Threat | None:
        key = (client, domain)
        names = self.names.pop(key, None)
        if names is None:
            names = {}
            while len(self.names) >= _MAX_KEYS:
                old, _ = self.names.popitem(last=False)
                self.firing.discard(old)
        self.names[key] = names  # most recently used last
        # Oldest first: a name asked again moves to the end.
        names[name] = max(t, names.pop(name, t))
        horizon = t - self.window
        while names and (len(names) > 2 * self.limit or next(iter(names.values())) < horizon):
            names.pop(next(iter(names)))
        if key in self.firing:
            if len(names) < self.limit / 2:
                self.firing.discard(key)
            return None
        if len(names) >= self.limit:
            self.firing.add(key)
            return Threat(NAME, f"{len(names)} names under {domain} within {self.window:g} s"[:_SNIPPET],
                          "dns.names")
        return None


SCANNER = Scanner(NAME, frozenset({"dns"}), scan, LIMITS)
WATCHER = Watcher(NAME, UniqueNames, WATCH_LIMITS, sees=WITH_METADATA)
