"""A real, local Kubernetes control plane: etcd and kube-apiserver on loopback.

In the spirit of controller-runtime's envtest: no kubelet, scheduler or controller-manager, so no
pod ever runs and no controller acts (the default ServiceAccounts, garbage collection and
namespace finalization are controller-manager work). What is real is what flowmap talks to: the
API server with TLS, client-certificate and service-account authentication, RBAC, TokenRequest and
TokenReview, CRD validation with CEL, and etcd behind it.

Everything a control plane owns lives in its state folder: certificates, etcd data, logs, the
admin kubeconfig, and ``state.json`` with the processes and ports, so ``down`` needs nothing else.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from flowmap_devenv import binaries, pki

Log = Callable[[str], None]
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CRDS = REPO / "crds"
SERVICE_CIDRS = "10.96.0.0/16,fd00:10:96::/112"
ISSUER = "https://kubernetes.default.svc.cluster.local"
READY_TIMEOUT = 90.0


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or reached; the message says why."""


@dataclass(frozen=True)
class State:
    etcd_pid: int
    apiserver_pid: int
    etcd_port: int
    apiserver_port: int
    kubectl: str
    bin_dir: str
    apiserver_argv: list[str]


def default_state_dir() -> Path:
    override = os.environ.get("FLOWMAP_CONTROLPLANE_DIR")
    if override:
        return Path(override).expanduser()
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "flowmap" / "controlplane"


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); it is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(pid: int, grace: float = 10.0) -> None:
    """Stop a process group started by us: TERM, then KILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (another process started it): poll instead
                done = 0 if _alive(pid) else pid
            if done:
                return
            time.sleep(0.05)


def choose_kubectl(built: Path) -> Path:
    """The machine's kubectl when it is within one minor version of the server, else the built one.

    kubectl is supported within one minor version of kube-apiserver; an older machine kubectl
    would print tables and apply CRDs slightly differently, so the built one is preferred then.
    """
    found = shutil.which("kubectl")
    if not found:
        return built
    try:
        out = subprocess.run([found, "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
        minor = int("".join(ch for ch in json.loads(out)["clientVersion"]["minor"] if ch.isdigit()))
    except (subprocess.SubprocessError, OSError, ValueError, KeyError):
        return built
    server_minor = int(binaries.KUBERNETES_VERSION.split(".")[1])
    return Path(found) if abs(minor - server_minor) <= 1 else built


class ControlPlane:
    """One local control plane, identified by its state folder."""

    def __init__(self, state_dir: Path | None = None, *, crds: Path | None = DEFAULT_CRDS,
                 log: Log = print) -> None:
        self.dir = (state_dir or default_state_dir()).resolve()
        self.crds = crds
        self.log = log

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def state(self) -> State | None:
        try:
            return State(**json.loads((self.dir / "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> bool:
        st = self.state()
        return bool(st and _alive(st.etcd_pid) and _alive(st.apiserver_pid) and self._ready(st.apiserver_port))

    # -- up -------------------------------------------------------------------------------------

    def up(self) -> State:
        """Start etcd and kube-apiserver (building them first if needed) and install the CRDs."""
        if self.running():
            st = self.state()
            assert st is not None
            self.log(f"control plane already running (state in {self.dir})")
            return st
        if self.dir.exists():
            self.down(quiet=True)
        bins = binaries.ensure(self.log)
        self.dir.mkdir(parents=True)
        (self.dir / "state.json").write_text("{}")  # marks the folder as ours before anything starts
        keys = pki.create(self.dir / "pki")
        etcd_port, peer_port, api_port = _free_ports(3)

        etcd = self._spawn("etcd", [
            str(bins.etcd), "--name=flowmap", f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls=https://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=https://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=flowmap=http://127.0.0.1:{peer_port}",
            f"--cert-file={keys.serving_cert}", f"--key-file={keys.serving_key}",
            f"--trusted-ca-file={keys.ca_cert}", "--client-cert-auth",
            # Throw-away data on a developer machine: fsync buys nothing and costs seconds.
            "--unsafe-no-fsync", "--log-level=warn",
        ])
        apiserver_argv = [
            str(bins.kube_apiserver),
            f"--etcd-servers=https://127.0.0.1:{etcd_port}", f"--etcd-cafile={keys.ca_cert}",
            f"--etcd-certfile={keys.etcd_client_cert}", f"--etcd-keyfile={keys.etcd_client_key}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={keys.serving_cert}", f"--tls-private-key-file={keys.serving_key}",
            f"--client-ca-file={keys.ca_cert}", f"--cert-dir={self.dir / 'apiserver'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={ISSUER}", f"--service-account-key-file={keys.sa_pub}",
            f"--service-account-signing-key-file={keys.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDRS}",
            # No controller-manager creates the "default" ServiceAccounts this plugin insists on
            # (envtest disables it for the same reason).
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true", "--profiling=false",
        ]
        apiserver = self._spawn("kube-apiserver", apiserver_argv)
        kubectl = choose_kubectl(bins.kubectl)
        st = State(etcd.pid, apiserver.pid, etcd_port, api_port, str(kubectl), str(bins.kube_apiserver.parent),
                   apiserver_argv)
        (self.dir / "state.json").write_text(json.dumps(asdict(st), indent=1))
        self._write_kubeconfig(keys, api_port)
        self._wait_ready(st, (etcd, apiserver))
        self.log(f"kube-apiserver {binaries.KUBERNETES_VERSION} ready at https://127.0.0.1:{api_port} "
                 f"(etcd {binaries.ETCD_VERSION} on :{etcd_port})")
        if self.crds is not None:
            self.install_crds(self.crds)
        return st

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            # A session of its own: Ctrl-C in the terminal that ran `up` must not stop it.
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.crt"))
        ctx.load_cert_chain(str(self.dir / "pki" / "admin.crt"), str(self.dir / "pki" / "admin.key"))
        return ctx

    def _ready(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=self._ssl(), timeout=5) as r:
                return bool(r.status == 200)
        except (OSError, ValueError):
            return False

    def _wait_ready(self, st: State, procs: Sequence[subprocess.Popen[bytes]],
                    names: Sequence[str] = ("etcd", "kube-apiserver")) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready(st.apiserver_port):
            for proc, name in zip(procs, names):
                if proc.poll() is not None:
                    raise ControlPlaneError(f"{name} exited with code {proc.returncode}:\n{self._tail(name)}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"kube-apiserver not ready after {READY_TIMEOUT:.0f} s:\n"
                                        f"{self._tail('kube-apiserver')}")
            time.sleep(0.25)

    def _tail(self, name: str, lines: int = 25) -> str:
        try:
            return "\n".join((self.dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _write_kubeconfig(self, keys: pki.Pki, port: int) -> None:
        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "flowmap",
            "clusters": [{"name": "flowmap", "cluster": {
                "server": f"https://127.0.0.1:{port}", "certificate-authority-data": b64(keys.ca_cert)}}],
            "users": [{"name": "flowmap-admin", "user": {
                "client-certificate-data": b64(keys.admin_cert), "client-key-data": b64(keys.admin_key)}}],
            "contexts": [{"name": "flowmap", "context": {"cluster": "flowmap", "user": "flowmap-admin"}}],
        }
        self.kubeconfig.write_text(json.dumps(config, indent=1))  # JSON is YAML: no YAML writer needed
        self.kubeconfig.chmod(0o600)

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only (etcd keeps the data): for tests of an API outage."""
        st = self.state()
        if st:
            _stop(st.apiserver_pid)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again with the same flags, and wait until it is ready."""
        st = self.state()
        if st is None:
            raise ControlPlaneError(f"no control plane in {self.dir}")
        proc = self._spawn("kube-apiserver", st.apiserver_argv)
        st = State(**{**asdict(st), "apiserver_pid": proc.pid})
        (self.dir / "state.json").write_text(json.dumps(asdict(st), indent=1))
        self._wait_ready(st, (proc,), names=("kube-apiserver",))

    # -- using it -------------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this control plane."""
        st = self.state()
        if st is None:
            raise ControlPlaneError(f"no control plane in {self.dir}: run 'flowmap controlplane up'")
        proc = subprocess.run([st.kubectl, f"--kubeconfig={self.kubeconfig}", *args], input=input,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def install_crds(self, folder: Path) -> list[str]:
        """Apply every CRD in ``folder`` and wait until the API server has established them."""
        files = sorted(folder.glob("*_*.yaml"))  # <group>_<plural>.yaml, kubebuilder's naming
        if not files:
            raise ControlPlaneError(f"no CRDs (<group>_<plural>.yaml) in {folder}")
        args = ["apply", "--server-side", "--force-conflicts", "--field-manager=flowmap-controlplane"]
        for f in files:
            args += ["-f", str(f)]
        self.kubectl(*args)
        names = [".".join(reversed(f.stem.split("_", 1))) for f in files]
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names])
        self.log(f"CRDs established: {', '.join(names)}")
        return names

    def env(self) -> str:
        """Shell lines that point kubectl at this control plane."""
        st = self.state()
        lines = [f"export KUBECONFIG={self.kubeconfig}"]
        if st and Path(st.kubectl).parent != Path(shutil.which("kubectl") or "/nonexistent").parent:
            lines.append(f'export PATH="{Path(st.kubectl).parent}:$PATH"')
        return "\n".join(lines)

    def status(self) -> dict[str, object]:
        st = self.state()
        if st is None:
            return {"state": str(self.dir), "running": False}
        return {"state": str(self.dir), "running": self.running(), "etcd": _alive(st.etcd_pid),
                "kube-apiserver": _alive(st.apiserver_pid), "server": f"https://127.0.0.1:{st.apiserver_port}",
                "kubeconfig": str(self.kubeconfig), "kubectl": st.kubectl}

    # -- down -----------------------------------------------------------------------------------

    def down(self, *, quiet: bool = False) -> None:
        """Stop both processes and remove all state."""
        st = self.state()
        if st:
            _stop(st.apiserver_pid)
            _stop(st.etcd_pid)
        if self.dir.exists():
            if not (self.dir / "state.json").exists() and any(self.dir.iterdir()):
                # Never remove a folder that is not ours (a mistyped FLOWMAP_CONTROLPLANE_DIR).
                raise ControlPlaneError(f"{self.dir} holds no control plane state.json: not removing it")
            shutil.rmtree(self.dir)
        if not quiet:
            self.log(f"control plane stopped; removed {self.dir}")
