"""Find or build the control-plane binaries: kube-apiserver, kubectl and etcd.

The binaries are built once from the official Go modules with this machine's Go toolchain and
module proxy, then cached.  ``k8s.io/kubernetes`` cannot be required as a plain dependency because
its go.mod replaces every ``k8s.io/*`` staging module with a path inside its own repository; a
throw-away build module requires it and replaces each staging module by its published ``v0.x``
release instead.  etcd is built from ``go.etcd.io/etcd/server/v3`` through a three-line main
calling ``etcdmain.Main``, at the etcd release Kubernetes itself pins in its go.mod.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"  # the etcd release k8s.io/kubernetes v1.36.3 requires in its go.mod
BINARIES = ("kube-apiserver", "kubectl", "etcd")

_STAGING_REPLACE = re.compile(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", re.MULTILINE)


class MissingTool(RuntimeError):
    """A tool the build needs is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kubectl: Path
    etcd: Path


def cache_dir() -> Path:
    """Where the binaries live: ``FLOWMAP_CONTROLPLANE_BIN`` or a versioned folder in the cache."""
    override = os.environ.get("FLOWMAP_CONTROLPLANE_BIN")
    if override:
        return Path(override).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "flowmap" / "controlplane" / f"kubernetes-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}"


def find() -> Binaries | None:
    """The cached binaries, or None when any is missing."""
    folder = cache_dir()
    paths = [folder / name for name in BINARIES]
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths):
        return Binaries(*paths)
    return None


def ensure(log=print) -> Binaries:  # type: ignore[no-untyped-def]
    """Return the cached binaries, building whatever is missing first."""
    found = find()
    if found:
        return found
    go = shutil.which("go")
    if not go:
        raise MissingTool(
            "the Go toolchain ('go') is needed once to build kube-apiserver, kubectl and etcd: "
            "install it (https://go.dev/doc/install or 'apt-get install golang') or point "
            "FLOWMAP_CONTROLPLANE_BIN at a folder holding the three binaries"
        )
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flowmap-build-") as tmp:
        work = Path(tmp)
        missing = [name for name in BINARIES if not (folder / name).is_file()]
        if "kube-apiserver" in missing or "kubectl" in missing:
            _build_kubernetes(go, work / "kubernetes", folder, log)
        if "etcd" in missing:
            _build_etcd(go, work / "etcd", folder, log)
    found = find()
    if not found:
        raise RuntimeError(f"the build finished but binaries are missing from {folder}")
    return found


def _go(go: str, args: list[str], cwd: Path, log, env: dict[str, str] | None = None) -> str:  # type: ignore[no-untyped-def]
    log(f"[controlplane build] go {' '.join(args)}")
    full_env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0", **(env or {})}
    proc = subprocess.run([go, *args], cwd=cwd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"'go {' '.join(args)}' failed with exit code {proc.returncode}")
    return proc.stdout


def _build_kubernetes(go: str, work: Path, dest: Path, log) -> None:  # type: ignore[no-untyped-def]
    work.mkdir(parents=True)
    _go(go, ["mod", "init", "flowmap.dev/controlplane-build"], work, log)
    info = json.loads(_go(go, ["mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"], work, log))
    staging = _STAGING_REPLACE.findall(Path(info["GoMod"]).read_text())
    published = "v0." + KUBERNETES_VERSION.removeprefix("v1.")
    edits = [f"-require=k8s.io/kubernetes@{KUBERNETES_VERSION}"]
    edits += [f"-replace={module}={module}@{published}" for module in staging]
    _go(go, ["mod", "edit", *edits], work, log)
    major, minor = KUBERNETES_VERSION.removeprefix("v").split(".")[:2]
    stamp = " ".join(
        f"-X {pkg}.{key}={value}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for key, value in (("gitVersion", KUBERNETES_VERSION), ("gitMajor", major), ("gitMinor", minor),
                           ("gitTreeState", "clean"))
    )
    log(f"[controlplane build] building kube-apiserver and kubectl {KUBERNETES_VERSION} "
        "(first time only: several minutes)")
    _go(go, ["build", "-trimpath", "-ldflags", f"-s -w {stamp}", "-o", str(dest) + "/",
             "k8s.io/kubernetes/cmd/kube-apiserver", "k8s.io/kubernetes/cmd/kubectl"], work, log)


def _build_etcd(go: str, work: Path, dest: Path, log) -> None:  # type: ignore[no-untyped-def]
    work.mkdir(parents=True)
    _go(go, ["mod", "init", "flowmap.dev/etcd-build"], work, log)
    (work / "main.go").write_text(
        'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
        "func main() { etcdmain.Main(os.Args) }\n"
    )
    _go(go, ["mod", "edit", f"-require=go.etcd.io/etcd/server/v3@{ETCD_VERSION}"], work, log)
    log(f"[controlplane build] building etcd {ETCD_VERSION}")
    _go(go, ["build", "-trimpath", "-ldflags", "-s -w", "-o", str(dest / "etcd"), "."], work, log)


if __name__ == "__main__":
    print(ensure())
