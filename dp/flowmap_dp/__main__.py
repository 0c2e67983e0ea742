"""``python -m flowmap_dp``: the live dp (``flowmap dp run``'s arguments), started directly, as the
agent starts its child dp: no command-line tool in between, only the datapath's own modules."""

from __future__ import annotations

import argparse
import sys

from flowmap_dp.cli import RUN_DESCRIPTION, add_run_arguments, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowmap_dp", description=RUN_DESCRIPTION)
    add_run_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
