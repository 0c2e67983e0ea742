"""A small virtual machine for the libvirt tests: a Debian kernel and a busybox initramfs, built once.

* the kernel: the one Debian's ``linux-image-amd64`` points at, fetched with ``apt-get download``
  and unpacked with ``dpkg-deb``; its ``vmlinuz`` and the modules a virtio NIC needs
  (``virtio_pci`` and ``virtio_net`` with what their ``.modinfo`` says they depend on);
* the initramfs: busybox (Debian's ``busybox-static``), those modules and an ``/init`` that loads
  them, gives ``eth0`` the address, gateway and name server the kernel command line carries
  (``flowmap.ip=10.0.0.2/24 flowmap.gw=10.0.0.1 flowmap.dns=10.0.0.1 flowmap.name=vm``), serves
  HTTP with busybox ``httpd`` on port 80 and says ``flowmap-vm: ready`` on the serial console.
  Its page ``/`` names the VM; ``/cgi-bin/fetch?URL`` runs ``wget`` and ``/cgi-bin/lookup?NAME``
  ``nslookup`` from inside the VM, so a test makes the VM a client too (under ``timeout``:
  Debian's static busybox 1.35 ``wget -T`` crashes).

Kept in ``~/.cache/flowmap/vm/<kernel package>-<digest>/``, the digest covering everything that
went in (the init script, busybox, the module list), so an unchanged image is never built twice.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flowmap_devenv import binaries
from flowmap_devenv.binaries import MissingTool

Log = Callable[[str], None]
KERNEL_META = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")  # busybox-static's: the initramfs has no C library
MODULES = ("virtio_pci", "virtio_net")  # and what they depend on
READY = "flowmap-vm: ready"
INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /etc /tmp /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules.order); do insmod "/modules/$module.ko" || echo "flowmap-vm: insmod $module failed"; done
ip= gw= dns= name=vm
for word in $(cat /proc/cmdline); do
  case "$word" in
    flowmap.ip=*) ip="${word#flowmap.ip=}" ;;
    flowmap.gw=*) gw="${word#flowmap.gw=}" ;;
    flowmap.dns=*) dns="${word#flowmap.dns=}" ;;
    flowmap.name=*) name="${word#flowmap.name=}" ;;
  esac
done
hostname "$name"
ip link set lo up
tries=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $tries -lt 50 ]; do sleep 0.1; tries=$((tries + 1)); done
ip link set eth0 up
[ -n "$ip" ] && ip addr add "$ip" dev eth0
[ -n "$gw" ] && ip route add default via "$gw"
[ -n "$dns" ] && echo "nameserver $dns" > /etc/resolv.conf
mkdir -p /www/cgi-bin
echo "flowmap-vm $name" > /www/index.html
cat > /www/cgi-bin/fetch <<'END'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
timeout 10 wget -q -O - "$QUERY_STRING" 2>&1 | head -c 1048576
END
cat > /www/cgi-bin/lookup <<'END'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
timeout 10 nslookup "$QUERY_STRING" 2>&1 | head -c 65536
END
chmod 755 /www/cgi-bin/fetch /www/cgi-bin/lookup
httpd -p 80 -h /www
echo "flowmap-vm: ready $name $ip $(cat /sys/class/net/eth0/address)"
while true; do sleep 3600; done
"""


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    release: str  # the kernel's, as ``uname -r`` says in the VM


def cache_dir() -> Path:
    return binaries.cache_root().parent / "vm"


def kernel_package() -> str:
    """The kernel package ``linux-image-amd64`` depends on now (apt's lists must be current)."""
    shown = _run(["apt-cache", "depends", KERNEL_META])
    found = re.findall(r"Depends:\s+(linux-image-\S+)", shown)
    if not found:
        raise RuntimeError(f"apt-cache depends {KERNEL_META} names no kernel package (run 'apt-get update')")
    return str(found[0])


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:12]


def find() -> Image | None:
    """The newest image in the cache, or None."""
    folder = cache_dir()
    if not folder.is_dir() or not BUSYBOX.is_file():
        return None
    want = _digest(INIT.encode(), BUSYBOX.read_bytes(), " ".join(MODULES).encode())
    for built in sorted(folder.glob(f"*-{want}"), key=lambda p: p.stat().st_mtime, reverse=True):
        if (built / "vmlinuz").is_file() and (built / "initrd.gz").is_file():
            return Image(built / "vmlinuz", built / "initrd.gz", (built / "release").read_text().strip())
    return None


def ensure(log: Log = print) -> Image:
    """The VM's kernel and initramfs, built first if the cache has none."""
    found = find()
    if found is not None:
        return found
    for tool, package in (("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            raise MissingTool(f"'{tool}' (Debian's {package}) is needed to fetch the VM's kernel")
    if not BUSYBOX.is_file():
        raise MissingTool(f"{BUSYBOX} is missing: apt-get install busybox-static")
    package = kernel_package()
    want = _digest(INIT.encode(), BUSYBOX.read_bytes(), " ".join(MODULES).encode())
    dest = cache_dir() / f"{package}-{want}"
    log(f"[build] the test VM: {package}'s kernel and a busybox initramfs (once; about 1 min)")
    with tempfile.TemporaryDirectory(prefix="flowmap-vm-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", package], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {package} left {len(debs)} packages")
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        kernels = sorted((tree / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise RuntimeError(f"{package} holds {len(kernels)} kernels")
        release = kernels[0].name.removeprefix("vmlinuz-")
        found_modules = {p.name.removesuffix(".ko"): p for p in (tree / "lib/modules" / release).rglob("*.ko")}
        order = module_order(MODULES, lambda name: depends(found_modules[name].read_bytes()), found_modules)
        files: dict[str, bytes] = {"init": INIT.encode(), "bin/busybox": BUSYBOX.read_bytes(),
                                   "modules.order": "".join(f"{m}\n" for m in order).encode()}
        files.update({f"modules/{m}.ko": found_modules[m].read_bytes() for m in order})
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=_mkdir(cache_dir())))
        try:
            staging.chmod(0o755)
            shutil.copyfile(kernels[0], staging / "vmlinuz")
            (staging / "initrd.gz").write_bytes(gzip.compress(cpio(files), compresslevel=6, mtime=0))
            (staging / "release").write_text(release + "\n")
            shutil.rmtree(dest, ignore_errors=True)
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for old in cache_dir().glob("linux-image-*"):  # what earlier init scripts or kernels built
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    log(f"[build] the test VM is in {dest} (kernel {release}, modules {' '.join(order)})")
    image = find()
    assert image is not None
    return image


def accelerator(image: Image, log: Log = print) -> str:
    """``kvm`` where ``/dev/kvm`` exists and boots this kernel, ``tcg`` (QEMU's emulation) otherwise;
    ``FLOWMAP_VM_ACCEL`` forces either. /dev/kvm can exist yet not boot a guest (nested
    virtualisation some hypervisors expose but do not complete: QEMU aborts or the guest hangs
    after the BIOS), so the first use on a host kernel boots the image once with KVM, at most
    ``PROBE_SECONDS``, and keeps the verdict beside the image."""
    forced = os.environ.get("FLOWMAP_VM_ACCEL", "")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise ValueError(f"FLOWMAP_VM_ACCEL={forced!r}: say kvm or tcg")
        return forced
    if not os.path.exists("/dev/kvm"):
        return "tcg"
    verdict = image.kernel.parent / f"kvm-{os.uname().release}"
    if not verdict.exists():
        works = _boots(image, "kvm")
        log(f"[vm] KVM {'boots' if works else 'does not boot'} the test VM on this host: using "
            f"{'KVM' if works else 'TCG'}")
        verdict.write_text("kvm\n" if works else "tcg\n")
    return verdict.read_text().strip()


PROBE_SECONDS = 20.0


def _boots(image: Image, accel: str) -> bool:
    """Whether QEMU with ``accel`` boots the image to its ready line within ``PROBE_SECONDS`` (with
    QEMU's default CPU model, as the domain, which names none)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise MissingTool("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")
    proc = subprocess.Popen(
        [qemu, "-accel", accel, "-m", "192", "-nographic",
         "-no-reboot", "-nic", "none", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
         "-append", "console=ttyS0 panic=-1 quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = proc.stdout
        assert out is not None
        os.set_blocking(out.fileno(), False)
        seen = b""
        deadline = time.monotonic() + PROBE_SECONDS
        while time.monotonic() < deadline and proc.poll() is None:
            seen = (seen + (out.read() or b""))[-4096:]
            if READY.encode() in seen:
                return True
            time.sleep(0.1)
        return READY.encode() in seen + (out.read() or b"")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def depends(module: bytes) -> list[str]:
    """The modules a ``.ko`` says it needs (its ``.modinfo`` ``depends=`` entry)."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", module)
    if match is None:
        return []
    return [name.decode().replace("-", "_") for name in match.group(1).split(b",") if name]


def module_order(wanted: Iterable[str], needs: Callable[[str], list[str]], known: Iterable[str]) -> list[str]:
    """``wanted`` with everything they need, each after what it needs (the order to insmod)."""
    available = {name.replace("-", "_"): name for name in known}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key not in available:
            raise RuntimeError(f"module {name} is not in the kernel package")
        real = available[key]
        if real in order:
            return
        if real in visiting:
            raise RuntimeError(f"modules depend on each other in a cycle through {real}")
        visiting.add(real)
        for dep in needs(real):
            visit(dep)
        visiting.discard(real)
        order.append(real)

    for name in wanted:
        visit(name)
    return order


def cpio(files: dict[str, bytes]) -> bytes:
    """A ``newc`` cpio archive of ``files`` (path -> content; ``init`` and ``bin/*`` executable),
    their folders first, as the kernel unpacks an initramfs."""
    out = io.BytesIO()
    ino = 1

    def entry(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0))
        out.write(header.encode() + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1

    folders = sorted({str(Path(name).parents[i]) for name in files for i in range(len(Path(name).parents) - 1)})
    for folder in folders:
        entry(folder, 0o040755, b"")
    for name, data in sorted(files.items()):
        executable = name == "init" or name.startswith("bin/")
        entry(name, 0o100755 if executable else 0o100644, data)
    entry("TRAILER!!!", 0, b"")
    out.write(b"\0" * (-out.tell() % 512))
    return out.getvalue()


def _run(args: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


if __name__ == "__main__":
    built = ensure(lambda line: print(line, file=sys.stderr))
    print(built, accelerator(built, lambda line: print(line, file=sys.stderr)))
