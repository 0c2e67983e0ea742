"""The slow path: application-protocol detection for one session.

The session table hands each payload-carrying packet of a session to its ``Inspector`` until
``feed`` returns True. The inspector keeps a bounded ``Flow`` (the first packets, at most
``STREAM_LIMIT`` bytes per direction), asks the candidate detectors (port-hinted first, then
registry order) until one says MATCH, forgets those that said NO or ran past their packet
budget, then lingers a few packets for metadata (DNS answers, HTTP status) and threat scanning
before it settles. A detector that raises is a bug: it is counted and dropped, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from flowmap_dp.detectors import candidates
from flowmap_dp.detectors.base import STREAM_LIMIT, Detector, Flow, Threat, Verdict
from flowmap_dp.threats import DEFAULT_SCANNERS, MAX_HITS, Bound

log = logging.getLogger(__name__)

UNKNOWN = "unknown"  # the client spoke and no detector knew its words
NO_VERDICT = ""  # the client's words were never seen and the server's matched nothing
# Payload packets one session may keep for detection and metadata, both directions together.
MAX_PACKETS = 24
# Server payload packets that wait for the client's first before detection runs on them.
SERVER_FIRST = 4


class Inspector:
    """Detects one session's application protocol from its first payload packets."""

    # One per session still being inspected (thousands at a time): no per-instance dict.
    __slots__ = ("flow", "app", "metadata", "threats", "errors", "_candidates", "_matched", "_lingered", "_bytes",
                 "_before_client", "_done", "_scanners", "_linger", "_scanner_linger")

    def __init__(self, l4: str, client_port: int, server_port: int,
                 scanners: Sequence[Bound] = DEFAULT_SCANNERS) -> None:
        self.flow = Flow(l4, client_port, server_port)
        self.app: str = UNKNOWN
        self.metadata: dict[str, Any] = {}
        self.threats: list[Threat] = []
        self.errors = 0  # detector exceptions caught (each one is a bug to fix)
        self._candidates: list[Detector] = candidates(l4, client_port, server_port)
        self._matched: Detector | None = None
        self._lingered = 0
        self._bytes = [0, 0]  # payload bytes kept: [server's, client's], indexed by from_client
        self._before_client = 0  # server payload packets read before the client's first
        self._done = False
        self._scanners = scanners  # flowmap_dp.threats: those of the matched protocol run once it settles
        self._linger = 0  # payload packets to linger after the match: the detector's or a scanner's, the most
        self._scanner_linger = 0  # the most a scanner of the matched protocol asks: the detector's settled waits

    @property
    def done(self) -> bool:
        """True once the inspector wants no more payload."""
        return self._done

    def feed(self, from_client: bool, payload: bytes, ts: float = 0.0) -> bool:
        """Take one payload packet of the session, captured at ``ts``; True once done (the caller
        stops feeding)."""
        if self._done:
            return True
        if not payload:
            return False
        if from_client:
            flow = self.flow
            if not self._bytes[True]:
                flow.client_first = ts
            if ts > flow.client_last:
                flow.client_last = ts
        room = STREAM_LIMIT - self._bytes[from_client]
        if room > 0:
            chunk = payload[:room]
            self._bytes[from_client] += len(chunk)
            if not self._bytes[True]:
                self._before_client += 1
            self.flow.add(from_client, chunk)
        elif self._matched is None:
            # One side is full and still nothing matched: more of the same will not help.
            self._conclude()
            return True
        if self._matched is None:
            # Until the client has spoken, the server's words wait (a few of them): the client's
            # packets may have entered the node on another interface, whose ring is read later.
            if self._bytes[True] or self._before_client > SERVER_FIRST:
                self._detect(final=False)
        else:
            self._lingered += 1
        if self._matched is not None:
            if self._finished_lingering():
                self._conclude()
        elif not self._candidates or self.flow.packets >= MAX_PACKETS:
            self._conclude()
        return self._done

    def waits(self, now: float) -> bool:
        """True while a scanner of the matched protocol wants this session's inspection to stay
        open at ``now`` though the session is idle (slowloris: a request head still incomplete,
        its timeout not reached). Asked only of idle sessions, once per report: ``now`` is kept
        (``Flow.quiet_at``), the last moment the scanners know the session in this state."""
        if self._done or self._matched is None:
            return False
        self.flow.quiet_at = now
        for scanner in self._scanners:
            if scanner.wait is not None and self.app in scanner.apps:
                try:
                    if scanner.wait(self.flow, self.app) > now:
                        return True
                except Exception:
                    self.errors += 1
        return False

    def judge_server_alone(self) -> bool:
        """The client's words are not coming: judge the server's now, not at the session's end.

        A session can hold only its server's half: the answers of a DNAT'd flow (a DNS lookup of
        the cluster DNS Service: the query went to the ClusterIP, the answer comes back from the
        pod, another 5-tuple until the node reverses the DNAT). The table calls this once the
        other rings had their time (see ``SessionTable.collect``). True once done."""
        if self._done or self._matched is not None or self._bytes[True] or not self._before_client:
            return self._done
        self._detect()
        if self._matched is not None and self._finished_lingering() or not self._candidates:
            self._conclude()
        return self._done

    def finish(self) -> None:
        """The session ended (or the capture did): settle the result with what was seen."""
        if not self._done:
            if self._matched is None and self._candidates and not self._bytes[True]:
                self._detect()  # the client never spoke: judge the server's words alone
            self._conclude()

    def _detect(self, final: bool = True) -> None:
        """Ask the candidates; keep those that may still match. Not ``final`` (a packet came and
        more may follow), a NO given to the server's words alone rules nothing out: the client's
        words may be in another ring, read later, and they are what most detectors know (a
        PostgreSQL server's first word is often "N", its answer to SSLRequest)."""
        keep: list[Detector] = []
        silent = not self._bytes[False]  # the server has not spoken
        waiting = not final and not self._bytes[True]  # the client has not spoken yet
        for det in self._candidates:
            if silent and det.needs_answer:
                verdict = Verdict.MORE
            else:
                try:
                    verdict = det.detect(self.flow)
                except Exception:  # a detector bug must not take the datapath down
                    self.errors += 1
                    log.debug("detector %s raised", det.name, exc_info=True)
                    continue
            if verdict is Verdict.MATCH:
                self._matched = det
                self.app = det.name
                self._scanner_linger = max([0, *(s.linger for s in self._scanners if det.name in s.apps)])
                self._linger = max(det.linger, self._scanner_linger)
                self._candidates = []
                self._extract()
                return
            # A detector's packet budget starts with the client's first word (or the last server
            # packet that waited for it).
            if verdict is Verdict.MORE and self.flow.packets - min(self._before_client, SERVER_FIRST) < det.max_packets:
                keep.append(det)
            elif verdict is Verdict.NO and waiting:
                keep.append(det)
        self._candidates = keep

    def _last_word(self) -> None:
        """The session is over: detectors still undecided that can judge a whole session (echo)
        say MATCH or not, in registry order."""
        for det in self._candidates:
            if det.conclude is None:
                continue
            try:
                verdict = det.conclude(self.flow)
            except Exception:
                self.errors += 1
                continue
            if verdict is Verdict.MATCH:
                self._matched = det
                self.app = det.name
                return

    def _finished_lingering(self) -> bool:
        det = self._matched
        assert det is not None
        if self._lingered >= self._linger or self.flow.packets >= MAX_PACKETS:
            return True
        # The detector's metadata may be complete (a TLS ServerHello seen), but a scanner that
        # asked for more (a heartbeat after the handshake) still gets its packets.
        if det.settled is not None and self._lingered >= self._scanner_linger:
            try:
                return det.settled(self.flow)
            except Exception:
                self.errors += 1
                return True
        return False

    def _extract(self) -> None:
        det = self._matched
        if det is None or det.extract is None:
            return
        try:
            self.metadata = dict(det.extract(self.flow))
        except Exception:
            self.errors += 1
            log.debug("extract of %s raised", det.name, exc_info=True)

    def _scan(self) -> None:
        for scanner in self._scanners:
            if self.app not in scanner.apps:
                continue
            try:
                found = list(scanner.scan(self.flow, self.app, self.metadata))
            except Exception:
                self.errors += 1
                log.debug("scanner %s raised", scanner.name, exc_info=True)
                continue
            for threat in found:
                if threat not in self.threats and len(self.threats) < MAX_HITS:
                    self.threats.append(threat)

    def _conclude(self) -> None:
        self._done = True
        if self._matched is None:
            self._last_word()
        if self._matched is None and not self._bytes[True]:
            # Only the server's words, and they match nothing: no verdict (NO_VERDICT). The client's
            # took another path: a DNAT'd session's reply half (its request half, under the
            # Service's address, is another session, which decides), or a session picked up after
            # the client spoke. "unknown" would say of the edge what is not known.
            self.app = NO_VERDICT
        self._candidates = []
        if self._matched is not None:
            self._extract()
            self._scan()
