"""``python -m flowmap_dp``, as the agent starts its child dp, is ``flowmap dp run``: the same
arguments, without the command-line tool in between."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from flowmap_dp.cli import add_run_arguments
from flowmap_dp.settings import Settings


def _help(*command: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(re.findall(r"--[a-z][a-z-]*", proc.stdout))


def test_python_m_flowmap_dp_takes_the_arguments_of_flowmap_dp_run() -> None:
    direct = _help("flowmap_dp")
    assert "--socket" in direct and "--local-address" in direct
    assert direct == _help("flowmap_cli", "dp", "run")


def test_python_m_flowmap_dp_loads_no_command_line_tool() -> None:
    probe = ("import sys, runpy; sys.argv = ['flowmap_dp', '--help']\n"
             "try:\n    runpy.run_module('flowmap_dp', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.startswith('flowmap_cli')))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_command_line_and_the_code_have_the_same_defaults() -> None:
    """flowmap_dp.settings holds them once: what the command line leaves out is what the code uses."""
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args(["--socket", "/run/flowmap/dp.sock"])
    assert (args.interval, args.workers, args.max_sessions, args.queue, args.parser, args.capture_dir,
            args.capture_disk_bytes, args.max_captures) == (
        Settings.interval, Settings.workers, Settings.max_sessions, Settings.queue_size, Settings.parser,
        Settings.capture_dir, Settings.capture_disk_bytes, Settings.max_captures)
    assert args.queue == 32  # what every dp in a cluster has queued


def test_a_setting_out_of_bounds_is_refused_naming_its_flag() -> None:
    for field, flag in (("queue_size", "--queue"), ("workers", "--workers"), ("interval", "--interval")):
        with pytest.raises(ValueError, match=flag):
            Settings((), "/run/flowmap/dp.sock", **{field: 0})
