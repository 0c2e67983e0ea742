"""The gRPC serving certificate of a plain ``kubectl apply -k`` install, kept in a Secret.

Nothing in the repository holds a key. When ``FLOWMAP_OPERATOR_GRPC_TLS_SECRET`` names a Secret
of the operator's namespace, the operator serves the certificate in it, and:

* makes it when it is missing: a CA (10 years) and a serving certificate for the Service's DNS
  names (1 year), in one create. Replicas starting together race; the API server lets exactly one
  create win, and the others read the winner's (so every agent trusts one CA);
* renews it, from the same CA, when it is due (a third of its life left, or a name missing), and
  the running server hands the new one to the next handshake. Agents need nothing: the CA stays;
* takes it as it is when the Secret holds no ``ca.key``: one that cert-manager (or an admin)
  keeps, with its ``ca.crt``; cert-manager renews it, the operator reloads it;
* publishes ``ca.crt`` in a ConfigMap of its namespace that the agents' DaemonSet mounts.

Its RBAC is a Role in its namespace: get/update of exactly these two names, and create.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes_asyncio import client

from flowmap_api.pacing import pause
from flowmap_operator.errors import Conflict, NotFound
from flowmap_operator.kubeapi import call

log = logging.getLogger("flowmap.operator.certs")
CA_LIFE = datetime.timedelta(days=3650)
SERVING_LIFE = datetime.timedelta(days=365)
CHECK_EVERY = 3600.0  # seconds between looks at the Secret (renewal, or cert-manager's new one)
_LABELS = {"app.kubernetes.io/part-of": "flowmap", "app.kubernetes.io/managed-by": "flowmap-operator"}


@dataclass(frozen=True)
class Material:
    """PEM bytes as the Secret keeps them; ``ca_key`` only when the operator made the CA."""

    cert: bytes
    key: bytes
    ca: bytes
    ca_key: bytes | None = None

    @classmethod
    def from_secret(cls, data: dict[str, str]) -> Material:
        """From a Secret's base64 ``data`` (tls.crt, tls.key, ca.crt[, ca.key])."""
        raw = {k: base64.b64decode(v) for k, v in data.items()}
        if not (raw.get("tls.crt") and raw.get("tls.key") and raw.get("ca.crt")):
            raise ValueError("the Secret needs tls.crt, tls.key and ca.crt")
        return cls(raw["tls.crt"], raw["tls.key"], raw["ca.crt"], raw.get("ca.key") or None)

    def secret_data(self) -> dict[str, str]:
        files = {"tls.crt": self.cert, "tls.key": self.key, "ca.crt": self.ca}
        if self.ca_key is not None:
            files["ca.key"] = self.ca_key
        return {k: base64.b64encode(v).decode() for k, v in files.items()}


def service_names(service: str, namespace: str) -> tuple[str, ...]:
    """The DNS names agents may dial the operator's Service by."""
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def issue(names: tuple[str, ...], now: datetime.datetime, ca: Material | None = None) -> Material:
    """A serving certificate for ``names``, signed by ``ca``'s key, or by a new CA when ``ca`` is None."""
    if ca is None or ca.ca_key is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowmap-operator-ca")])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + CA_LIFE)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        ca = Material(b"", b"", ca_cert.public_bytes(serialization.Encoding.PEM), _pem_key(ca_key))
    assert ca.ca_key is not None
    signer = serialization.load_pem_private_key(ca.ca_key, None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    issuer = x509.load_pem_x509_certificate(ca.ca).subject
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + SERVING_LIFE)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(signer, hashes.SHA256()))
    return Material(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), ca.ca, ca.ca_key)


def due(material: Material, names: tuple[str, ...], now: datetime.datetime) -> bool:
    """True when the operator should issue a new serving certificate (only for a CA it made)."""
    if material.ca_key is None:
        return False  # someone else's: they renew it
    cert = x509.load_pem_x509_certificate(material.cert)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    try:
        sans = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                   .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        sans = set()
    return now >= cert.not_valid_after_utc - life / 3 or not set(names) <= sans


class Keeper:
    """Keeps the Secret and the CA ConfigMap, and gives gRPC the current certificate."""

    def __init__(self, core: client.CoreV1Api, namespace: str, secret: str, configmap: str,
                 names: tuple[str, ...]) -> None:
        self.core, self.namespace, self.secret, self.configmap, self.names = core, namespace, secret, configmap, names
        self.material: Material | None = None
        self._fresh: grpc.ServerCertificateConfiguration | None = None

    async def ensure(self, now: datetime.datetime | None = None) -> Material:
        """Read, make or renew the Secret; publish its CA; return what to serve."""
        for _ in range(5):  # a lost race costs one more read
            at = now or datetime.datetime.now(datetime.timezone.utc)
            try:
                secret = await call(self.core.read_namespaced_secret(self.secret, self.namespace))
            except NotFound:
                material = issue(self.names, at)
                body = client.V1Secret(metadata=client.V1ObjectMeta(name=self.secret, labels=_LABELS),
                                       type="kubernetes.io/tls", data=material.secret_data())
                if not await _conflicted(self.core.create_namespaced_secret(self.namespace, body)):
                    log.info("made a CA and a serving certificate in Secret %s/%s", self.namespace, self.secret)
                    return await self._take(material)
                continue
            material = Material.from_secret(secret.data or {})
            if due(material, self.names, at):
                material = issue(self.names, at, material)
                secret.data = material.secret_data()
                if await _conflicted(self.core.replace_namespaced_secret(self.secret, self.namespace, secret)):
                    continue
                log.info("renewed the serving certificate in Secret %s/%s", self.namespace, self.secret)
            return await self._take(material)
        raise RuntimeError(f"Secret {self.namespace}/{self.secret} kept changing under us")

    async def _take(self, material: Material) -> Material:
        await self._publish(material.ca)
        if self.material is not None and material.cert != self.material.cert:
            self._fresh = grpc.ssl_server_certificate_configuration([(material.key, material.cert)])
        self.material = material
        return material

    async def _publish(self, ca: bytes) -> None:
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=self.configmap, labels=_LABELS),
                                  data={"ca.crt": ca.decode()})
        for _ in range(5):
            try:
                current = await call(self.core.read_namespaced_config_map(self.configmap, self.namespace))
            except NotFound:
                if not await _conflicted(self.core.create_namespaced_config_map(self.namespace, body)):
                    return
                continue
            if (current.data or {}).get("ca.crt") == body.data["ca.crt"]:
                return
            current.data = body.data
            if not await _conflicted(self.core.replace_namespaced_config_map(self.configmap, self.namespace, current)):
                return
        raise RuntimeError(f"ConfigMap {self.namespace}/{self.configmap} kept changing under us")

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that pick up a renewed certificate at the next handshake."""
        assert self.material is not None, "ensure() first"

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            fresh, self._fresh = self._fresh, None  # called by gRPC before every handshake: cheap
            return fresh

        first = grpc.ssl_server_certificate_configuration([(self.material.key, self.material.cert)])
        return grpc.dynamic_ssl_server_credentials(first, fetch)

    async def keep(self, stop: asyncio.Event) -> None:
        """Look at the Secret every CHECK_EVERY seconds until ``stop``; an error waits for the next look."""
        while not await pause(stop, CHECK_EVERY):
            try:
                await self.ensure()
            except Exception as exc:  # noqa: BLE001 - the current certificate stays valid for months
                log.warning("cannot check the serving certificate: %s", exc)



async def _conflicted(write: Awaitable[Any]) -> bool:
    """Await an API write; True when another writer got there first (read again)."""
    try:
        await call(write)
    except Conflict:
        return True
    return False
