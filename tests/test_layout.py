"""The shape STYLE.md fixes, and the import boundaries between components."""

from __future__ import annotations

import importlib
import operator
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from tests.conftest import REPO

COMPONENTS = {"operator": "flowmap_operator", "node-agent": "flowmap_agent", "dp": "flowmap_dp",
              "api": "flowmap_api", "cli": "flowmap_cli", "devenv": "flowmap_devenv"}


def test_each_component_folder_holds_one_prefixed_package() -> None:
    for folder, package in COMPONENTS.items():
        packages = sorted(p.parent.name for p in (REPO / folder).glob("*/__init__.py"))
        assert packages == [package], folder
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/ must not itself be a package"
        module = importlib.import_module(package)
        assert Path(module.__file__ or "").resolve().parent == (REPO / folder / package).resolve()


def test_no_package_shadows_the_standard_library_operator_module() -> None:
    assert Path(operator.__file__ or "").resolve().is_relative_to(Path(sysconfig.get_paths()["stdlib"]).resolve())


def test_import_boundaries_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 12  # between components, and layers and independence inside each
    assert f"Contracts: {len(contracts)} kept, 0 broken" in proc.stdout, proc.stdout
