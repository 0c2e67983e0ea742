"""The packages type-check: mypy with the configuration in pyproject.toml ([tool.mypy]).

The first run takes some seconds; later ones reuse .mypy_cache/ and take about one.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_mypy_finds_no_errors() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
