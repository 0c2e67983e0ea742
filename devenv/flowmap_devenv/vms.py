"""A private libvirtd and the test VM's domain: real libvirt, started and stopped by the caller.

libvirtd runs as root, as on a hypervisor node, but nothing of it touches the machine's own
libvirt paths: it runs in a mount namespace of its own where ``/run`` is the caller's folder
(so its socket, ``<folder>/run/libvirt/libvirt-sock``, is reachable from outside it) and
``/etc`` and ``/var`` are overlays whose writes land in the folder too. Its ``qemu.conf`` runs
QEMU as root without a security driver, cgroups, a mount namespace or virtlogd, so it needs no
``libvirt-qemu`` user, no systemd and leaves no cgroup behind. Only the QEMU driver is installed
(no network driver): the default network (virbr0) and its firewall rules cannot exist.

In a network namespace (``netns``), libvirtd and so QEMU and the VMs' tap devices live there: a
test node. :meth:`Libvirtd.stop` destroys every running domain first (libvirtd leaves QEMU
running when it stops, by design), then stops libvirtd; whatever QEMU survives is killed by the
pid libvirt wrote for it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from xml.sax.saxutils import escape, quoteattr

from flowmap_devenv.vmimage import Image

LIBVIRTD = "/usr/sbin/libvirtd"
QEMU_CONF = """# flowmap's private libvirtd (flowmap_devenv.vms): QEMU as root, nothing host-wide.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
QEMU_PASSWD = "libvirt-qemu:x:64055:64055:flowmap's private libvirtd:/nonexistent:/usr/sbin/nologin"
QEMU_GROUP = "libvirt-qemu:x:64055:"
LIBVIRTD_CONF = """# flowmap's private libvirtd (flowmap_devenv.vms): root's socket only, no listening port.
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:stderr"
"""


@dataclass(frozen=True)
class Domain:
    """What the test VM's domain says: its name and UUID, its NIC (MAC, host tap), the addresses
    on both ends of the tap, and an optional label in the domain's flowmap metadata."""

    name: str
    uuid: str
    mac: str
    tap: str
    host_ip: str  # the tap's address on the host, e.g. 10.77.0.1
    vm_ip: str  # the VM's, on the same /24 ... /30
    prefix: int
    console: Path  # the serial console's log
    label: str = ""
    memory_mib: int = 192
    dns: str = ""  # the VM's name server; "" for the tap's host address

    def xml(self, image: Image, accel: str) -> str:
        """The domain's XML: direct kernel boot, one virtio NIC on a tap libvirt makes, no disk, ACPI
        (PCI hot-plug of another NIC needs it);
        ``accel`` (``kvm`` or ``tcg``, :func:`flowmap_devenv.vmimage.accelerator`) its type."""
        cmdline = (f"console=ttyS0 panic=-1 flowmap.ip={self.vm_ip}/{self.prefix} flowmap.gw={self.host_ip} "
                   f"flowmap.dns={self.dns or self.host_ip} flowmap.name={self.name}")
        metadata = (f"<metadata><flowmap:vm xmlns:flowmap='https://flowmap.dev/libvirt/1'>"
                    f"<flowmap:label>{escape(self.label)}</flowmap:label></flowmap:vm></metadata>"
                    if self.label else "")
        return f"""<domain type='{"kvm" if accel == "kvm" else "qemu"}'>
  <name>{escape(self.name)}</name>
  <uuid>{self.uuid}</uuid>
  {metadata}
  <memory unit='MiB'>{self.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <interface type='ethernet'>
      <mac address={quoteattr(self.mac)}/>
      <target dev={quoteattr(self.tap)}/>
      <source><ip address={quoteattr(self.host_ip)} prefix='{self.prefix}'/></source>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path={quoteattr(str(self.console))}/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _with_qemu_user(etc: Path) -> None:
    """The overlay's passwd and group with Debian's QEMU user: libvirtd resolves its built-in
    user before it reads ``qemu.conf`` (which then says root) and fails where the package that
    creates it (libvirt-daemon-system) is not installed. The machine's own files are untouched."""
    for name, line in (("passwd", QEMU_PASSWD), ("group", QEMU_GROUP)):
        text = Path("/etc", name).read_text()
        if not any(entry.startswith("libvirt-qemu:") for entry in text.splitlines()):
            text = text + ("" if text.endswith("\n") else "\n") + line + "\n"
        (etc / name).write_text(text)


class Libvirtd:
    """One private libvirtd with its state under ``folder``, optionally in network namespace ``netns``.

    The namespaces are held by a process of their own (``sleep``), so that a libvirtd killed and
    started again runs in the same mounts as the QEMU processes it left: on a node, a restarted
    libvirtd finds its domains' monitor sockets where they were. (The caller must not be a child
    subreaper: libvirt daemonizes QEMU and waits for the processes it kills to vanish, which a
    zombie of an unreaping parent never does.)
    """

    def __init__(self, folder: Path, netns: str = "") -> None:
        self.folder, self.netns = folder, netns
        self.holder: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._qemu: set[int] = set()

    @property
    def socket(self) -> Path:
        return self.folder / "run" / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The URI a libvirt client connects with (``qemu:///system`` through this socket)."""
        return f"qemu:///system?socket={self.socket}"

    @property
    def log_file(self) -> Path:
        return self.folder / "libvirtd.log"

    def _hold(self) -> subprocess.Popen[bytes]:
        """The process holding the mount (and network) namespace, started once."""
        if self.holder is not None and self.holder.poll() is None:
            return self.holder
        f = self.folder
        for sub in ("run", "etc/libvirt", "var", ".etc-work", ".var-work"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        (f / "etc/libvirt/qemu.conf").write_text(QEMU_CONF)
        (f / "etc/libvirt/libvirtd.conf").write_text(LIBVIRTD_CONF)
        _with_qemu_user(f / "etc")
        ready = f / "run" / ".mounted"
        script = "; ".join((
            "set -e",
            f"mount --bind {shlex.quote(str(f / 'run'))} /run",
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={f / 'etc'},workdir={f / '.etc-work'} /etc",
            f"mount -t overlay overlay -o lowerdir=/var,upperdir={f / 'var'},workdir={f / '.var-work'} /var",
            "touch /run/.mounted",
            "exec sleep infinity",
        ))
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.holder = subprocess.Popen([*prefix, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=open(self.log_file, "ab"), start_new_session=True)
        deadline = time.monotonic() + 10
        while not ready.exists():
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd's namespaces could not be set up: {self.log_file.read_text()[-2000:]}")
            time.sleep(0.02)
        return self.holder

    def start(self, timeout: float = 30.0) -> None:
        """Start libvirtd (again, after a :meth:`kill`: it finds its running domains in its state)."""
        if not os.path.exists(LIBVIRTD):
            raise RuntimeError(f"{LIBVIRTD} is missing: apt-get install libvirt-daemon libvirt-daemon-driver-qemu")
        holder = self._hold()
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(["nsenter", f"--target={holder.pid}", "--mount", "--net", "--",
                                      LIBVIRTD, "-f", "/etc/libvirt/libvirtd.conf"],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited ({self.proc.returncode}): {self.log_file.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"libvirtd did not answer on {self.socket} in {timeout:.0f} s")
            time.sleep(0.1)

    def _answers(self) -> bool:
        import libvirt  # the binding, here only once libvirtd is wanted

        if not self.socket.exists():
            return False
        try:
            libvirt.open(self.uri).close()
        except libvirt.libvirtError:
            return False
        return True

    def _note_qemu(self) -> None:
        for pidfile in (self.folder / "run" / "libvirt" / "qemu").glob("*.pid"):
            try:
                self._qemu.add(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                pass

    def kill(self) -> None:
        """Kill libvirtd at once (SIGKILL), leaving its domains running, as a crash would."""
        self._note_qemu()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close_log()

    def stop(self) -> None:
        """Destroy every running domain, stop libvirtd, kill any QEMU it left, and the namespaces' holder."""
        self._note_qemu()
        if self.proc is not None and self.proc.poll() is None:
            try:
                import libvirt

                conn = libvirt.open(self.uri)
                try:
                    for dom in conn.listAllDomains():
                        if dom.isActive():
                            dom.destroy()
                finally:
                    conn.close()
            except Exception:  # noqa: BLE001 - stopping goes on; the pids below are the safety net
                pass
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._close_log()
        for pid in self._qemu:
            try:
                if b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.holder is not None and self.holder.poll() is None:
            os.killpg(self.holder.pid, signal.SIGKILL)
            self.holder.wait()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
