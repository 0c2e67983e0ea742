"""Longest-prefix match of an address against many networks, in logarithmic time (pure).

The networks of every CIDR group are flattened, once per change, into sorted disjoint address
ranges, each naming the group whose most specific network covers it (or none); a lookup is one
``bisect`` over the range starts. Two CIDRs either nest or do not meet, so ``n`` networks make at
most ``2n + 1`` ranges, built in ``O(n log n)`` with one stack; IPv4 and IPv6 each have a table.
A network listed by several groups is the group whose name sorts first: always the same one.

No library: py-radix's tree is MRT's code under a BSD licence with the advertising clause (the
Apache Software Foundation's Category X: not to be shipped in an Apache-2.0 image), pytricia is
LGPL-3.0, and pysubnettree publishes no wheels (the image installs wheels only). ``bisect`` runs
in C and the table is two flat lists, so neither lookups nor memory need one.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Span = tuple[int, int, int]  # (IP version, first address, last address + 1) of a network


def span(net: Network) -> Span:
    """A network as plain integers: kept per group, so that a rebuild hashes and compares no objects."""
    return net.version, int(net.network_address), int(net.broadcast_address) + 1


class PrefixTable:
    """Which group's most specific network holds an address: built once, read many times."""

    def __init__(self, groups: Mapping[str, Iterable[Span]]) -> None:
        entries: dict[int, list[tuple[int, int, str]]] = {4: [], 6: []}
        for name, spans in groups.items():
            for version, start, end in spans:
                entries[version].append((start, -end, name))
        self.size = 0
        self._tables = {version: self._flatten(found) for version, found in entries.items()}

    def lookup(self, addr: Address) -> str | None:
        """The group of the longest prefix holding ``addr``, or None."""
        starts, owners = self._tables[addr.version]
        return owners[bisect_right(starts, int(addr)) - 1]

    def _flatten(self, entries: list[tuple[int, int, str]]) -> tuple[list[int], list[str | None]]:
        """Disjoint ranges from nested ``[start, end)`` ones (given as ``(start, -end, group)``):
        ``starts[i]`` begins a range owned by ``owners[i]``, up to the next start. Sorted by start,
        outer before inner, a network listed twice once (its first group by name), and a stack of
        the networks still open: where one ends, the one around it takes over."""
        entries.sort()
        starts: list[int] = [0]
        owners: list[str | None] = [None]

        def mark(at: int, who: str | None) -> None:
            if starts[-1] == at:
                owners[-1] = who  # the range since the last mark is empty: this one replaces it
            else:
                starts.append(at)
                owners.append(who)

        def close(before: int) -> None:
            while open_ and open_[-1][0] <= before:
                ended = open_.pop()[0]
                mark(ended, open_[-1][1] if open_ else None)

        open_: list[tuple[int, str]] = []  # (end, owner), innermost last
        last = (-1, 0)
        for start, negative_end, who in entries:
            if (start, negative_end) == last:
                continue  # the same network in another group, later by name
            last = (start, negative_end)
            self.size += 1
            close(start)
            open_.append((-negative_end, who))
            mark(start, who)
        close(2**128)
        return starts, owners
