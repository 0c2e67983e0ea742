"""``flowmap controlplane up | down | env | status``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from flowmap_devenv import binaries
from flowmap_devenv.controlplane import DEFAULT_CRDS, ControlPlane, ControlPlaneError


def _plane(args: argparse.Namespace) -> ControlPlane:
    return ControlPlane(args.state_dir, crds=args.crds, log=lambda line: print(line, file=sys.stderr))


def _up(args: argparse.Namespace) -> int:
    plane = _plane(args)
    plane.up()
    print(plane.env())
    return 0


def _down(args: argparse.Namespace) -> int:
    _plane(args).down()
    return 0


def _env(args: argparse.Namespace) -> int:
    plane = _plane(args)
    if plane.state() is None:
        print(f"no control plane in {plane.dir}: run 'flowmap controlplane up'", file=sys.stderr)
        return 1
    print(plane.env())
    return 0


def _status(args: argparse.Namespace) -> int:
    status = _plane(args).status()
    print(json.dumps(status, indent=1))
    return 0 if status["running"] else 1


def _build(args: argparse.Namespace) -> int:
    print(binaries.ensure(lambda line: print(line, file=sys.stderr)))
    return 0


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (ControlPlaneError, binaries.MissingTool) as exc:
            print(f"flowmap controlplane: {exc}", file=sys.stderr)
            return 1
    return run


def register(parser: argparse.ArgumentParser) -> None:
    """Add the controlplane subcommands."""
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the control plane keeps its state (FLOWMAP_CONTROLPLANE_DIR, "
                             "default ~/.local/state/flowmap/controlplane)")
    parser.add_argument("--crds", type=Path, default=DEFAULT_CRDS, help="folder of CRDs to install on 'up'")
    sub = parser.add_subparsers(dest="action", required=True)
    for name, func, help_text in (
        ("up", _up, "start etcd and kube-apiserver, install the CRDs, print the KUBECONFIG export"),
        ("down", _down, "stop both and remove their state"),
        ("env", _env, "print the KUBECONFIG export"),
        ("status", _status, "print what runs where (exit 1 when not running)"),
        ("build", _build, "build (or find) the control-plane binaries only"),
    ):
        sub.add_parser(name, help=help_text).set_defaults(func=_guard(func))
