"""The dp as the agent's child (``FLOWMAP_AGENT_DP=child``): started, restarted, stopped with it.

It gets SIGTERM when the agent dies, however it dies, so a restarted agent never shares the rings
with an orphan. When it exits on its own it is restarted at once, then with backoff while it keeps
exiting: every moment without a dp is traffic not seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
import time
from collections.abc import Sequence

from flowmap_agent.settings import Settings
from flowmap_api.pacing import Backoff, pause

log = logging.getLogger("flowmap.agent")
PR_SET_PDEATHSIG = 1
STABLE = 60.0  # seconds a dp ran before it exited: a new failure, not a crash loop


async def supervise_dp(settings: Settings, local_addresses: Sequence[str], stop: asyncio.Event, grace: float) -> None:
    """Keep the dp running as a child (``python -m flowmap_dp``, the arguments of ``flowmap dp run``);
    restart it (with backoff) if it exits; at ``stop``, give it ``grace`` seconds to send its last
    report and exit.

    ``local_addresses`` are the node's own to start with (the Node object's, as the DaemonSet
    gives the external one): the dp counts what the node sends from them where it leaves (see
    ``flowmap_dp.capture``, "Direction"); the agent adds the rest at run time.
    """
    s = settings
    own = [arg for address in local_addresses for arg in ("--local-address", address)]
    backoff, at_once = Backoff(0.5, 30.0), True
    while not stop.is_set():
        started = time.monotonic()
        inside = ("ip", "netns", "exec", s.netns) if s.netns else ()
        proc = await asyncio.create_subprocess_exec(
            *inside, sys.executable, "-m", "flowmap_dp", "--socket", s.socket, "--interval", str(s.interval),
            "--workers", str(s.dp_workers), *own, *s.dp_args.split(), preexec_fn=_die_with_parent)
        waiter = asyncio.ensure_future(proc.wait())
        await asyncio.wait([waiter, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            proc.send_signal(signal.SIGTERM)  # its last report comes before it exits
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, grace)
            if not waiter.done():
                proc.kill()
            return
        if time.monotonic() - started > STABLE:
            backoff.reset()  # it ran well for a while: this is a new failure, not a crash loop
            at_once = True
        delay, at_once = (0.0 if at_once else backoff.next()), False  # at once, then back off
        log.error("the dp exited with %s; restarting in %.1f s", proc.returncode, delay)
        await pause(stop, delay)


def _die_with_parent() -> None:
    """In the dp child, before exec: SIGTERM when the agent dies, however it dies."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
