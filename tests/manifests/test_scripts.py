"""Every shell script of the repository is shellcheck-clean, including the ones CI cannot run
(hack/kind-e2e.sh needs Docker)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO, need


def scripts() -> list[Path]:
    """Files in hack/ and .ci/ that start with a shell shebang."""
    found = []
    for folder in (REPO / "hack", REPO / ".ci"):
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            with open(path, "rb") as f:
                first = f.readline()
            if first.startswith(b"#!") and first.rstrip().endswith((b"bash", b"/sh")):
                found.append(path)
    return found


def test_the_scripts_are_found() -> None:
    names = {p.relative_to(REPO).as_posix() for p in scripts()}
    assert {".ci/run", "hack/install-debian-packages.sh", "hack/kind-e2e.sh"} <= names


def test_every_script_is_shellcheck_clean() -> None:
    need(shutil.which("shellcheck") is not None, "this test needs shellcheck (Debian package shellcheck)")
    proc = subprocess.run(["shellcheck", "--external-sources", *map(str, scripts())], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_does_find_faults(tmp_path: Path) -> None:
    need(shutil.which("shellcheck") is not None, "this test needs shellcheck (Debian package shellcheck)")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")  # unquoted: SC2086
    proc = subprocess.run(["shellcheck", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SC2086" in proc.stdout
