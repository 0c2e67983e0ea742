"""A real, local Kubernetes control plane: etcd and kube-apiserver, on loopback or for a cluster.

By default in the spirit of controller-runtime's envtest: no kubelet, scheduler or
controller-manager, so no pod ever runs and no controller acts (the default ServiceAccounts,
garbage collection and namespace finalization are controller-manager work). What is real is what
flowmap talks to: the API server with TLS, client-certificate and service-account authentication,
RBAC, TokenRequest and TokenReview, CRD validation with CEL, and etcd behind it.

With :class:`Options` naming a ``cluster_cidr`` it is the control plane of a real cluster
(flowmap_devenv.cluster): the API server listens on an address nodes reach, with the admission and
authorization of a production cluster (ServiceAccount, NodeRestriction; Node,RBAC), and
kube-controller-manager (allocating each node's pod CIDR) and kube-scheduler run beside it.

Everything a control plane owns lives in its state folder: certificates, etcd data, logs, the
admin kubeconfig, and ``state.json`` with the processes and ports, so ``down`` needs nothing else.
"""

from __future__ import annotations

import base64
import ipaddress
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
from dataclasses import asdict, dataclass, field
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
class Options:
    """Where the API server listens, and whether it runs a cluster with nodes."""

    address: str = "127.0.0.1"  # it listens and advertises here; the serving certificate names it
    port: int = 0  # 0: a free port
    service_cidrs: str = SERVICE_CIDRS
    cluster_cidr: str = ""  # pods' addresses: set, the controllers run and nodes may join


@dataclass(frozen=True)
class State:
    etcd_pid: int
    apiserver_pid: int
    etcd_port: int
    apiserver_port: int
    kubectl: str
    bin_dir: str
    apiserver_argv: list[str]
    address: str = "127.0.0.1"
    controllers: dict[str, int] = field(default_factory=dict)  # kube-controller-manager, kube-scheduler: pid


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
                 log: Log = print, options: Options = Options()) -> None:
        self.dir = (state_dir or default_state_dir()).resolve()
        self.crds = crds
        self.log = log
        self.options = options

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
        return bool(st and _alive(st.etcd_pid) and _alive(st.apiserver_pid) and self._ready(st)
                    and all(_alive(pid) for pid in st.controllers.values()))

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
        opts = self.options
        bins = binaries.ensure(self.log)
        self.dir.mkdir(parents=True)
        (self.dir / "state.json").write_text("{}")  # marks the folder as ours before anything starts
        service_ip = str(ipaddress.ip_network(opts.service_cidrs.split(",")[0])[1])  # the kubernetes Service
        keys = pki.create(self.dir / "pki", server_ips=(opts.address, service_ip))
        etcd_port, peer_port, api_port = _free_ports(3)
        api_port = opts.port or api_port

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
            f"--bind-address={opts.address}", f"--advertise-address={opts.address}", f"--secure-port={api_port}",
            f"--tls-cert-file={keys.serving_cert}", f"--tls-private-key-file={keys.serving_key}",
            f"--client-ca-file={keys.ca_cert}", f"--cert-dir={self.dir / 'apiserver'}",
            f"--service-account-issuer={ISSUER}", f"--service-account-key-file={keys.sa_pub}",
            f"--service-account-signing-key-file={keys.sa_key}",
            f"--service-cluster-ip-range={opts.service_cidrs}",
            "--allow-privileged=true", "--profiling=false",
            # The front proxy, for aggregated APIs (flowmap's results.flowmap.dev): the API server
            # proxies with this certificate and publishes the CA and the header names in
            # kube-system/extension-apiserver-authentication; it dials an endpoint of the API's
            # Service itself (no kube-proxy next to it).
            f"--requestheader-client-ca-file={keys.front_proxy_ca}",
            f"--requestheader-allowed-names={pki.FRONT_PROXY_NAME}",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={keys.front_proxy_cert}", f"--proxy-client-key-file={keys.front_proxy_key}",
            "--enable-aggregator-routing=true",
        ]
        if opts.cluster_cidr:
            kubelet_client = pki.issue(keys.ca_cert.parent, "kubelet-client", "kube-apiserver-kubelet-client",
                                       "system:masters")
            apiserver_argv += [
                "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
                f"--kubelet-client-certificate={kubelet_client[0]}", f"--kubelet-client-key={kubelet_client[1]}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            # No controller-manager creates the "default" ServiceAccounts this plugin insists on
            # (envtest disables it for the same reason).
            apiserver_argv += ["--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount"]
        apiserver = self._spawn("kube-apiserver", apiserver_argv)
        kubectl = choose_kubectl(bins.kubectl)
        st = State(etcd.pid, apiserver.pid, etcd_port, api_port, str(kubectl), str(bins.kube_apiserver.parent),
                   apiserver_argv, opts.address)
        (self.dir / "state.json").write_text(json.dumps(asdict(st), indent=1))
        self._write_kubeconfig(keys, api_port)
        self._wait_ready(st, (etcd, apiserver))
        self.log(f"kube-apiserver {binaries.KUBERNETES_VERSION} ready at {self.server(st)} "
                 f"(etcd {binaries.ETCD_VERSION} on :{etcd_port})")
        if opts.cluster_cidr:
            st = self._start_controllers(st, keys)
        if self.crds is not None:
            self.install_crds(self.crds)
        return st

    def _start_controllers(self, st: State, keys: pki.Pki) -> State:
        """kube-controller-manager and kube-scheduler, each with its own identity."""
        opts = self.options
        bins = binaries.ensure_programs(("kube-controller-manager", "kube-scheduler"), self.log)
        cm = self.client_kubeconfig("kube-controller-manager", "system:kube-controller-manager")
        sched = self.client_kubeconfig("kube-scheduler", "system:kube-scheduler")
        pids = {
            "kube-controller-manager": self._spawn("kube-controller-manager", [
                str(bins["kube-controller-manager"]), f"--kubeconfig={cm}", "--leader-elect=false",
                "--bind-address=127.0.0.1", "--secure-port=0",
                "--allocate-node-cidrs", f"--cluster-cidr={opts.cluster_cidr}", "--node-cidr-mask-size=24",
                f"--service-cluster-ip-range={opts.service_cidrs}", "--use-service-account-credentials",
                f"--service-account-private-key-file={keys.sa_key}", f"--root-ca-file={keys.ca_cert}",
                f"--cluster-signing-cert-file={keys.ca_cert}", f"--cluster-signing-key-file={keys.ca_key}",
                "--controllers=*,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
            ]).pid,
            "kube-scheduler": self._spawn("kube-scheduler", [
                str(bins["kube-scheduler"]), f"--kubeconfig={sched}", f"--authentication-kubeconfig={sched}",
                f"--authorization-kubeconfig={sched}", "--leader-elect=false", "--bind-address=127.0.0.1",
                f"--secure-port={_free_ports(1)[0]}",
            ]).pid,
        }
        st = State(**{**asdict(st), "controllers": pids})
        (self.dir / "state.json").write_text(json.dumps(asdict(st), indent=1))
        return st

    def server(self, st: State | None = None) -> str:
        st = st or self.state()
        if st is None:
            raise ControlPlaneError(f"no control plane in {self.dir}")
        host = f"[{st.address}]" if ":" in st.address else st.address
        return f"https://{host}:{st.apiserver_port}"

    def client_kubeconfig(self, stem: str, user: str, group: str | None = None) -> Path:
        """A kubeconfig for ``user`` (and ``group``), with a certificate of its own."""
        folder = self.dir / "pki"
        cert, key = pki.issue(folder, stem, user, group)
        path = self.dir / f"{stem}.kubeconfig"
        self._write_config(path, folder / "ca.crt", cert, key)
        return path

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

    def _ready(self, st: State) -> bool:
        try:
            with urllib.request.urlopen(f"{self.server(st)}/readyz", context=self._ssl(), timeout=5) as r:
                return bool(r.status == 200)
        except (OSError, ValueError):
            return False

    def _wait_ready(self, st: State, procs: Sequence[subprocess.Popen[bytes]],
                    names: Sequence[str] = ("etcd", "kube-apiserver")) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready(st):
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
        self._write_config(self.kubeconfig, keys.ca_cert, keys.admin_cert, keys.admin_key)

    def _write_config(self, path: Path, ca: Path, cert: Path, key: Path) -> None:
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "flowmap",
            "clusters": [{"name": "flowmap", "cluster": {
                "server": self.server(), "certificate-authority-data": b64(ca)}}],
            "users": [{"name": "user", "user": {
                "client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
            "contexts": [{"name": "flowmap", "context": {"cluster": "flowmap", "user": "user"}}],
        }
        path.write_text(json.dumps(config, indent=1))  # JSON is YAML: no YAML writer needed
        path.chmod(0o600)

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
                "kube-apiserver": _alive(st.apiserver_pid), "server": self.server(st),
                "kubeconfig": str(self.kubeconfig), "kubectl": st.kubectl}

    # -- down -----------------------------------------------------------------------------------

    def down(self, *, quiet: bool = False) -> None:
        """Stop every process and remove all state."""
        st = self.state()
        if st:
            for pid in st.controllers.values():
                _stop(pid)
            _stop(st.apiserver_pid)
            _stop(st.etcd_pid)
        if self.dir.exists():
            if not (self.dir / "state.json").exists() and any(self.dir.iterdir()):
                # Never remove a folder that is not ours (a mistyped FLOWMAP_CONTROLPLANE_DIR).
                raise ControlPlaneError(f"{self.dir} holds no control plane state.json: not removing it")
            shutil.rmtree(self.dir)
        if not quiet:
            self.log(f"control plane stopped; removed {self.dir}")
