"""The names agents saw DNS answers give addresses: address → name, while the answer holds (pure).

An answer holds for its TTL plus a grace period (flowmap_operator.resolution), counted from when
the agent saw it. The table forgets what has expired, and holds at most ``limit`` addresses: past
that, the answers closest to expiring go first (the last names learned, the ones traffic is using,
stay; of answers expiring together, the one learned first goes). Each forgotten answer is counted
by why. A heap of (valid until, order learned, address) finds them; renewing an answer leaves its
old heap entry behind, so the heap is rebuilt when it holds twice as many entries as the table.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter

from flowmap_operator.naming import object_name


class NameTable:
    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._names: dict[str, tuple[str, float, str]] = {}  # ip -> (name, valid until, its group)
        # FQDN group -> its addresses: most names have one, kept as the string itself (a set costs 216 bytes).
        self._groups: dict[str, str | set[str]] = {}
        self._heap: list[tuple[float, int, str]] = []  # (valid until, order learned, ip), some stale
        self._order = itertools.count()
        self.forgotten: Counter[str] = Counter({"expired": 0, "full": 0})  # why (keys fixed: read by a scrape)

    def __len__(self) -> int:
        return len(self._names)

    def learn(self, ip: str, name: str, until: float, now: float) -> bool:
        """``ip`` is ``name`` until ``until``; True when that changes the name the address has."""
        self.expire(now)
        if until < now:
            return False  # expired already (a batch resent long after, a restart's old members)
        current = self._names.get(ip)
        if current is not None and current[1] >= until:
            return False
        changed = current is None or current[0] != name
        if current is not None and changed:
            self._drop_from_group(ip, current[2])
        group = current[2] if current is not None and not changed else object_name(name)
        group = name if group == name else group  # most names are their group's: one string, not two
        self._names[ip] = (name, until, group)
        held = self._groups.get(group)
        if held is None:
            self._groups[group] = ip
        elif isinstance(held, set):
            held.add(ip)
        elif held != ip:
            self._groups[group] = {held, ip}
        heapq.heappush(self._heap, (until, next(self._order), ip))
        while len(self._names) > self.limit:
            self._pop("full")
        if len(self._heap) > 2 * len(self._names) + 1024:
            live = {ip: until for ip, (_, until, _) in self._names.items()}
            self._heap = [entry for entry in self._heap if live.get(entry[2]) == entry[0]]
            heapq.heapify(self._heap)
        return changed

    def name_at(self, ip: str, when: float) -> str | None:
        """The name an answer gave ``ip``, if that answer still held at ``when``."""
        named = self._names.get(ip)
        return named[0] if named is not None and named[1] >= when else None

    def addresses(self, group: str, now: float) -> list[str]:
        """The addresses answers gave the names of an FQDN group, while they hold, sorted."""
        self.expire(now)
        held = self._groups.get(group)
        return [] if held is None else [held] if isinstance(held, str) else sorted(held)

    def expire(self, now: float) -> None:
        """Forget every answer that no longer holds at ``now``."""
        while self._heap and self._heap[0][0] < now:
            self._pop("expired")

    def _pop(self, why: str) -> None:
        until, _, ip = heapq.heappop(self._heap)
        current = self._names.get(ip)
        if current is None or current[1] != until:
            return  # renewed (a later entry stands for it) or gone: a stale entry
        del self._names[ip]
        self._drop_from_group(ip, current[2])
        self.forgotten[why] += 1

    def _drop_from_group(self, ip: str, group: str) -> None:
        held = self._groups.get(group)
        if held == ip:
            del self._groups[group]
        elif isinstance(held, set):
            held.discard(ip)
            if len(held) == 1:
                self._groups[group] = held.pop()
