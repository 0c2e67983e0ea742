"""`flowmap controlplane up | status | env | down` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flowmap_devenv.controlplane import ControlPlane, _alive


def flowmap(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowmap_cli", "controlplane", "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=300)


def test_up_status_env_down_leaves_nothing(controlplane: ControlPlane, tmp_path: Path) -> None:
    # The session's control plane proves the binaries exist; this one is started by the CLI.
    state = tmp_path / "cp"
    up = flowmap("up", state=state)
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={state / 'kubeconfig'}" in up.stdout
    assert "CRDs established" in up.stderr

    status = flowmap("status", state=state)
    assert status.returncode == 0 and json.loads(status.stdout)["running"] is True
    assert flowmap("up", state=state).stderr.startswith("control plane already running")
    assert flowmap("env", state=state).stdout.startswith(f"export KUBECONFIG={state / 'kubeconfig'}")

    plane = ControlPlane(state)
    crds = plane.kubectl("get", "crd", "-o", "name").stdout.split()
    assert sorted(crds) == ["customresourcedefinition.apiextensions.k8s.io/clusterkopfpeerings.kopf.dev",
                            "customresourcedefinition.apiextensions.k8s.io/connections.flowmap.dev",
                            "customresourcedefinition.apiextensions.k8s.io/groups.flowmap.dev",
                            "customresourcedefinition.apiextensions.k8s.io/networklearningpolicies.flowmap.dev",
                            "customresourcedefinition.apiextensions.k8s.io/packetcaptures.flowmap.dev"]
    # RBAC is on: an unknown user is refused.
    denied = plane.kubectl("get", "connections", "--as=nobody", check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    st = plane.state()
    assert st is not None
    down = flowmap("down", state=state)
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    assert not _alive(st.etcd_pid) and not _alive(st.apiserver_pid)
    assert flowmap("status", state=state).returncode == 1


def test_down_refuses_a_folder_that_is_not_a_control_plane(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    proc = flowmap("down", state=precious)
    assert proc.returncode == 1 and "not removing it" in proc.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
    assert os.listdir(precious) == ["notes.txt"]
