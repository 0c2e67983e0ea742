"""What can be checked of the image without a Docker engine: a pinned base, a non-root user, one
entrypoint for every component the manifests run, a build context of only what it installs,
and no private key in the context or anywhere in the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from flowmap_devenv import dockerignore
from tests.conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.MULTILINE)]


def test_the_base_is_pinned_by_exact_tag_and_digest() -> None:
    args = dict(a.split("=", 1) for kind, a in instructions() if kind == "ARG" and "=" in a)
    base = args["BASE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    stages: list[str] = []
    for kind, arg in instructions():
        if kind == "FROM":
            image, *alias = arg.split(" AS ") if " AS " in arg else (arg,)
            assert image in ("${BASE}", *stages), f"FROM {image}: only the pinned base or an earlier stage"
            stages += [a.strip() for a in alias]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"  # the base's Python must satisfy it


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    final = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    users = re.findall(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert users, "the final stage sets no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), users[-1]


def containers() -> list[dict[str, object]]:
    found = []
    for name in ("operator/deployment.yaml", "agent/daemonset.yaml", "agent/dp.yaml"):
        for doc in yaml.safe_load_all((REPO / "manifests" / name).read_text()):
            if doc["kind"] in ("Deployment", "DaemonSet"):
                found += doc["spec"]["template"]["spec"]["containers"]
    return found


def test_one_entrypoint_serves_every_component_the_manifests_run() -> None:
    entry = [arg for kind, arg in instructions() if kind == "ENTRYPOINT"]
    assert entry == ['["/opt/flowmap/bin/flowmap"]']
    assert "flowmap" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    ran = {str(c["name"]): [str(a) for a in c["args"]] for c in containers()}  # type: ignore[union-attr]
    assert {c["image"] for c in containers()} == {"flowmap"}  # one image, named once in kustomization.yaml
    assert {args[0] for args in ran.values()} == {"operator", "agent", "dp"}
    for name, args in ran.items():
        command = [a for a in args if not a.startswith("$(")]  # values the kubelet fills in
        proc = subprocess.run([sys.executable, "-m", "flowmap_cli", *command[:2], "--help"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, f"{name}: flowmap {' '.join(command[:2])}: {proc.stderr}"
        for flag in (a for a in command[2:] if a.startswith("--")):
            assert flag in proc.stdout, f"{name}: flowmap {' '.join(command[:2])} has no {flag}"


def context() -> list[str]:
    """The files ``docker build .`` sends (the rules of .dockerignore, as Docker reads them)."""
    return dockerignore.context(REPO)


def test_the_build_context_is_only_what_the_image_installs() -> None:
    sent = context()
    tops = {p.split(os.sep)[0] for p in sent}
    wheres = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    assert tops == {"pyproject.toml", "README.md", "LICENSE", *wheres}, tops
    assert not [p for p in sent if "__pycache__" in p or p.endswith(".pyc") or ".egg-info" in p]
    copied = {a for kind, arg in instructions() if kind == "COPY" and not arg.startswith("--from")
              for a in arg.split()[:-1]}
    assert {c.split("/")[0] for c in copied} <= tops, f"COPY of something the context leaves out: {copied}"
    assert set(wheres) <= copied, "every package folder is copied"


def test_no_local_build_of_the_extension_enters_the_context() -> None:
    rules = dockerignore.rules((REPO / ".dockerignore").read_text())
    for built in ("dp/native/target/release/lib_native.so", "dp/native/target/CACHEDIR.TAG",
                  "dp/flowmap_dp/_native.cpython-311-x86_64-linux-gnu.so"):
        assert dockerignore.excluded(rules, built), f"{built} would be sent to the build"
    for source in ("dp/native/Cargo.toml", "dp/native/Cargo.lock", "dp/native/build.rs", "dp/native/src/lib.rs",
                   "dp/native/debian-packages.txt", "dp/flowmap_dp/__init__.py"):
        assert not dockerignore.excluded(rules, source), f"{source} is needed by the build and left out"
    sent = context()
    assert "dp/native/src/lib.rs" in sent
    assert not [p for p in sent if p.startswith("dp/native/target/") or p.endswith(".so")]


def test_the_context_is_read_as_docker_reads_it(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("# what goes\n*\n!dp\n**/__pycache__\ndp/native/target\n"
                                            "!dp/native/target/keep\n")
    for rel in (".venv/bin/python", "dp/x.py", "dp/a/__pycache__/x.pyc", "dp/native/target/debug/x",
                "dp/native/target/keep"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    # A folder left out is entered only for a "!" line inside it; the last matching line decides.
    assert dockerignore.context(tmp_path) == ["dp/native/target/keep", "dp/x.py"]


def tracked() -> list[str]:
    """The repository's files (tracked, or new and not ignored); without git, every file but caches."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          capture_output=True, timeout=60)
    if proc.returncode == 0:
        return [p for p in proc.stdout.decode().split("\0") if p]
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis")]
        found += [os.path.relpath(os.path.join(root, f), REPO) for f in files]
    return found


def test_no_private_key_in_the_context_or_the_repository() -> None:
    assert PEM_KEY.search(b"x\n-----BEGIN EC " + b"PRIVATE KEY-----\nMHcCAQEE\n")  # the check does find one
    files = set(tracked()) | set(context())
    assert "Dockerfile" in files and "pyproject.toml" in files
    keys = [f for f in sorted(files) if (REPO / f).is_file() and PEM_KEY.search((REPO / f).read_bytes())]
    assert not keys, f"private keys in the repository or the image's build context: {keys}"
