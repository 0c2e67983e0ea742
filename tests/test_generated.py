"""Generated protobuf code is committed and must match its .proto sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "hack" / "generate_protos.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fresh = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(fresh) >= 5  # report: pb2, pyi, grpc; wire: pb2, pyi
    stale = [str(p.relative_to(tmp_path)) for p in fresh
             if (REPO / p.relative_to(tmp_path)).read_bytes() != p.read_bytes()]
    assert not stale, f"generated code differs from the .proto sources; run 'make proto': {stale}"
