"""``flowmap demo``: the main job, run by ``make demo``.

Starts a control plane of its own and the simulated cluster (flowmap_devenv.simcluster): two
nodes, a small shop with live traffic, flowmap's operator and an agent per node; then shows
``kubectl get groups,connections`` filling up, every few seconds, until Ctrl-C (or --duration).
On the way out it removes every namespace, interface, file and process it made.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from flowmap_devenv.controlplane import ControlPlane, ControlPlaneError
from flowmap_devenv.simcluster import API, WEB, WORKER, SimCluster


def _say(line: str) -> None:
    print(f"flowmap demo: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        _say("the simulated cluster needs root (network namespaces, AF_PACKET, nftables)")
        return 1
    folder = Path(tempfile.mkdtemp(prefix="flowmap-demo-"))
    plane = ControlPlane(folder / "controlplane", log=_say)
    sim = SimCluster(plane, folder / "cluster", say=_say)
    # SIGTERM ends the demo as Ctrl-C does: through the clean-up below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        plane.up()
        sim.up()
        for pod in (WEB, API, WORKER, None):  # None: the kubelet's probe of the api
            sim.traffic(pod, rounds=0, pause=args.pause)
        _say(f"the shop is busy; to look around: export KUBECONFIG={plane.kubeconfig}")
        end = time.monotonic() + args.duration if args.duration else None
        while end is None or time.monotonic() < end:
            tables = plane.kubectl("get", "groups,connections", check=False).stdout
            print(f"\n$ kubectl get groups,connections    # {time.strftime('%H:%M:%S')}, Ctrl-C to stop", flush=True)
            print(tables, end="", flush=True)
            time.sleep(args.every)
    except KeyboardInterrupt:
        pass
    except (ControlPlaneError, RuntimeError, OSError) as exc:
        _say(f"failed: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        _say("cleaning up: processes, namespaces, the control plane")
        try:
            sim.down()
        finally:
            plane.down(quiet=True)
            shutil.rmtree(folder, ignore_errors=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--every", type=float, default=5.0, help="seconds between two looks at the map")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between two rounds of the shop's calls")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: at Ctrl-C)")
    parser.set_defaults(func=run)
