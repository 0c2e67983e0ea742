"""The table ``inet flowmap`` in the node's ruleset: read it, and apply the difference to the wanted one.

A change is one ``nft -f -`` transaction, which the kernel commits whole or not at all: no packet
ever sees half a policy, and a failed change leaves the rules in force as they were. Only the
difference is sent: set elements added and removed in place, a chain's rules replaced only when
they differ (each rule's comment carries a digest of its text), objects created when missing. The
table and its sets are never flushed wholesale; a set whose type changed (a new agent version) is
replaced together with every rule, in the same transaction. An identical table means no
transaction at all, which is what lets a restarted agent take over its predecessor's table
without a gap. A set with a timeout (the threat blocks) is the agent's to fill as the dp reports
threats (``Table.add``): a policy creates it and leaves its elements alone.

``nft`` 1.0.6 and Linux 5.6 or later: concatenations with intervals, ``th dport``, ``reject with
tcp reset`` in the inet family's forward hook.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowmap_agent.errors import NftError
from flowmap_agent.policy.compiling import Network, Ruleset, SetSpec, net_text

TABLE = "inet flowmap"
CHUNK = 1000  # elements per statement: nft's parser and its error messages stay small
Base = tuple[str, str, int, str] | None


@dataclass
class Found:
    """The table as the kernel has it: sets with their elements, chains with their rules' comments."""

    sets: dict[str, SetSpec] = field(default_factory=dict)
    chains: dict[str, tuple[Base, tuple[str, ...]]] = field(default_factory=dict)

    @classmethod
    def of(cls, ruleset: Ruleset) -> Found | None:
        """What the table is once ``ruleset`` is applied (None: no table)."""
        if not ruleset.sets and not ruleset.chains:
            return None
        return cls(dict(ruleset.sets),
                   {n: (c.base, tuple(r.comment for r in c.rules)) for n, c in ruleset.chains.items()})


def found(listing: dict[str, Any]) -> Found:
    """Parse ``nft -j -p list table inet flowmap``."""
    table = Found()
    for item in listing.get("nftables", []):
        if "set" in item:
            s = item["set"]
            kind = tuple(s["type"]) if isinstance(s["type"], list) else (s["type"],)
            table.sets[s["name"]] = SetSpec(kind, "interval" in s.get("flags", ()),
                                            frozenset(element(e) for e in s.get("elem", ())),
                                            int(s.get("timeout", 0)), int(s.get("size", 0)))
        elif "chain" in item:
            c = item["chain"]
            base = (c["type"], c["hook"], int(c["prio"]), c.get("policy", "accept")) if "hook" in c else None
            table.chains[c["name"]] = (base, ())
        elif "rule" in item:
            r = item["rule"]
            base, comments = table.chains[r["chain"]]
            table.chains[r["chain"]] = (base, (*comments, r.get("comment", "")))
    return table


def element(value: Any) -> str:
    """An element as nft lists it in JSON, in the canonical text flowmap_agent.policy.compiling writes."""
    if isinstance(value, str):
        return value if ":" not in value else _ipv6(value)  # nft writes IPv4 as Python does
    if isinstance(value, int):
        return str(value)
    if "elem" in value:
        return element(value["elem"]["val"])
    if "concat" in value:
        return " . ".join(element(v) for v in value["concat"])
    if "prefix" in value:
        return net_text(ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}"))
    low, high = (element(v) for v in value["range"])
    if low == high:
        return low
    if not low.isdigit():  # an address range that is one network prints as that network
        nets: list[Network] = list(ipaddress.summarize_address_range(ipaddress.ip_address(low),
                                                                     ipaddress.ip_address(high)))
        if len(nets) == 1:
            return net_text(nets[0])
    return f"{low}-{high}"


@functools.lru_cache(maxsize=65536)
def _ipv6(text: str) -> str:
    return str(ipaddress.ip_address(text))


def plan(have: Found | None, want: Ruleset) -> list[str]:
    """The nft commands that turn ``have`` into ``want`` (none when they are the same)."""
    if not want.sets and not want.chains:
        return [] if have is None else [f"delete table {TABLE}"]
    out: list[str] = [] if have is not None else [f"add table {TABLE}"]
    have = have or Found()
    stale_sets = {n for n, s in have.sets.items() if n not in want.sets or _shape(s) != _shape(want.sets[n])}
    stale_chains = {n for n, (base, _) in have.chains.items() if n not in want.chains or base != want.chains[n].base}
    if stale_sets or stale_chains:
        rewrite, flush = set(want.chains), set(have.chains)  # any rule may refer to what goes
    else:
        rewrite = {n for n, c in want.chains.items()
                   if n not in have.chains or have.chains[n][1] != tuple(r.comment for r in c.rules)}
        flush = rewrite & set(have.chains)
    out += [f"flush chain {TABLE} {n}" for n in sorted(flush)]
    out += [f"delete chain {TABLE} {n}" for n in sorted(stale_chains)]
    out += [f"delete set {TABLE} {n}" for n in sorted(stale_sets)]
    for name, s in sorted(want.sets.items()):
        if name in have.sets and name not in stale_sets:
            if s.timeout:
                continue  # the agent's own elements (threat blocks): they expire on their own
            old = have.sets[name].elements
            out += _elements("delete", name, old - s.elements)  # first: a new element may overlap an old one
            out += _elements("add", name, s.elements - old)
        else:
            flags = " flags interval;" if s.interval else f" flags timeout; timeout {s.timeout}s;" if s.timeout else ""
            size = f" size {s.size};" if s.size else ""
            out.append(f"add set {TABLE} {name} {{ type {' . '.join(s.type)};{flags}{size} }}")
            out += _elements("add", name, s.elements)
    # Jump targets first.
    for name, chain in sorted(want.chains.items(), key=lambda nc: (nc[1].base is not None, nc[0])):
        if name not in have.chains or name in stale_chains:
            hook = "" if chain.base is None else (" {{ type {} hook {} priority {}; policy {}; }}".format(*chain.base))
            out.append(f"add chain {TABLE} {name}{hook}")
        if name in rewrite:
            out += [f'add rule {TABLE} {name} {r.text} comment "{r.comment}"' for r in chain.rules]
    return out


def _shape(s: SetSpec) -> tuple[tuple[str, ...], bool, int, int]:
    """What a set is made as: another shape means a new set."""
    return s.type, s.interval, s.timeout, s.size


def counters(listing: dict[str, Any]) -> dict[tuple[str, str], tuple[int, int]]:
    """(chain, rule name) -> (packets, bytes), from a JSON listing that holds the table's rules."""
    out = {}
    for item in listing.get("nftables", []):
        r = item.get("rule")
        if r is None or (r["family"], r["table"]) != ("inet", "flowmap") or not r.get("comment"):
            continue
        for e in r["expr"]:
            if "counter" in e and isinstance(e["counter"], dict):
                out[(r["chain"], r["comment"].split()[0])] = (e["counter"]["packets"], e["counter"]["bytes"])
    return out


class Table:
    """The node's table: remembers what it last applied, so a change costs its difference only."""

    def __init__(self, netns: str = "", timeout: float = 60.0) -> None:
        self.netns, self.timeout = netns, timeout
        self.have: Found | None = None
        self.known = False  # whether ``have`` is what the kernel holds; else read it first

    def read(self) -> Found | None:
        """The table as it is now (None: there is none)."""
        try:
            return found(json.loads(self._nft("-j", "-p", "list", "table", *TABLE.split())))
        except NftError as exc:
            if "Error: No such file or directory" in str(exc):  # not the namespace's "Cannot open ..."
                return None
            raise

    def apply(self, want: Ruleset) -> int:
        """Make the table ``want``, in one transaction; the number of commands (0: none was needed)."""
        if not self.known:
            self.have, self.known = self.read(), True
        commands = plan(self.have, want)
        if commands:
            try:
                self._nft("-f", "-", stdin="\n".join(commands) + "\n")
            except NftError:
                self.known = False  # the table may not be what we thought: read it again next time
                raise
        self.have = Found.of(want)
        return len(commands)

    def add(self, elements: Mapping[str, Iterable[str]]) -> None:
        """Add elements to sets of the table (the threat blocks), in one transaction; each element of a
        set with a timeout lives that long. Raises NftError (a set missing, or full): none was added."""
        commands = [c for name, batch in sorted(elements.items()) for c in _elements("add", name, batch)]
        if commands:
            self._nft("-f", "-", stdin="\n".join(commands) + "\n")

    def forget(self) -> None:
        """Read the table again before the next change (another hand may have touched it)."""
        self.known = False

    def counters(self) -> dict[tuple[str, str], tuple[int, int]]:
        # Listing the whole ruleset without set contents is fast; listing the table reads every element.
        return counters(json.loads(self._nft("-j", "-t", "list", "ruleset")))

    def _nft(self, *args: str, stdin: str | None = None) -> str:
        inside = ("ip", "netns", "exec", self.netns) if self.netns else ()
        try:
            done = subprocess.run([*inside, "nft", *args], input=stdin, capture_output=True, text=True,
                                  timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NftError(f"nft {args[0]}: {exc}") from exc
        if done.returncode:
            raise NftError(f"nft {' '.join(args[:4])}: {done.stderr.strip()[:600]}")
        return done.stdout


def _elements(verb: str, name: str, elements: Iterable[str]) -> Iterator[str]:
    batch = sorted(elements)
    for i in range(0, len(batch), CHUNK):
        yield f"{verb} element {TABLE} {name} {{ {', '.join(batch[i:i + CHUNK])} }}"
