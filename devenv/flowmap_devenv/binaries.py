"""Find or build the Go programs of a local cluster: Kubernetes, etcd, CoreDNS, flannel, crictl.

Each is built once from its official Go module, at a pinned version, with this machine's Go
toolchain and module proxy, then cached in ``~/.cache/flowmap/bin/<project>-<version>/``.

``k8s.io/kubernetes`` cannot be required as a plain dependency because its go.mod replaces every
``k8s.io/*`` staging module with a path inside its own repository; a throw-away build module
requires it and replaces each staging module by its published ``v0.x`` release instead. etcd is
built from ``go.etcd.io/etcd/server/v3`` through a three-line main calling ``etcdmain.Main``, at
the etcd release Kubernetes itself pins in its go.mod. The others build from their module's own
main package.

``FLOWMAP_CONTROLPLANE_BIN`` names a folder holding kube-apiserver, kubectl and etcd instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"  # the etcd release k8s.io/kubernetes v1.36.3 requires in its go.mod
Log = Callable[[str], None]


@dataclass(frozen=True)
class Program:
    """One binary: the Go module it comes from, at which version, and its main package."""

    name: str
    project: str  # names its cache folder, with the version
    module: str
    version: str
    package: str
    minutes: int  # a cold build on two cores, to say what is coming


def _k8s(name: str, minutes: int) -> Program:
    return Program(name, "kubernetes", "k8s.io/kubernetes", KUBERNETES_VERSION, f"k8s.io/kubernetes/cmd/{name}", minutes)


PROGRAMS = {p.name: p for p in (
    _k8s("kube-apiserver", 6), _k8s("kubectl", 2), _k8s("kubelet", 4), _k8s("kube-proxy", 1),
    _k8s("kube-controller-manager", 2), _k8s("kube-scheduler", 1),
    Program("etcd", "etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION, ".", 2),
    Program("coredns", "coredns", "github.com/coredns/coredns", "v1.14.7", "github.com/coredns/coredns", 3),
    Program("flanneld", "flannel", "github.com/flannel-io/flannel", "v0.28.10", ".", 2),
    Program("crictl", "cri-tools", "sigs.k8s.io/cri-tools", "v1.37.0", "sigs.k8s.io/cri-tools/cmd/crictl", 1),
)}
CONTROLPLANE = ("kube-apiserver", "kubectl", "etcd")
CLUSTER = (*CONTROLPLANE, "kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler", "coredns",
           "flanneld", "crictl")

_STAGING_REPLACE = re.compile(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", re.MULTILINE)


class MissingTool(RuntimeError):
    """A tool the build needs is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kubectl: Path
    etcd: Path


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flowmap" / "bin"


def path(name: str) -> Path:
    """Where binary ``name`` is (or will be) kept."""
    override = os.environ.get("FLOWMAP_CONTROLPLANE_BIN")
    if override and name in CONTROLPLANE:
        return Path(override).expanduser() / name
    program = PROGRAMS[name]
    return cache_root() / f"{program.project}-{program.version}" / name


def _present(name: str) -> bool:
    p = path(name)
    return p.is_file() and os.access(p, os.X_OK)


def find() -> Binaries | None:
    """The control plane's binaries, or None when any is missing."""
    if all(_present(name) for name in CONTROLPLANE):
        return Binaries(*(path(name) for name in CONTROLPLANE))
    return None


def ensure(log: Log = print) -> Binaries:
    """The control plane's binaries, building whatever is missing first."""
    ensure_programs(CONTROLPLANE, log)
    found = find()
    assert found is not None
    return found


def ensure_programs(names: Iterable[str], log: Log = print) -> dict[str, Path]:
    """Each named binary's path, building the missing ones (one ``go build`` per module)."""
    wanted = list(dict.fromkeys(names))
    missing = [PROGRAMS[n] for n in wanted if not _present(n)]
    if missing:
        go = shutil.which("go")
        if not go:
            raise MissingTool(
                f"the Go toolchain ('go') is needed once to build {', '.join(p.name for p in missing)}: install it "
                "(https://go.dev/doc/install or 'apt-get install golang'), or for the control plane point "
                "FLOWMAP_CONTROLPLANE_BIN at a folder holding kube-apiserver, kubectl and etcd")
        by_module: dict[tuple[str, str], list[Program]] = {}
        for program in missing:
            by_module.setdefault((program.module, program.version), []).append(program)
        for (module, version), programs in by_module.items():
            names_ = ", ".join(p.name for p in programs)
            log(f"[build] {names_} {version} from {module} (once; about {sum(p.minutes for p in programs)} min)")
            dest = path(programs[0].name).parent
            dest.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="flowmap-build-") as tmp:
                _build(go, Path(tmp), module, version, programs, dest, log)
        still = [n for n in wanted if not _present(n)]
        if still:
            raise RuntimeError(f"the build finished but {', '.join(still)} are missing")
    return {n: path(n) for n in wanted}


def _go(go: str, args: list[str], cwd: Path, log: Log) -> str:
    log(f"[build] go {' '.join(args)[:200]}")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    proc = subprocess.run([go, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise RuntimeError(f"'go {' '.join(args)[:200]}' failed with exit code {proc.returncode}")
    return proc.stdout


def _build(go: str, work: Path, module: str, version: str, programs: list[Program], dest: Path, log: Log) -> None:
    _go(go, ["mod", "init", "flowmap.dev/build"], work, log)
    edits = [f"-require={module}@{version}"]
    ldflags = "-s -w"
    packages = [p.package for p in programs]
    if module == "k8s.io/kubernetes":
        info = json.loads(_go(go, ["mod", "download", "-json", f"{module}@{version}"], work, log))
        published = "v0." + version.removeprefix("v1.")
        edits += [f"-replace={m}={m}@{published}" for m in _STAGING_REPLACE.findall(Path(info["GoMod"]).read_text())]
        major, minor = version.removeprefix("v").split(".")[:2]
        ldflags += "".join(
            f" -X {pkg}.{key}={value}"
            for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
            for key, value in (("gitVersion", version), ("gitMajor", major), ("gitMinor", minor),
                               ("gitTreeState", "clean")))
    elif module == "github.com/flannel-io/flannel":
        # Its main imports every backend; two cannot build here: tencentvpc's SDK is not on the
        # module proxy, udp needs cgo. The cluster uses vxlan. Build its own main without them.
        info = json.loads(_go(go, ["mod", "download", "-json", f"{module}@{version}"], work, log))
        main = (Path(info["Dir"]) / "main.go").read_text()
        (work / "main.go").write_text(re.sub(r'^\s*_ "github.com/flannel-io/flannel/pkg/backend/(tencentvpc|udp)"\n', "",
                                             main, flags=re.MULTILINE))
        ldflags += f" -X {module}/pkg/version.Version={version}"
    elif module == "go.etcd.io/etcd/server/v3":
        (work / "main.go").write_text(
            'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
            "func main() { etcdmain.Main(os.Args) }\n")
    _go(go, ["mod", "edit", *edits], work, log)
    out = str(dest / programs[0].name) if len(programs) == 1 else f"{dest}/"
    _go(go, ["build", "-trimpath", "-ldflags", ldflags, "-o", out, *packages], work, log)


if __name__ == "__main__":
    print(ensure_programs(sys.argv[1:] or CLUSTER))
