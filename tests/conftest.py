"""Shared test plumbing.

Tests that need root, network namespaces or the control plane call ``need(...)``: on a laptop
they skip with the reason; when ``FLOWMAP_REQUIRE_PRIVILEGED=1`` (as ``.ci/run`` sets) they fail,
so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REQUIRE_PRIVILEGED = os.environ.get("FLOWMAP_REQUIRE_PRIVILEGED") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip (laptop) or fail (CI) unless ``condition`` holds."""
    if condition:
        return
    if REQUIRE_PRIVILEGED:
        pytest.fail(f"FLOWMAP_REQUIRE_PRIVILEGED=1 and {reason}", pytrace=False)
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "this test needs root (network namespaces, AF_PACKET)")
    need(shutil.which("ip") is not None, "this test needs 'ip' from iproute2")


@pytest.fixture
def privileged() -> None:
    """Use as a fixture in tests that need root and network namespaces."""
    need_root()
