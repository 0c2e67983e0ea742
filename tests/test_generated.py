"""Generated files are committed and must match their sources: the protobuf code its .proto
files, docs/crd-reference.md the CRDs."""

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


def test_crd_reference_matches_the_crds(tmp_path: Path) -> None:
    out = tmp_path / "crd-reference.md"
    proc = subprocess.run([sys.executable, str(REPO / "hack" / "crd_reference.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    fresh = out.read_text()
    for kind in ("## Group (", "## Connection (", "## NetworkLearningPolicy (", "## PacketCapture (",
                 "`spec.port` | integer"):
        assert kind in fresh
    assert (REPO / "docs" / "crd-reference.md").read_text() == fresh, \
        "docs/crd-reference.md differs from crds/*.yaml; run 'make docs'"
