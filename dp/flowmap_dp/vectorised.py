"""The per-block reader: numpy over a whole TPACKET_V3 block, the session table touched once per
flow per block.

1. Walk the ``tp_next_offset`` chain (the only per-packet Python: one index and one add).
2. Gather the header fields of every frame at once (big-endian 16-bit view of the block: the
   kernel puts frames at even offsets, and every field we read is at an even distance).
3. Frames of the common shape — Ethernet, up to two VLAN tags, IPv4 unfragmented / IPv6 without
   extension headers, TCP or UDP with the whole L4 header captured — take the fast path.
   Everything else (ICMP, fragments, extension headers, PPPoE, raw IP from a tunnel without a
   link header, malformed) is decoded one by one, in arrival order, by the table's
   ``Fragments.decode``, the same code the per-packet reader runs (fragments never take the fast
   path, so the fragment table sees the same frames in the same order in both readers).
4. Fast frames are grouped by canonical flow: a stable sort on a hash, then exact comparison of
   every key column, so a hash collision can only split a group, never merge two flows.
5. Groups are applied in order of their last packet (so the table's recency order ends as the
   per-packet reader leaves it). A run of packets is added in one go when the session exists,
   the run has no SYN/FIN/RST (the packets of such a run change a TCP state at most from the
   handshake to OPEN, which the run does once), and the application is decided or the run carries no
   payload. Other packets — a new session, TCP flag changes, payloads for the slow path — are
   replayed one by one through ``SessionTable.packet``; the rest of the group is added in one
   go again once the session allows it.

The result equals ``block.feed_block`` on the same block (a test holds them to it), except for
which session is evicted when the table's bound is hit in the middle of a block.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np
import numpy.typing as npt

from flowmap_dp.block import BLOCK_DESC_SIZE, TP_STATUS_VLAN_VALID, block_packets, feed_block
from flowmap_dp.decode import LINK_ETHERNET, LINK_RAW, Decoded, decode, flow_key
from flowmap_dp.session import DNS_NEW_LOOKUP, OPEN, Session, SessionTable

OPENING_WINDOW = 16  # packets within which a session's late-read opening is still looked for

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Bools = npt.NDArray[np.bool_]

_KEY4 = np.dtype([("p", "u1"), ("v", ">u2"), ("a", ">u4"), ("ap", ">u2"), ("b", ">u4"), ("bp", ">u2")])
_KEY6 = np.dtype([("p", "u1"), ("v", ">u2"), ("ah", ">u8"), ("al", ">u8"), ("ap", ">u2"),
                  ("bh", ">u8"), ("bl", ">u8"), ("bp", ">u2")])
_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9)


def feed_block_vectorised(block: bytes | memoryview, table: SessionTable) -> int:
    """Per-block reader: same effect on ``table`` as ``feed_block``; returns frames seen."""
    mv = memoryview(block).cast("B")
    size = len(mv)
    if size < BLOCK_DESC_SIZE or size & 7:
        return feed_block(mv, table)
    n, first = block_packets(mv)
    n = min(n, size // 48)  # a garbage count must not spin the walk
    if n == 0:
        return 0
    offs = _walk(mv, first, n)
    if offs is None:
        return feed_block(mv, table)
    _Block(mv, offs, table).run()
    return n


def _walk(mv: memoryview, first: int, n: int) -> I64 | None:
    """Header offsets along the ``tp_next_offset`` chain; None for a chain no kernel makes
    (unaligned, a zero link before the end, a header past the block)."""
    found = _scan(mv, first, n)
    if found is not None:
        return found
    u32 = mv.cast("I")
    offs: list[int] = []
    push = offs.append
    off = first
    try:
        for _ in range(n):
            push(off)
            off += u32[off >> 2]
    except IndexError:
        return None
    o = np.array(offs, dtype=np.int64)
    if (o & 3).any() or int(o[-1]) + 48 > len(mv):
        return None
    if n > 1 and (np.frombuffer(mv, dtype="<u4")[o[:-1] >> 2] == 0).any():
        return None
    return o


def _scan(mv: memoryview, first: int, n: int) -> I64 | None:
    """The chain without walking it: every header of a ring has the same (tp_mac, tp_net) word
    and sits at an 8-byte boundary, so look for that word at every boundary, then prove the
    candidates are exactly the chain (first is first, each links to the next, n of them).
    Payload bytes that mimic a header only make the proof fail: the caller walks instead."""
    if first & 7 or n < 2:
        return None
    words = np.frombuffer(mv, dtype="<u4")
    (blk_len,) = np.frombuffer(mv[20:24], dtype="<u4")
    stop = min(int(blk_len), len(mv)) - 48  # the kernel's blk_len ends the last packet
    if stop < first:
        return None
    marks = words[(first + 24) >> 2 : ((stop + 24) >> 2) + 1 : 2]
    pos = first + 8 * np.flatnonzero(marks == marks[0])
    if len(pos) != n:
        return None
    links = words[pos[:-1] >> 2].astype(np.int64)
    if not np.array_equal(pos[:-1] + links, pos[1:]):
        return None
    return pos



def awaits_opening(s: Session) -> bool:
    """A young session whose opening packet was not read yet: it may come late, from another
    ring, and only the per-packet path notices it. Older ones were picked up mid-stream (after a
    restart, say) and keep the fast path; a DNS session waits for each new lookup's query."""
    return not s.opening_seen and (s.pkts_c2s + s.pkts_s2c < OPENING_WINDOW or s.app == "dns")

class _Block:
    """One block's frames as column arrays, and the work of applying them to the table."""

    def __init__(self, mv: memoryview, o: I64, table: SessionTable) -> None:
        self.mv = mv
        self.table = table
        words = np.frombuffer(mv, dtype="<u4")
        q = o >> 2
        self.start = o + (words[q + 6] & 0xFFFF)
        self.raw = (words[q + 6] & 0xFFFF) == (words[q + 6] >> 16)  # tp_net == tp_mac: no link header
        self.end = np.minimum(self.start + words[q + 3], len(mv))
        self.wire = words[q + 4]
        self.hint = np.where(words[q + 5] & TP_STATUS_VLAN_VALID, words[q + 8] & 0xFFF, 0).astype(np.int64)
        self.ts = words[q + 1].astype(np.float64) + words[q + 2].astype(np.float64) * 1e-9
        self.h16 = np.frombuffer(mv, dtype=">u2") if not (self.start & 1).any() else None
        self.ev_at: list[int] | None = None  # sorted positions of SYN/FIN/RST packets
        self.pay_at: list[int] = []  # sorted positions of payload-carrying packets

    def g(self, at: I64) -> I64:
        """The big-endian 16-bit words at byte offsets ``at`` (clipped: garbage in, no crash)."""
        assert self.h16 is not None
        return self.h16.take(at >> 1, mode="clip").astype(np.int64)

    def decode_one(self, i: int) -> Decoded | str:
        """``decode`` of frame ``i``, exactly as the per-packet reader calls it."""
        return decode(self.mv, self.start.item(i), self.end.item(i), LINK_RAW if self.raw.item(i) else LINK_ETHERNET,
                      self.hint.item(i), self.wire.item(i))

    def decode_slow(self, i: int) -> Decoded | str:
        """``decode_one`` through the table's fragment tracking, as the per-packet reader decodes."""
        return self.table.fragments.decode(
            self.mv, self.start.item(i), self.end.item(i), LINK_RAW if self.raw.item(i) else LINK_ETHERNET,
            self.hint.item(i), self.wire.item(i), self.ts.item(i))

    def ts_of(self, i: int) -> float:
        return self.ts.item(i)

    def run(self) -> None:
        table = self.table
        if self.h16 is None:  # an odd frame offset: no kernel does it, but stay exact
            slow = np.arange(len(self.start))
            fast = np.zeros(0, dtype=np.int64)
        else:
            fast, slow = self.classify()
        stats = table.stats
        stats.total += len(fast)
        stats.decoded += len(fast)
        odd: dict[bytes, list[tuple[int, Decoded]]] = {}
        for i in slow.tolist():
            out = self.decode_slow(i)
            stats.count(out)
            if type(out) is not str:
                d: Decoded = out  # type: ignore[assignment]
                key, _ = flow_key(d.proto, d.vlan, d.src, d.sport, d.dst, d.dport)
                odd.setdefault(key, []).append((i, d))
        if len(fast):
            self.groups(fast, odd)
        for extra in sorted(odd.values(), key=lambda e: e[-1][0]):
            self.replay([], extra)

    def replay(self, idx: list[int], extra: list[tuple[int, Decoded]]) -> None:
        """Feed frames one by one, in arrival order, through the per-packet table update."""
        known = dict(extra)
        for i in sorted(set(idx) | known.keys()):
            d = known.get(i) or self.decode_one(i)
            if type(d) is not str:  # always Decoded for fast-path frames; checked, not assumed
                self.table.packet(d, self.ts_of(i), self.mv)  # type: ignore[arg-type]

    def classify(self) -> tuple[I64, I64]:
        """Step 2 and 3: header fields, and which frames are of the common shape."""
        g = self.g
        start, end = self.start, self.end
        et = g(start + 12)
        l3 = start + 14
        vid = self.hint
        for _ in range(2):
            tag = (et == 0x8100) | (et == 0x88A8) | (et == 0x9100)
            if not tag.any():
                break
            vid = np.where(tag, g(l3) & 0xFFF, vid)
            et = np.where(tag, g(l3 + 2), et)
            l3 = l3 + tag * 4
        is4 = et == 0x0800
        w0 = g(l3)
        ihl = ((w0 >> 8) & 0xF) * 4
        tot = g(l3 + 2)
        w6 = g(l3 + 6)
        ip_len = np.where(is4, tot, 40 + g(l3 + 4))
        proto = np.where(is4, g(l3 + 8) & 0xFF, w6 >> 8)
        l4 = l3 + np.where(is4, ihl, 40)
        stop = np.minimum(end, l3 + ip_len)
        tcp = proto == 6
        tw = g(l4 + 12)
        hlen = np.where(tcp, (tw >> 12) * 4, 8)
        ok = (is4 & (w0 >> 12 == 4) & (ihl >= 20) & (tot >= ihl) & ((w6 & 0x3FFF) == 0)) | (
            (et == 0x86DD) & (w0 >> 12 == 6) & (ip_len > 40))
        ok &= (tcp | (proto == 17)) & (stop - l4 >= np.where(tcp, 20, 8)) & (hlen >= 8)
        ok &= ~tcp | (hlen >= 20)
        ok &= ~self.raw
        fast = np.flatnonzero(ok)
        self.f_l3, self.f_l4, self.f_proto, self.f_vid = l3[fast], l4[fast], proto[fast], vid[fast]
        self.f_is6, self.f_len = ~is4[fast], ip_len[fast]
        self.f_event = tcp[fast] & ((tw[fast] & 0x07) != 0)  # FIN, SYN or RST
        self.f_payload = stop[fast] > l4[fast] + hlen[fast]
        return fast, np.flatnonzero(~ok)

    def groups(self, fast: I64, odd: dict[bytes, list[tuple[int, Decoded]]]) -> None:
        """Step 4 and 5."""
        g = self.g
        m = len(fast)
        l3, l4, is6 = self.f_l3, self.f_l4, self.f_is6
        sp, dp = g(l4), g(l4 + 2)
        s_hi, d_hi = np.zeros(m, dtype=np.uint64), np.zeros(m, dtype=np.uint64)
        s_lo = ((g(l3 + 12) << 16) | g(l3 + 14)).astype(np.uint64)
        d_lo = ((g(l3 + 16) << 16) | g(l3 + 18)).astype(np.uint64)
        if is6.any():
            w = np.flatnonzero(is6)
            b = l3[w]
            s_hi[w], s_lo[w], d_hi[w], d_lo[w] = self.word64(b + 8), self.word64(b + 16), self.word64(
                b + 24), self.word64(b + 32)
        fwd = (s_hi < d_hi) | ((s_hi == d_hi) & ((s_lo < d_lo) | ((s_lo == d_lo) & (sp <= dp))))
        a_hi, a_lo = np.where(fwd, s_hi, d_hi), np.where(fwd, s_lo, d_lo)
        b_hi, b_lo = np.where(fwd, d_hi, s_hi), np.where(fwd, d_lo, s_lo)
        # Ports (32 bits) and family/protocol/VLAN (21 bits) share one column.
        meta = (is6.astype(np.int64) << 20) | (self.f_proto << 12) | self.f_vid
        pm = ((meta << 32) | np.where(fwd, (sp << 16) | dp, (dp << 16) | sp)).astype(np.uint64)
        h = (a_lo * _M1) ^ (b_lo * _M2) ^ (pm * _M3)
        cols = [h, a_lo, b_lo, pm]
        if is6.any():
            h ^= (a_hi * _M2) ^ (b_hi * _M1)
            cols += [a_hi, b_hi]
        order = np.argsort(h, kind="stable")
        brk = np.zeros(m, dtype=bool)
        brk[0] = True
        for col in cols:
            c = col[order]
            brk[1:] |= c[1:] != c[:-1]
        st = np.flatnonzero(brk)
        en = np.append(st[1:], m)
        lasts = order[en - 1]
        keys = _keys(order[st], is6, self.f_proto, self.f_vid, a_hi, a_lo, b_hi, b_lo, pm)
        # Cumulative sums over the sorted packets (leading 0): any run [p, q) of a group sums
        # as c[q] - c[p].
        fwd_s, len_s = fwd[order], self.f_len[order]
        c_pf = np.concatenate(([0], np.cumsum(fwd_s)))
        c_bf = np.concatenate(([0], np.cumsum(np.where(fwd_s, len_s, 0))))
        c_b = np.concatenate(([0], np.cumsum(len_s)))
        c_ev = np.concatenate(([0], np.cumsum(self.f_event[order])))
        c_pay = np.concatenate(([0], np.cumsum(self.f_payload[order])))
        self.sorted_idx, self.ts_s = fast[order], self.ts[fast[order]]
        self.c_pf, self.c_bf, self.c_b, self.c_ev, self.c_pay = c_pf, c_bf, c_b, c_ev, c_pay
        cnt = en - st
        pk_f = c_pf[en] - c_pf[st]
        by_f = c_bf[en] - c_bf[st]
        pk_fl, pk_rl = pk_f.tolist(), (cnt - pk_f).tolist()
        by_fl, by_rl = by_f.tolist(), (c_b[en] - c_b[st] - by_f).tolist()
        ev_l, pay_l = (c_ev[en] > c_ev[st]).tolist(), (c_pay[en] > c_pay[st]).tolist()
        ts_l, st_l, en_l = self.ts[fast[lasts]].tolist(), st.tolist(), en.tolist()

        sessions = self.table.sessions
        get = sessions.get
        touch = sessions.move_to_end
        dirty = self.table._dirty
        for gi in self.plan(np.argsort(lasts, kind="stable").tolist(), fast[lasts].tolist(), keys, odd):
            if isinstance(gi, bytes):  # a flow only the per-packet decoder could parse
                self.replay([], odd.pop(gi))
                continue
            key = keys[gi]
            s = get(key)
            if s is not None and pay_l[gi] and s.insp is False and s.app == "dns" and (
                    ts_l[gi] - s.last > DNS_NEW_LOOKUP):
                # Perhaps a new lookup on a reused DNS 5-tuple: the per-packet path sees it.
                self.replay(self.sorted_idx[st_l[gi]:en_l[gi]].tolist(), odd.pop(key, []) if odd else [])
                continue
            # The per-packet path for new sessions, flags, payload to inspect, and young sessions
            # whose opening is not seen yet (its packet may come late, from another ring).
            if s is None or ev_l[gi] or (pay_l[gi] and s.insp is not False) or (odd and key in odd) or (
                    awaits_opening(s)):
                self.mixed(key, st_l[gi], en_l[gi], odd.pop(key, []) if odd else [])
                continue
            touch(key)
            if s.state < OPEN:  # a packet without SYN/FIN/RST completes the handshake (as _tcp)
                s.state = OPEN
            if s.a_is_client:
                s.pkts_c2s += pk_fl[gi]
                s.bytes_c2s += by_fl[gi]
                s.pkts_s2c += pk_rl[gi]
                s.bytes_s2c += by_rl[gi]
            else:
                s.pkts_s2c += pk_fl[gi]
                s.bytes_s2c += by_fl[gi]
                s.pkts_c2s += pk_rl[gi]
                s.bytes_c2s += by_rl[gi]
            if ts_l[gi] > s.last:  # another ring's packets may have been newer
                s.last = ts_l[gi]
            if not s.dirty:
                s.dirty = True
                dirty[id(s)] = s

    @staticmethod
    def plan(g_order: list[int], g_last: list[int], keys: list[bytes],
             odd: dict[bytes, list[tuple[int, Decoded]]]) -> list[int | bytes]:
        """Groups (by index) and odd-only flows (by key) in order of each flow's last frame,
        counting the frames of a flow that only the per-packet decoder could parse."""
        if not odd:
            return g_order  # type: ignore[return-value]
        units: list[tuple[int, int, int | bytes]] = []
        for gi in g_order:
            extra = odd.get(keys[gi])
            units.append((max(g_last[gi], extra[-1][0]) if extra else g_last[gi], 0, gi))
        grouped = set(keys)
        units += [(extra[-1][0], 1, key) for key, extra in odd.items() if key not in grouped]
        units.sort(key=lambda u: u[0])
        return [unit for _, _, unit in units]

    def word64(self, at: I64) -> U64:
        g = self.g
        return ((g(at) << 48) | (g(at + 2) << 32) | (g(at + 4) << 16) | g(at + 6)).astype(np.uint64)

    def mixed(self, key: bytes, p: int, end: int, extra: list[tuple[int, Decoded]]) -> None:
        """A group that needs per-packet work somewhere: replay packets one by one until the
        session allows adding the rest of a run in one go (sorted positions ``p`` to ``end``)."""
        if extra:  # frames of this flow the fast path could not parse: keep strict order
            self.replay(self.sorted_idx[p:end].tolist(), extra)
            return
        table = self.table
        if self.ev_at is None:
            self.ev_at = np.flatnonzero(np.diff(self.c_ev)).tolist()
            self.pay_at = np.flatnonzero(np.diff(self.c_pay)).tolist()
        ev_at, pay_at = self.ev_at, self.pay_at
        while p < end:
            s = table.sessions.get(key)
            if s is not None and not awaits_opening(s):  # else its opening may be in this run
                k = bisect_left(ev_at, p)
                q = min(ev_at[k], end) if k < len(ev_at) else end  # [p, q) has no SYN/FIN/RST ...
                if s.insp is not False:
                    k = bisect_left(pay_at, p)  # ... and, while the app is undecided, no payload
                    q = min(q, pay_at[k]) if k < len(pay_at) else q
                if q > p:
                    self.add_run(s, p, q)
                    p = q
                    continue
            i = self.sorted_idx.item(p)
            d = self.decode_one(i)
            if type(d) is not str:
                self.table.packet(d, self.ts_of(i), self.mv)  # type: ignore[arg-type]
            p += 1

    def add_run(self, s: Session, p: int, q: int) -> None:
        if s.state < OPEN:  # a packet without SYN/FIN/RST completes the handshake (as _tcp)
            s.state = OPEN
        c_pf, c_bf, c_b = self.c_pf, self.c_bf, self.c_b
        pf, bf = c_pf.item(q) - c_pf.item(p), c_bf.item(q) - c_bf.item(p)
        pr, br = q - p - pf, c_b.item(q) - c_b.item(p) - bf
        if s.a_is_client:
            s.pkts_c2s += pf
            s.bytes_c2s += bf
            s.pkts_s2c += pr
            s.bytes_s2c += br
        else:
            s.pkts_s2c += pf
            s.bytes_s2c += bf
            s.pkts_c2s += pr
            s.bytes_c2s += br
        s.last = self.ts_s.item(q - 1)
        self.table.sessions.move_to_end(s.key)
        if not s.dirty:
            s.dirty = True
            self.table._dirty[id(s)] = s


def _keys(firsts: I64, is6: Bools, proto: I64, vid: I64, a_hi: U64, a_lo: U64, b_hi: U64, b_lo: U64,
          pm: U64) -> list[bytes]:
    """The ``flow_key`` bytes of each group, built in two numpy record arrays (IPv4, IPv6)."""
    six = is6[firsts]
    keys: list[bytes] = [b""] * len(firsts)
    for want, dt in ((False, _KEY4), (True, _KEY6)):
        sel = np.flatnonzero(six == want)
        if not len(sel):
            continue
        f = firsts[sel]
        rec = np.empty(len(sel), dtype=dt)
        rec["p"] = proto[f]
        rec["v"] = vid[f]
        rec["ap"] = (pm[f] >> np.uint64(16)) & np.uint64(0xFFFF)
        rec["bp"] = pm[f] & np.uint64(0xFFFF)
        if want:
            rec["ah"], rec["al"], rec["bh"], rec["bl"] = a_hi[f], a_lo[f], b_hi[f], b_lo[f]
        else:
            rec["a"], rec["b"] = a_lo[f], b_lo[f]
        raw = rec.tobytes()
        w = dt.itemsize
        for j, gi in enumerate(sel.tolist()):
            keys[gi] = raw[j * w : j * w + w]
    return keys
