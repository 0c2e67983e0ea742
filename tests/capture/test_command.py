"""``flowmap capture`` as a user runs it, against the session's real API server: the object
``start`` creates, the schema's refusals, ``list``, ``stop``, ``delete``, and RBAC refusing a user
who may only view, each with credentials of its own (a client certificate, as a kubeconfig holds).

No operator runs here for these captures (another test's may write their status: nothing below
depends on it). ``get`` needs the operator's results API, which this API server does not serve:
its download and checks are tested in test_captures.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowmap_devenv.controlplane import ControlPlane
from tests.conftest import REPO

NS = "capcli"  # this module's own namespace of the shared API server
VIEWER, EDITOR = "capcli-viewer", "capcli-editor"  # bound in NS to flowmap-viewer, flowmap-editor


def flowmap(*args: str, kubeconfig: Path, namespace: str | None = NS,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "flowmap_cli", "capture", *args, "--kubeconfig", str(kubeconfig)]
    argv += ["-n", namespace] if namespace else []
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def users(controlplane: ControlPlane) -> Iterator[dict[str, Path]]:
    """Kubeconfigs: the admin's, the admin's with NS as its context's namespace, a viewer's, an editor's."""
    plane = controlplane
    plane.kubectl("create", "namespace", NS, check=False)
    plane.kubectl("apply", "-f", str(REPO / "manifests" / "user-roles.yaml"))
    for user, role in ((VIEWER, "flowmap-viewer"), (EDITOR, "flowmap-editor")):
        plane.kubectl("create", "rolebinding", user, "-n", NS, f"--clusterrole={role}", f"--user={user}", check=False)
    contextual = plane.dir / "capcli-admin.kubeconfig"
    contextual.write_text(plane.kubeconfig.read_text())
    subprocess.run([plane.state().kubectl, "--kubeconfig", str(contextual),  # type: ignore[union-attr]
                    "config", "set-context", "--current", f"--namespace={NS}"], check=True, capture_output=True)
    yield {"admin": plane.kubeconfig, "contextual": contextual,
           VIEWER: plane.client_kubeconfig(VIEWER, VIEWER), EDITOR: plane.client_kubeconfig(EDITOR, EDITOR)}
    plane.kubectl("delete", "packetcaptures", "--all", "-n", NS, check=False)


def stored(plane: ControlPlane, name: str) -> dict[str, Any]:
    got: dict[str, Any] = json.loads(plane.kubectl("get", "packetcapture", name, "-n", NS, "-o", "json").stdout)
    return got


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowmap capture: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_start_creates_exactly_the_spec_of_its_flags(controlplane: ControlPlane, users: dict[str, Path]) -> None:
    proc = flowmap("start", "web-db", "--group", "web", "--peer-group", "db", "--protocol", "TCP", "--port", "5432",
                   "--direction", "Egress", "--duration", "2m", "--max-bytes", "4Mi", "--snap-length", "256",
                   "--trigger", "Denied", "--pre-trigger", "3", "--ttl", "2h", kubeconfig=users[EDITOR])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == f"packetcapture web-db created in {NS}"
    spec = stored(controlplane, "web-db")["spec"]
    # As given, with the schema's defaults (direction's is not used: given; maxPacketsPerNode's is).
    assert spec == {"targets": {"groups": ["web"]},
                    "filters": [{"peer": {"group": "db"}, "protocol": "TCP", "port": 5432, "direction": "Egress"}],
                    "durationSeconds": 120, "maxBytesPerNode": 4 * 1024 * 1024, "maxPacketsPerNode": 10000,
                    "snapLength": 256, "wholePackets": False, "ttlSecondsAfterFinished": 7200,
                    "trigger": {"on": "Denied", "preTriggerSeconds": 3}}
    # The namespace defaults to the context's.
    proc = flowmap("start", "every-pod", "--selector", "", kubeconfig=users["contextual"], namespace=None)
    assert proc.returncode == 0, proc.stderr
    assert stored(controlplane, "every-pod")["spec"]["targets"] == {"podSelector": {}}


def test_a_spec_the_schema_refuses_is_its_message_and_exit_code_1(users: dict[str, Path]) -> None:
    line = one_line_error(flowmap("start", "long", "--group", "web", "--duration", "20m", kubeconfig=users["admin"]),
                          "spec.durationSeconds", "600")
    assert line == ('flowmap capture: PacketCapture.flowmap.dev "long" is invalid: spec.durationSeconds: Invalid '
                    'value: 1200: spec.durationSeconds in body should be less than or equal to 600')
    one_line_error(flowmap("start", "nothing", kubeconfig=users["admin"]), "name groups or give a podSelector")
    one_line_error(flowmap("start", "both", "--group", "web", "--peer-group", "db", "--peer-cidr", "10.0.0.0/8",
                           kubeconfig=users["admin"]), "a peer is either a group or a cidr")
    one_line_error(flowmap("start", "port", "--group", "web", "--port", "53", kubeconfig=users["admin"]),
                   "a port needs protocol TCP, UDP or SCTP")
    line = one_line_error(flowmap("start", "proto", "--group", "web", "--protocol", "tcp", kubeconfig=users["admin"]),
                          "spec.filters[0].protocol", '"tcp"')
    assert "<nil>" not in line and "not checked" not in line  # the API server's note on CEL left unchecked
    one_line_error(flowmap("start", "pre", "--group", "web", "--pre-trigger", "3", kubeconfig=users["admin"]),
                   "spec.trigger.on")
    one_line_error(flowmap("start", "Bad_Name", "--group", "web", kubeconfig=users["admin"]), "Bad_Name")
    listed = flowmap("list", kubeconfig=users["admin"]).stdout
    assert not any(n in listed for n in ("long ", "nothing", "both", "port ", "proto", "pre "))


def test_list_stop_delete(controlplane: ControlPlane, users: dict[str, Path]) -> None:
    assert flowmap("start", "to-stop", "--group", "web", "--trigger", "Threat", kubeconfig=users[EDITOR]).returncode == 0
    again = flowmap("start", "to-stop", "--group", "web", kubeconfig=users[EDITOR])
    one_line_error(again, "already exists")
    listed = flowmap("list", kubeconfig=users[VIEWER])
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "TRIGGER", "PACKETS", "SIZE", "AGE", "NODES"]
    row = next(r.split() for r in rows if r.startswith("to-stop "))
    assert row[1:6] == ["Pending", "Threat", "0", "0", "B"] and row[-1] == "0/0", row  # no operator: no status

    before = stored(controlplane, "to-stop")
    proc = flowmap("stop", "to-stop", kubeconfig=users[EDITOR])
    assert proc.returncode == 0 and "to-stop stopping" in proc.stderr, proc.stderr
    after = stored(controlplane, "to-stop")
    assert after["metadata"]["annotations"] == {"flowmap.dev/stop": "true"}
    assert after["spec"] == before["spec"] and after["metadata"]["generation"] == before["metadata"]["generation"]
    assert "(stopping)" in next(r for r in flowmap("list", kubeconfig=users[EDITOR]).stdout.splitlines()
                                if r.startswith("to-stop "))
    assert flowmap("stop", "to-stop", kubeconfig=users[EDITOR]).returncode == 0  # again: the same

    assert flowmap("delete", "to-stop", kubeconfig=users[EDITOR]).returncode == 0
    gone = controlplane.kubectl("get", "packetcapture", "to-stop", "-n", NS, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    one_line_error(flowmap("stop", "to-stop", kubeconfig=users[EDITOR]), 'packetcaptures.flowmap.dev "to-stop" not found')
    one_line_error(flowmap("delete", "to-stop", kubeconfig=users[EDITOR]), "not found")


def test_a_user_who_may_only_view_is_refused_by_name(controlplane: ControlPlane, users: dict[str, Path]) -> None:
    one_line_error(flowmap("start", "spy", "--group", "web", kubeconfig=users[VIEWER]),
                   f'User "{VIEWER}" cannot create resource "packetcaptures" in API group "flowmap.dev"',
                   f'in the namespace "{NS}"')
    assert controlplane.kubectl("get", "packetcapture", "spy", "-n", NS, check=False).returncode != 0
    assert flowmap("start", "kept", "--group", "web", kubeconfig=users[EDITOR]).returncode == 0
    one_line_error(flowmap("stop", "kept", kubeconfig=users[VIEWER]),
                   f'User "{VIEWER}" cannot patch resource "packetcaptures"')
    one_line_error(flowmap("delete", "kept", kubeconfig=users[VIEWER]),
                   f'User "{VIEWER}" cannot delete resource "packetcaptures"')
    assert "annotations" not in stored(controlplane, "kept")["metadata"]
    # The editor of NS is nobody elsewhere.
    one_line_error(flowmap("list", kubeconfig=users[EDITOR], namespace="default"),
                   f'User "{EDITOR}" cannot list resource "packetcaptures"', '"default"')


def test_get_says_what_is_missing(controlplane: ControlPlane, users: dict[str, Path], tmp_path: Path) -> None:
    assert flowmap("start", "fresh", "--group", "web", kubeconfig=users[EDITOR]).returncode == 0
    one_line_error(flowmap("get", "fresh", "-o", "-", kubeconfig=users[EDITOR]), "no node has a finished file of fresh")
    one_line_error(flowmap("get", "absent", "-o", "-", kubeconfig=users[EDITOR]), '"absent" not found')
    served = controlplane.kubectl("get", "apiservice", "v1alpha1.results.flowmap.dev", check=False).returncode == 0
    if served:
        return  # another test installed the results API on this API server: the rest is for a server without it
    # With a finished node, the files are asked of the results API, through the API server, with the
    # user's client certificate; this API server does not serve it and says so.
    sha = "ab" * 32
    controlplane.kubectl("patch", "packetcapture", "fresh", "-n", NS, "--subresource=status", "--type=merge", "-p",
                         json.dumps({"status": {"phase": "Completed", "nodes": [
                             {"node": "node-a", "phase": "Completed", "fileBytes": 10, "sha256": sha}]}}))
    out = tmp_path / "fresh.pcapng"
    one_line_error(flowmap("get", "fresh", "-o", str(out), kubeconfig=users[EDITOR]),
                   "does not serve results.flowmap.dev", "results API is not installed")
    assert list(tmp_path.iterdir()) == []  # nothing under the name, no temporary file left
