"""``flowmap demo``: the main job, run by ``make demo``.

flowmap as users run it: a real two-node cluster on this machine (flowmap_devenv.cluster:
kubelets, containerd, a CNI, CoreDNS), flowmap's image built from the Dockerfile and installed
from its manifests as the README says, and the demo shop as real pods with live traffic; then
``kubectl get groups,connections`` every few seconds as the map fills up, until Ctrl-C (or
--duration). On the way out it removes everything it made: processes, namespaces, cgroups,
mounts, files.
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

from flowmap_devenv import images
from flowmap_devenv.cluster import CNIS, Cluster


def _say(line: str) -> None:
    print(f"flowmap demo: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        _say("the cluster needs root (network namespaces, cgroups, containerd, AF_PACKET)")
        return 1
    folder = Path(tempfile.mkdtemp(prefix="flowmap-demo-"))
    cluster = Cluster(folder / "cluster", log=_say)
    # SIGTERM ends the demo as Ctrl-C does: through the clean-up below. So does SIGINT even when
    # the demo was started with it ignored (Python then keeps it ignored), as a shell's background
    # job (`flowmap demo &`) is: `kill -INT` would otherwise leave the cluster running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cluster.up(nodes=2, cni=args.cni)
        _say("flowmap, as the README installs it")
        cluster.install_flowmap(images.NAMES["flowmap"])
        _say("the shop: redis, postgres, api, web, worker")
        cluster.deploy_shop(rounds=0, pause=args.pause)
        _say(f"the shop is busy; to look around: export KUBECONFIG={cluster.kubeconfig}")
        end = time.monotonic() + args.duration if args.duration else None
        while end is None or time.monotonic() < end:
            tables = cluster.kubectl("get", "groups,connections", check=False).stdout
            print(f"\n$ kubectl get groups,connections    # {time.strftime('%H:%M:%S')}, Ctrl-C to stop", flush=True)
            print(tables, end="", flush=True)
            time.sleep(args.every)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 - whatever failed, the clean-up below runs and the reason shows
        _say(f"failed: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        started = time.monotonic()
        _say("cleaning up: the cluster's processes, namespaces, cgroups and files")
        try:
            cluster.down()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            _say(f"cleaned up in {time.monotonic() - started:.1f} s")
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cni", choices=CNIS, default="bridge-vxlan",
                        help="bridge-vxlan: a bridge and flannel's VXLAN (default); ptp: a host route per pod")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between two looks at the map")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between two rounds of the shop's calls")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: at Ctrl-C)")
    parser.set_defaults(func=run)
