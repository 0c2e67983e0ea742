"""``flowmap cluster up | down | status | env | load-image``: a real local cluster (flowmap_devenv.cluster)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from flowmap_devenv import binaries, images
from flowmap_devenv.cluster import CNIS, Cluster, ClusterError
from flowmap_devenv.controlplane import ControlPlaneError
from flowmap_devenv.nodes import NodeError


def _cluster(args: argparse.Namespace) -> Cluster:
    return Cluster(args.state_dir, log=lambda line: print(line, file=sys.stderr))


def _up(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    try:
        cluster.up(nodes=args.nodes, cni=args.cni)
    except BaseException:
        if not args.keep:
            cluster.down()
        raise
    print(cluster.env())
    return 0


def _down(args: argparse.Namespace) -> int:
    _cluster(args).down(force=True)  # also what a cluster whose state folder is gone left behind
    return 0


def _env(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if cluster.layout() is None:
        print(f"no cluster in {cluster.dir}: run 'flowmap cluster up'", file=sys.stderr)
        return 1
    print(cluster.env())
    return 0


def _status(args: argparse.Namespace) -> int:
    status = _cluster(args).status()
    print(json.dumps(status, indent=1))
    return 0 if status["running"] else 1


def _build(args: argparse.Namespace) -> int:
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    binaries.ensure_programs(binaries.CLUSTER, log)
    for name, built in images.Builder(log).all().items():
        print(f"{name}: {built.name} ({built.archive})")
    return 0


def _load_image(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if args.image == "flowmap":
        builder = images.Builder(lambda line: print(line, file=sys.stderr))
        built = builder.flowmap(builder.base())
        cluster.load_image(built.archive)
        print(built.name)
    else:
        cluster.load_image(Path(args.image))
    return 0


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (ClusterError, ControlPlaneError, NodeError, binaries.MissingTool, RuntimeError) as exc:
            print(f"flowmap cluster: {exc}", file=sys.stderr)
            return 1
    return run


def register(parser: argparse.ArgumentParser) -> None:
    """Add the cluster subcommands."""
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the cluster keeps its state (FLOWMAP_CLUSTER_DIR, default "
                             "~/.local/state/flowmap/cluster)")
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="build what is missing, start the cluster, print the KUBECONFIG export")
    up.add_argument("--nodes", type=int, default=2, help="how many nodes (default 2)")
    up.add_argument("--cni", choices=CNIS, default="ptp",
                    help="ptp: a host route per pod (kindnet, Calico); bridge-vxlan: a bridge and flannel's VXLAN")
    up.add_argument("--keep", action="store_true", help="leave a failed cluster up to look at")
    up.set_defaults(func=_guard(_up))
    load = sub.add_parser("load-image", help="import an image archive into every node (or 'flowmap': build "
                                             "the image from this tree and import it)")
    load.add_argument("image")
    load.set_defaults(func=_guard(_load_image))
    for name, func, help_text in (
        ("build", _build, "build (or find) the cluster's programs and images only"),
        ("down", _down, "stop everything and remove its state"),
        ("env", _env, "print the KUBECONFIG export"),
        ("status", _status, "print what runs (exit 1 unless every node is Ready)"),
    ):
        sub.add_parser(name, help=help_text).set_defaults(func=_guard(func))
