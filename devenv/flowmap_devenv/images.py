"""The images a local cluster runs, all built on this machine (no registry is needed or used).

* ``base``: Debian made with ``debootstrap --variant=minbase``, with Python and the official
  images' apt sources (bookworm, bookworm-updates, bookworm-security): it stands in for the
  Dockerfile's ``BASE`` (python:3.11-slim) and is the base of the others;
* ``flowmap``: the repository's own Dockerfile, unmodified, built with ``--build-arg BASE``;
* ``pause``: the sandbox image, Kubernetes' own ``build/pause/linux/pause.c`` linked statically;
* ``coredns`` and ``flannel``: their binaries (flowmap_devenv.binaries) on scratch or the base;
* ``shop``: the demo's servers and clients from Debian's packages (redis, PostgreSQL, Python
  with grpcio); its programs come from a ConfigMap.

``buildah bud`` builds each into a storage of flowmap's own (``~/.cache/flowmap/images``) and
saves it as an archive named by a hash of everything that went in, so an unchanged image is
never built twice. Behind a proxy with its own certificate authority, the machine's CA bundle
is handed to the builds as a build secret: it is never part of an image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowmap_devenv import binaries, dockerignore
from flowmap_devenv.binaries import MissingTool

Log = Callable[[str], None]
REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = os.environ.get("FLOWMAP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The apt sources of Debian's official images, python:3.11-slim's among them (debootstrap writes
# only the release itself; FLOWMAP_DEBIAN_MIRROR replaces the first, as for debootstrap): the
# Dockerfile's build stage takes its Rust from bookworm-security.
SOURCES = f"""Types: deb
URIs: {MIRROR}
Suites: {SUITE} {SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: {SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
SHOP_PACKAGES = ("redis-server", "postgresql", "python3-grpcio", "procps")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

NAMES = {
    "base": f"localhost/flowmap-base:{SUITE}",
    "flowmap": "localhost/flowmap:dev",
    "pause": "localhost/pause:3.10.2",
    "coredns": f"localhost/coredns:{binaries.PROGRAMS['coredns'].version}",
    "flannel": f"localhost/flannel:{binaries.PROGRAMS['flanneld'].version}",
    "shop": "localhost/flowmap-shop:dev",
}


def cache_dir() -> Path:
    return binaries.cache_root().parent / "images"


@dataclass(frozen=True)
class Built:
    name: str  # the image reference pods use
    archive: Path  # a docker-archive of it, for `ctr images import`


class Builder:
    """Builds the images with buildah, each once per distinct input."""

    def __init__(self, log: Log = print) -> None:
        for tool, package in (("buildah", "buildah"), ("debootstrap", "debootstrap"), ("gcc", "gcc")):
            if not shutil.which(tool):
                raise MissingTool(f"'{tool}' is needed to build the cluster's images: apt-get install {package}")
        self.log = log
        self.dir = cache_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = ["--root", str(self.dir / "storage"), "--runroot", str(self.dir / "run")]

    def all(self) -> dict[str, Built]:
        """Every image of the cluster, the flowmap image from the working tree as it is now."""
        base = self.base()
        bins = binaries.ensure_programs(("coredns", "flanneld"), self.log)
        return {
            "base": base,
            "flowmap": self.flowmap(base),
            "pause": self.pause(),
            "coredns": self._build("coredns", 'FROM scratch\nCOPY coredns /coredns\nENTRYPOINT ["/coredns"]\n',
                                   {"coredns": bins["coredns"]}),
            "flannel": self._build("flannel", f"FROM {base.name}\n" + _apt("iptables", "nftables") +
                                   "COPY flanneld /opt/bin/flanneld\nENTRYPOINT [\"/opt/bin/flanneld\"]\n",
                                   {"flanneld": bins["flanneld"]}, parent=base),
            "shop": self._build("shop", f"FROM {base.name}\n" + _apt(*SHOP_PACKAGES), {}, parent=base),
        }

    def base(self) -> Built:
        key = _digest(SUITE, MIRROR, *BASE_PACKAGES, SOURCES)
        built = self._cached("base", key)
        if built:
            return built
        self.log(f"[images] debootstrap {SUITE} with {', '.join(BASE_PACKAGES)} (once; about 3 min)")
        with tempfile.TemporaryDirectory(prefix="flowmap-base-") as tmp:
            root = Path(tmp) / "root"
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(root),
                  MIRROR])
            (root / "etc/apt/sources.list").unlink(missing_ok=True)
            (root / "etc/apt/sources.list.d/debian.sources").write_text(SOURCES)
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (root / junk).glob("*"):
                    if p.is_file():
                        p.unlink()
            _run(["tar", "-C", str(root), "-cf", str(Path(tmp) / "rootfs.tar"), "."])
            shutil.rmtree(root)
            containerfile = ("FROM scratch\nADD rootfs.tar /\n"
                             "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8\n"
                             'CMD ["/bin/bash"]\n')
            return self._bud("base", key, containerfile, Path(tmp))

    def flowmap(self, base: Built) -> Built:
        """The repository's Dockerfile, as users build it, with the local base."""
        # What the build context holds (.dockerignore), and the two files Docker reads besides.
        files = sorted({"Dockerfile", ".dockerignore", *dockerignore.context(REPO)})
        key = _digest(base.archive.name, *(f"{f}:{_file_digest(REPO / f)}" for f in files))
        built = self._cached("flowmap", key)
        if built:
            return built
        self._load(base)
        self.log("[images] flowmap from the Dockerfile")
        return self._finish("flowmap", key, ["-f", str(REPO / "Dockerfile"), "--build-arg", f"BASE={base.name}",
                                             str(REPO)])

    def pause(self) -> Built:
        source = Path(json.loads(_run(
            ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{binaries.KUBERNETES_VERSION}"],
            cwd=tempfile.gettempdir(), env={"GOFLAGS": "-mod=mod"}))["Dir"]) / "build" / "pause" / "linux" / "pause.c"
        key = _digest(_file_digest(source))
        built = self._cached("pause", key)
        if built:
            return built
        with tempfile.TemporaryDirectory(prefix="flowmap-pause-") as tmp:
            _run(["gcc", "-Os", "-static", "-DVERSION=v3.10.2-flowmap", "-o", f"{tmp}/pause", str(source)])
            return self._bud("pause", key, 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n',
                             Path(tmp))

    # -- plumbing --------------------------------------------------------------------------------

    def _build(self, what: str, containerfile: str, files: dict[str, Path], parent: Built | None = None) -> Built:
        key = _digest(containerfile, parent.archive.name if parent else "",
                      *(f"{n}:{_file_digest(p)}" for n, p in sorted(files.items())))
        built = self._cached(what, key)
        if built:
            return built
        if parent:
            self._load(parent)
        with tempfile.TemporaryDirectory(prefix=f"flowmap-{what}-") as tmp:
            for name, src in files.items():
                shutil.copy2(src, Path(tmp) / name)
            return self._bud(what, key, containerfile, Path(tmp))

    def _bud(self, what: str, key: str, containerfile: str, context: Path) -> Built:
        (context / "Containerfile").write_text(containerfile)
        self.log(f"[images] {NAMES[what]}")
        return self._finish(what, key, ["-f", str(context / "Containerfile"), str(context)])

    def _finish(self, what: str, key: str, args: list[str]) -> Built:
        secret = ["--secret", f"id=build-ca,src={CA_BUNDLE}"] if CA_BUNDLE.is_file() else []
        _run(["buildah", *self.storage, "bud", "--isolation", "chroot", "--layers", *secret, "-t", NAMES[what],
              *args])
        archive = self.dir / f"{what}-{key}.tar"
        for old in self.dir.glob(f"{what}-*.tar"):
            old.unlink()
        tmp = archive.with_suffix(".part")
        tmp.unlink(missing_ok=True)
        _run(["buildah", *self.storage, "push", NAMES[what], f"docker-archive:{tmp}:{NAMES[what]}"])
        tmp.rename(archive)
        return Built(NAMES[what], archive)

    def _cached(self, what: str, key: str) -> Built | None:
        archive = self.dir / f"{what}-{key}.tar"
        return Built(NAMES[what], archive) if archive.is_file() else None

    def _load(self, built: Built) -> None:
        """Make a parent image known to buildah's storage (it may come from the archive alone)."""
        have = subprocess.run(["buildah", *self.storage, "inspect", "--type", "image", built.name],
                              capture_output=True)
        if have.returncode:
            _run(["buildah", *self.storage, "pull", f"docker-archive:{built.archive}"])

    def clean(self) -> None:
        """Drop buildah's working containers (images and archives stay cached)."""
        subprocess.run(["buildah", *self.storage, "rm", "--all"], capture_output=True)


def _apt(*packages: str) -> str:
    return ("RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
            f"{' '.join(packages)} && rm -rf /var/lib/apt/lists/*\n")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _run(argv: list[str], cwd: str | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout
