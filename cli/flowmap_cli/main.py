"""The one ``flowmap`` command: each component adds its own subcommands.

Components are imported only when their subcommand runs, so ``flowmap dp classify`` never loads
Kubernetes or gRPC code, and a missing optional system tool only hurts the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module providing ``register(subparsers)``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("flowmap_agent.cli", "the node agent: ties sessions to pods and reports them to the operator"),
    "capture": ("flowmap_cli.capture", "packet captures: start, list, stop, delete, and get their files"),
    "cluster": ("flowmap_devenv.cluster_cli", "a real local cluster: kubelets, containerd, a CNI, CoreDNS"),
    "controlplane": ("flowmap_devenv.controlplane_cli", "run a local etcd + kube-apiserver with the flowmap CRDs"),
    "demo": ("flowmap_devenv.demo", "the local demo: control plane, flowmap, and the map it learns"),
    "dp": ("flowmap_dp.cli", "the datapath: capture, sessions, protocol detection"),
    "export": ("flowmap_cli.export", "the learned map of a namespace as YAML for git (policies)"),
    "graph": ("flowmap_cli.graph", "a picture of the map: SVG, PNG or HTML, or a page that keeps itself up to date"),
    "operator": ("flowmap_operator.cli", "the operator: reports become Group and Connection resources"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmap", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        if wanted is None or name == wanted:
            # Only the chosen component is imported; the others get a placeholder for --help.
            if wanted is None:
                sub.add_parser(name, help=help_text, add_help=False)
            else:
                importlib.import_module(module).register(sub.add_parser(name, help=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
