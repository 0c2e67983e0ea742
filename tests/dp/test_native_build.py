"""The compiled extension (dp/native, flowmap_dp._native) as built: in step with its sources."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

CRATE = REPO / "dp" / "native"
REBUILD = "run `make test`, or `pip install -e .`, to rebuild it"


def source_files(crate: Path) -> Iterator[str]:
    """What dp/native/build.rs digests: Cargo.toml, Cargo.lock, build.rs and every file under src/."""
    yield from ("Cargo.toml", "Cargo.lock", "build.rs")
    for folder, _, files in os.walk(crate / "src"):
        for name in files:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path.relative_to(crate).as_posix()


def source_digest(crate: Path) -> str:
    """dp/native/build.rs's digest: FNV-1a 64 over ``path NUL length NUL contents``, by path."""
    h = 0xCBF29CE484222325
    for rel in sorted(source_files(crate), key=lambda p: p.encode()):
        data = (crate / rel).read_bytes()
        for byte in rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data:
            h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def test_the_digest_is_fnv1a_of_each_file_in_order(tmp_path: Path) -> None:
    (tmp_path / "src" / "a").mkdir(parents=True)
    for rel in ("Cargo.toml", "Cargo.lock", "build.rs", "src/lib.rs", "src/a/b.rs"):
        (tmp_path / rel).write_text(rel)
    first = source_digest(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    (tmp_path / "src" / "a" / "c.rs").write_text("")
    assert source_digest(tmp_path) != first, "a new source file is a new digest"
    (tmp_path / "src" / "a" / "c.rs").unlink()
    assert source_digest(tmp_path) == first
    h = 0xCBF29CE484222325  # FNV-1a 64 of b"a", its published test vector
    h = ((h ^ ord("a")) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    assert f"{h:016x}" == "af63dc4c8601ec8c"


def test_the_extension_is_built_from_the_sources_on_disk() -> None:
    import flowmap_dp._native as native  # built by `pip install -e .`: no build, no flowmap_dp

    version = tomllib.loads((CRATE / "Cargo.toml").read_text())["package"]["version"]
    assert native.VERSION == version, f"{native.__file__} is version {native.VERSION}, dp/native {version}: {REBUILD}"
    built = getattr(native, "SOURCE_DIGEST", None)
    assert built is not None, ('flowmap_dp._native exports no SOURCE_DIGEST: src/lib.rs must '
                               'm.add("SOURCE_DIGEST", env!("FLOWMAP_SOURCE_DIGEST"))?')
    assert built == source_digest(CRATE), f"{native.__file__} was built from other sources than dp/native's: {REBUILD}"
