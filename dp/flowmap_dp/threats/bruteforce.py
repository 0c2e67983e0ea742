"""auth-brute-force: failed database logins at a high rate, per client and server.

Each session's refused logins are counted by its protocol's detector, from the server's words,
into its metadata as ``auth_failures``:

- ``mysql`` (MySQL, MariaDB): ERR packets with error 1045 (access denied: user or password) or
  1044 (access to the database denied);
- ``postgresql``: ErrorResponse with SQLSTATE 28P01 (invalid password) or 28000 (invalid
  authorization: no pg_hba.conf entry, unknown role);
- ``redis``: ``-WRONGPASS`` (Redis 6+) and ``-ERR invalid password`` (before 6) replies; a session
  told only ``-NOAUTH`` (a command without a login) counts one.

Rule: a **watch** over every session's report adds each session's failures, at the session's
own ``last_seen`` (offline: the capture's time), to its (client address, server address, server
port) pair. When the failures of the last ``window`` seconds (default 60) reach ``failures``
(default 10), the session that brought them there is marked, once: the pair fires again only
after it calmed down, a window with at most ``calm`` failures (default 3). A user who mistypes a
password and then logs in makes one failure and never fires; a client retrying with no or a wrong
password at every start of a crash loop (one try every 10 s or more) stays under the default.
At most ``_MAX_PAIRS`` pairs are followed; the longest idle is forgotten first.

What it cannot see: logins inside TLS (PostgreSQL and MySQL after SSL, Redis over TLS); failures
after the inspector's first packets of a session (a client retrying on one connection: Redis
AUTH, PostgreSQL never, MySQL COM_CHANGE_USER); a guessing campaign spread over many clients
(each pair is counted apart); other protocols' logins.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from flowmap_dp.detectors.base import Threat
from flowmap_dp.threats.base import WITH_METADATA, Limits, Seen, Watcher

NAME = "auth-brute-force"
APPS = frozenset({"mysql", "postgresql", "redis"})
LIMITS: Limits = {"failures": 10.0, "window": 60.0, "calm": 3.0}
_MAX_PAIRS = 4096
_PER_SESSION = 64  # failures one session may add (the detectors count at most 32 messages)

Pair = tuple[bytes, bytes, int]


class Failures:
    """The watch's state in one packet loop (see the module docstring)."""

    def __init__(self, limits: Limits) -> None:
        self.limit = max(1, int(limits["failures"]))
        self.window = limits["window"]
        self.calm = limits["calm"]
        self.times: OrderedDict[Pair, deque[float]] = OrderedDict()  # failure times, oldest first
        self.firing: set[Pair] = set()

    def observe(self, session: Seen, now: float) -> Sequence[Threat]:
        if session.app not in APPS or not session.metadata:
            return []
        failed = (session.metadata.get(session.app) or {}).get("auth_failures")
        if not isinstance(failed, int) or failed <= 0:
            return []
        key = (session.client, session.server, session.server_port)
        times = self.times.pop(key, None)
        if times is None:
            times = deque(maxlen=2 * self.limit)
            while len(self.times) >= _MAX_PAIRS:
                old, _ = self.times.popitem(last=False)
                self.firing.discard(old)
        self.times[key] = times
        t = session.last_seen
        horizon = t - self.window
        # A settled episode calms down when the window before this session held at most ``calm``.
        while times and times[0] < horizon:
            times.popleft()
        if key in self.firing and len(times) <= self.calm:
            self.firing.discard(key)
        times.extend([t] * min(failed, _PER_SESSION))
        if key in self.firing or len(times) < self.limit:
            return []
        self.firing.add(key)
        snippet = f"{len(times)} refused {session.app} logins within {self.window:g} s"
        return [Threat(NAME, snippet, f"{session.app}.auth")]


WATCHER = Watcher(NAME, Failures, LIMITS, sees=WITH_METADATA)
