"""``python -m flowmap_dp``, as the agent starts its child dp, is ``flowmap dp run``: the same
arguments, without the command-line tool in between."""

from __future__ import annotations

import re
import subprocess
import sys


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
