"""The hypervisor node the VM tests share within one test: see tests/vm/harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need, need_root
from tests.vm.harness import Node, libvirt_ready


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node namespace with its own real libvirtd; afterwards, nothing of it may be left."""
    need_root()
    missing = libvirt_ready()
    need(not missing, missing)
    made = Node(tmp_path)
    try:
        made.open()
        yield made
    finally:
        left = made.close()
    assert not left, f"left behind: {left}"
