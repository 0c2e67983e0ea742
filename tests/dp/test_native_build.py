"""The compiled extension (dp/native, flowmap_dp._native) as built: in step with its sources, and
made only of crates whose licences let it ship in an Apache-2.0 image."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, need

CRATE = REPO / "dp" / "native"
REBUILD = "run `make test`, or `pip install -e .`, to rebuild it"
# The image is built for Linux; a dependency behind another target's cfg is never linked into it.
TARGETS = ("x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu")
COPYLEFT = re.compile(r"(?:A|L)?GPL", re.IGNORECASE)  # GPL, LGPL and AGPL, any version


# -- in step with the sources ------------------------------------------------------------------

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


# -- licences ----------------------------------------------------------------------------------

def tokens(expression: str) -> list[str]:
    """An SPDX expression's words and parentheses; the old ``MIT/Apache-2.0`` means OR."""
    return re.findall(r"\(|\)|[^\s()/]+", expression.replace("/", " OR "))


def shippable(expression: str) -> bool:
    """Whether some choice the SPDX expression offers avoids every GPL, LGPL and AGPL licence
    (``MIT OR LGPL-2.1-or-later`` can be taken as MIT; ``MIT AND GPL-2.0`` cannot)."""
    words = tokens(expression)
    pos = 0

    def either() -> bool:  # a OR b OR ...: one of them will do
        nonlocal pos
        ok = both()
        while pos < len(words) and words[pos].upper() == "OR":
            pos += 1
            ok = both() or ok
        return ok

    def both() -> bool:  # a AND b AND ...: every one must do
        nonlocal pos
        ok = one()
        while pos < len(words) and words[pos].upper() == "AND":
            pos += 1
            ok = one() and ok
        return ok

    def one() -> bool:  # a licence (WITH an exception), or a parenthesised expression
        nonlocal pos
        word, pos = words[pos], pos + 1
        if word == "(":
            ok = either()
            assert words[pos] == ")", f"unbalanced parentheses in {expression!r}"
            pos += 1
            return ok
        if pos < len(words) and words[pos].upper() == "WITH":
            pos += 2  # an exception only adds permissions
        return not COPYLEFT.match(word)

    ok = either()
    assert pos == len(words), f"cannot read the licence expression {expression!r}"
    return ok


@pytest.mark.parametrize(("expression", "ok"), [
    ("MIT OR Apache-2.0", True),
    ("MIT/Apache-2.0", True),
    ("Apache-2.0 WITH LLVM-exception", True),
    ("(MIT OR Apache-2.0) AND Unicode-3.0", True),
    ("MIT OR Apache-2.0 OR LGPL-2.1-or-later", True),
    ("BSD-2-Clause OR Apache-2.0 OR MIT", True),
    ("GPL-3.0-only", False),
    ("LGPL-2.1-or-later", False),
    ("AGPL-3.0", False),
    ("GPL-2.0-or-later WITH Classpath-exception-2.0", False),
    ("MIT AND GPL-2.0-only", False),
    ("(MIT OR GPL-2.0) AND LGPL-3.0", False),
    ("(MIT OR GPL-2.0) AND Apache-2.0", True),
])
def test_licence_expressions_are_read_as_spdx_means_them(expression: str, ok: bool) -> None:
    assert shippable(expression) is ok


def metadata(target: str) -> dict[str, object]:
    """``cargo metadata`` for the crate as Cargo.lock has it: from the local registry cache when the
    crates were fetched already (the extension's build fetched them), from crates.io otherwise."""
    argv = ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", target]
    proc = subprocess.run([*argv, "--offline"], cwd=CRATE, capture_output=True, text=True, timeout=120)
    if proc.returncode:
        proc = subprocess.run(argv, cwd=CRATE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(argv)} (in dp/native) failed:\n{proc.stderr}"
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def linked(meta: dict[str, object]) -> list[dict[str, object]]:
    """The packages linked into the library: the crate and its normal dependencies, transitively.
    Not build or dev dependencies, nor procedural macros (they run in the compiler) or theirs."""
    packages = {p["id"]: p for p in meta["packages"]}  # type: ignore[attr-defined]
    resolve = meta["resolve"]
    nodes = {n["id"]: n for n in resolve["nodes"]}  # type: ignore[index]
    seen, todo = set(), [resolve["root"]]  # type: ignore[index]
    while todo:
        pid = todo.pop()
        if pid in seen or any("proc-macro" in t["kind"] for t in packages[pid]["targets"]):
            continue
        seen.add(pid)
        todo += [d["pkg"] for d in nodes[pid]["deps"] if any(k["kind"] is None for k in d["dep_kinds"])]
    return [packages[pid] for pid in sorted(seen)]


def test_the_linked_walk_leaves_out_build_and_dev_dependencies_and_macros() -> None:
    def package(name: str, kind: str = "lib") -> dict[str, object]:
        return {"id": name, "name": name, "targets": [{"kind": [kind]}]}

    def dep(name: str, kind: str | None = None) -> dict[str, object]:
        return {"pkg": name, "dep_kinds": [{"kind": kind, "target": None}]}

    meta = {"packages": [package("root", "cdylib"), package("a"), package("b"), package("d"),
                         package("macro", "proc-macro"), package("m")],
            "resolve": {"root": "root", "nodes": [
                {"id": "root", "deps": [dep("a"), dep("b", "build"), dep("macro")]},
                {"id": "a", "deps": [dep("d", "dev")]}, {"id": "b", "deps": []}, {"id": "d", "deps": []},
                {"id": "macro", "deps": [dep("m")]}, {"id": "m", "deps": []}]}}
    assert [p["name"] for p in linked(meta)] == ["a", "root"]


def problem(package: dict[str, object]) -> str | None:
    """Why a package may not ship, or None."""
    licence = package["license"]
    if licence:
        return None if shippable(str(licence)) else str(licence)
    return "a licence file and no SPDX expression: read it" if package.get("license_file") else "no licence"


def test_every_crate_linked_into_the_extension_may_ship_under_apache_2() -> None:
    need(shutil.which("cargo") is not None,
         "cargo is needed to read dp/native's dependencies (make test installs Rust when missing)")
    for target in TARGETS:
        packages = linked(metadata(target))
        assert {"flowmap-dp-native", "pyo3"} <= {p["name"] for p in packages}, target
        bad = [f"{p['name']} {p['version']}: {why}" for p in packages if (why := problem(p))]
        assert not bad, f"{target}: crates linked into flowmap_dp._native that cannot ship in the image: {bad}"


# -- the fuzz targets follow the crate ----------------------------------------------------------

def test_the_fuzz_targets_compile_against_the_crate_as_it_is() -> None:
    """dp/native/fuzz drives the crate's pure core; running it needs a nightly compiler
    (hack/fuzz-dp.sh), so nothing else would notice when a change to the core leaves the targets
    behind. ``cargo check`` (any toolchain) does."""
    need(shutil.which("cargo") is not None, "cargo is needed to check dp/native/fuzz (make test installs Rust)")
    target_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flowmap" / "fuzz-check"
    argv = ["cargo", "check", "--locked", "--bins", "--quiet", "--target-dir", str(target_dir)]
    proc = subprocess.run(argv, cwd=CRATE / "fuzz", capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(argv)} (in dp/native/fuzz) failed:\n{proc.stderr[-4000:]}"
