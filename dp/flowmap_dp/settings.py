"""What ``flowmap dp run`` is told, read once, and the one place its defaults and bounds live: the
command line (:mod:`flowmap_dp.cli`) shows and uses these defaults, the code these values.

The dp reads no environment: it is started with flags, by the agent as its child
(``flowmap_agent.running``: the socket, the interval, the workers, the node's addresses and
``FLOWMAP_AGENT_DP_ARGS``) or by the DaemonSet ``flowmap-dp``; what the flags leave out is the
default here. The ring's own shape and its bounds are :class:`flowmap_dp.capture.RingConfig`'s.
The defaults used to be written twice and disagreed (32 reports queued on the command line, 8 in
the code); 32, what every dp started from the command line queued, is the one kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowmap_dp import threats
from flowmap_dp.capture import RingConfig

PARSERS = ("compiled", "per-packet")  # block reader and session table: compiled, or the Python reference


@dataclass(frozen=True)
class Settings:
    """Everything ``flowmap dp run`` was told, read once; a value out of bounds is refused here,
    naming the flag that sets it."""

    interfaces: tuple[str, ...]
    socket_path: str
    interval: float = 1.0  # seconds between reports
    workers: int = 1  # packet loops, one process each
    ring: RingConfig = field(default_factory=RingConfig)
    max_sessions: int = 200_000  # per worker
    queue_size: int = 32  # reports waiting for the agent (while it restarts, say) before they are dropped
    queue_sessions: int = 200_000  # session records waiting for the writer, all reports together
    part_size: int = 20_000  # session records per frame: keeps frames far below MAX_FRAME
    parser: str = "compiled"  # one of PARSERS
    run_id: int = 0  # 0: pick a random one
    # Packet captures on demand (worker 0, flowmap_dp.demand): where their files go, the bytes
    # all of them may hold on the node's disk, and how many may be armed or running at once.
    capture_dir: str = "/var/lib/flowmap/captures"
    capture_disk_bytes: int = 256 << 20
    max_captures: int = 4
    threats: threats.Config = field(default_factory=threats.Config)  # detections off, thresholds changed

    def __post_init__(self) -> None:
        # A queue of 0 would be unbounded (queue.Queue), an interval of 0 a busy loop.
        if not self.interval > 0:
            raise ValueError(f"--interval must be above 0, not {self.interval}")
        for flag, value in (("--workers", self.workers), ("--max-sessions", self.max_sessions),
                            ("--queue", self.queue_size), ("queue_sessions", self.queue_sessions),
                            ("part_size", self.part_size)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, not {value}")
        if self.parser not in PARSERS:
            raise ValueError(f"unknown parser {self.parser!r}: one of {', '.join(PARSERS)}")
        if self.capture_disk_bytes < 0 or self.max_captures < 0:
            raise ValueError("--capture-disk-bytes and --max-captures cannot be negative")
