"""The serving certificate of a plain install: made once in a Secret, renewed from the same CA,
published for the agents, and served; with the operator's own ServiceAccount, not as admin."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from kubernetes_asyncio import client

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_devenv import pki
from flowmap_operator import certs
from tests.conftest import REPO
from tests.operator.harness import NS, Cluster, Operator, as_operator, running

DAY = datetime.timedelta(days=1)


def deployment_env() -> dict[str, str]:
    """The operator's settings as the Deployment sets them: the test uses the shipped names."""
    deploy = yaml.safe_load((REPO / "manifests" / "operator" / "deployment.yaml").read_text())
    env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if "value" in e}


ENV = deployment_env()
SECRET, CONFIGMAP = ENV["FLOWMAP_OPERATOR_GRPC_TLS_SECRET"], ENV["FLOWMAP_OPERATOR_CA_CONFIGMAP"]
NAMES = certs.service_names("flowmap-operator", NS)


def keeper(core: client.CoreV1Api) -> certs.Keeper:
    return certs.Keeper(core, NS, SECRET, CONFIGMAP, NAMES)


def secret(cluster: Cluster) -> dict[str, Any]:
    return json.loads(cluster.plane.kubectl("get", "secret", SECRET, "-n", NS, "-o", "json").stdout)


def published_ca(cluster: Cluster) -> bytes:
    cm = json.loads(cluster.plane.kubectl("get", "configmap", CONFIGMAP, "-n", NS, "-o", "json").stdout)
    return str(cm["data"]["ca.crt"]).encode()


@pytest.fixture
def clean(cluster: Cluster) -> Iterator[None]:
    """Neither object exists before or after (the control plane is the session's)."""
    def remove() -> None:
        cluster.plane.kubectl("delete", "secret", SECRET, "-n", NS, "--ignore-not-found")
        cluster.plane.kubectl("delete", "configmap", CONFIGMAP, "-n", NS, "--ignore-not-found")
    remove()
    yield
    remove()


def test_issue_and_due_are_pure() -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    m = certs.issue(NAMES, now)
    cert, ca = x509.load_pem_x509_certificate(m.cert), x509.load_pem_x509_certificate(m.ca)
    cert.verify_directly_issued_by(ca)
    assert set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
               .get_values_for_type(x509.DNSName)) == set(NAMES)
    assert not certs.due(m, NAMES, now + 200 * DAY)
    assert certs.due(m, NAMES, now + 250 * DAY)  # a third of the year left
    assert certs.due(m, NAMES + ("flowmap-operator.other",), now)
    renewed = certs.issue(NAMES, now + 250 * DAY, m)
    assert (renewed.ca, renewed.ca_key) == (m.ca, m.ca_key) and renewed.cert != m.cert
    x509.load_pem_x509_certificate(renewed.cert).verify_directly_issued_by(ca)
    assert not certs.due(certs.Material(m.cert, m.key, m.ca), NAMES, now + 400 * DAY)  # not ours: not renewed


def test_racing_replicas_make_one_certificate_and_publish_its_ca(cluster: Cluster, clean: None) -> None:
    async def race(core: client.CoreV1Api) -> list[certs.Material]:
        return list(await asyncio.gather(*(keeper(core).ensure() for _ in range(3))))

    made = as_operator(cluster, race)
    assert len({m.cert for m in made}) == 1, "each replica must serve the one certificate the API server kept"
    stored = certs.Material.from_secret(secret(cluster)["data"])
    assert stored == made[0] and stored.ca_key is not None
    assert published_ca(cluster) == stored.ca
    assert secret(cluster)["type"] == "kubernetes.io/tls"


def test_a_due_certificate_is_renewed_from_the_same_ca_and_served_next(cluster: Cluster, clean: None) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    # Made 300 days ago: still valid for two months, but less than a third of its life is left.
    first = as_operator(cluster, lambda core: keeper(core).ensure(now - 300 * DAY))
    assert certs.due(first, NAMES, now)

    async def renew_while_serving(core: client.CoreV1Api) -> tuple[bytes, bytes, certs.Material]:
        k = keeper(core)
        k.material = first  # as a replica that has served it since then
        server = grpc.aio.server()
        port = server.add_secure_port("127.0.0.1:0", k.credentials())
        await server.start()
        try:
            before = await asyncio.to_thread(served_certificate, port, first.ca)
            renewed = await k.ensure()
            after = await asyncio.to_thread(served_certificate, port, renewed.ca)
        finally:
            await server.stop(0)
        return before, after, renewed

    before, after, renewed = as_operator(cluster, renew_while_serving)
    assert before == pem_to_der(first.cert)
    assert renewed.ca == first.ca and renewed.cert != first.cert and not certs.due(renewed, NAMES, now)
    assert after == pem_to_der(renewed.cert), "the running server must hand out the renewed certificate"
    assert certs.Material.from_secret(secret(cluster)["data"]) == renewed
    assert published_ca(cluster) == first.ca  # agents keep trusting the same CA


def test_a_certificate_kept_by_someone_else_is_served_as_it_is(cluster: Cluster, clean: None,
                                                               tmp_path: Path) -> None:
    keys = pki.create(tmp_path)  # stands in for cert-manager's Certificate: no ca.key in the Secret
    data = {"tls.crt": keys.serving_cert, "tls.key": keys.serving_key, "ca.crt": keys.ca_cert}
    cluster.plane.kubectl("create", "secret", "generic", SECRET, "-n", NS, "--type=kubernetes.io/tls",
                          *(f"--from-file={k}={v}" for k, v in data.items()))
    far = datetime.datetime.now(datetime.timezone.utc) + 3000 * DAY
    got = as_operator(cluster, lambda core: keeper(core).ensure(far))
    assert got.cert == keys.serving_cert.read_bytes() and got.ca_key is None
    assert base64.b64decode(secret(cluster)["data"]["tls.crt"]) == keys.serving_cert.read_bytes()  # untouched
    assert published_ca(cluster) == keys.ca_cert.read_bytes()


@pytest.fixture
def tls_operator(cluster: Cluster, clean: None) -> Iterator[Operator]:
    """The operator as the Deployment runs it: serving from the Secret it makes."""
    yield from running(cluster, grpc_tls_secret=SECRET, ca_configmap=CONFIGMAP)


def test_the_operator_serves_what_it_made_and_agents_trust_the_published_ca(cluster: Cluster,
                                                                            tls_operator: Operator) -> None:
    ca = published_ca(cluster)
    token = cluster.token("flowmap-agent", pod_name="agent-a")
    question = pb.ReportBatch(agent_id="certs-agent-a", node="node-a")  # no sequence: asks for the ack
    assert report(tls_operator.grpc_port, ca, f"flowmap-operator.{NS}.svc", question, token).leader
    with pytest.raises(grpc.RpcError) as err:  # a name the certificate does not carry is refused
        report(tls_operator.grpc_port, ca, "localhost", question, token)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def report(port: int, ca: bytes, name: str, batch: pb.ReportBatch, token: str) -> pb.ReportAck:
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", name)]) as ch:
        ack: pb.ReportAck = pb_grpc.ReportServiceStub(ch).Report(
            batch, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        return ack


def served_certificate(port: int, ca: bytes) -> bytes:
    """The DER certificate a TLS handshake with the port gets (verified against ``ca``)."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    ctx.set_alpn_protocols(["h2"])  # gRPC servers want it
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=NAMES[2]) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der
    return der


def pem_to_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
