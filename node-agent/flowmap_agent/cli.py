"""``flowmap agent run``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from flowmap_agent.settings import Settings


def _run(args: argparse.Namespace) -> int:
    from flowmap_agent.running import Agent  # grpc, kubernetes and netlink load only for this command

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(Agent(Settings.from_env()).run())
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    """Add the agent subcommands (settings come from FLOWMAP_AGENT_* variables)."""
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="capture this node's pods and report their connections to the operator")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)
