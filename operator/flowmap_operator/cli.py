"""``flowmap operator run``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from flowmap_operator.settings import Settings


def _run(args: argparse.Namespace) -> int:
    from flowmap_operator import running  # kopf and the API clients load only for this command

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # kopf logs every handled watch event at INFO: thousands a minute on a busy cluster.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(running.run(Settings.from_env()))
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    """Add the operator subcommands (settings come from FLOWMAP_OPERATOR_* variables)."""
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="serve agents' reports and keep Groups and Connections")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)
