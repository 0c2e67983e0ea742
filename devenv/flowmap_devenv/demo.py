"""``flowmap demo``: the main job, run by ``make demo``.

Today it brings up the local control plane with the CRDs, applies the samples and prints the
map's three tables. The simulated cluster with live traffic joins it as the agent lands.
"""

from __future__ import annotations

import argparse
import sys

from flowmap_devenv.controlplane import REPO, ControlPlane, ControlPlaneError


def run(args: argparse.Namespace) -> int:
    plane = ControlPlane(log=lambda line: print(line, file=sys.stderr))
    try:
        plane.up()
        plane.kubectl("create", "namespace", "shop", check=False)
        # The user-written kinds only: Connections and Group status come from the operator.
        for sample in ("group-cidr.yaml", "networklearningpolicy.yaml"):
            plane.kubectl("apply", "-f", str(REPO / "manifests" / "samples" / sample))
        tables = plane.kubectl("get", "groups,connections,nlp", "--all-namespaces").stdout
    except ControlPlaneError as exc:
        print(f"flowmap demo: {exc}", file=sys.stderr)
        return 1
    print("$ kubectl get groups,connections,nlp --all-namespaces")
    print(tables)
    print("The control plane keeps running. Point kubectl at it with:")
    print(plane.env())
    print("Stop it with: .venv/bin/flowmap controlplane down")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    """``flowmap demo`` takes no options yet."""
    parser.set_defaults(func=run)
