"""The certificates and keys of a local control plane, made fresh for each one (never shipped)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID_FOR = datetime.timedelta(days=30)

FRONT_PROXY_NAME = "front-proxy-client"  # kubeadm's name for it
SERVER_NAMES = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local")


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path  # kube-apiserver and etcd serving certificate (loopback)
    serving_key: Path
    admin_cert: Path  # client certificate of the admin user (system:masters)
    admin_key: Path
    etcd_client_cert: Path  # kube-apiserver's client certificate towards etcd
    etcd_client_key: Path
    sa_key: Path  # service-account token signing key
    sa_pub: Path
    # The front proxy: a CA of its own (a client certificate of the cluster CA must never pass for
    # the proxy) and the certificate kube-apiserver proxies aggregated APIs' requests with.
    front_proxy_ca: Path
    front_proxy_cert: Path
    front_proxy_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
          usages: tuple[x509.ObjectIdentifier, ...] = (),
          names: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if names or ips:
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _save(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path


def issue(folder: Path, stem: str, cn: str, org: str | None = None, *, server: bool = False,
          names: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A certificate signed by the CA in ``folder`` (``ca.crt``, ``ca.key``): a client's, or a
    server's too with its names. Kubernetes reads the user from CN and the groups from O."""
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    usages = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH) if server else (
        ExtendedKeyUsageOID.CLIENT_AUTH,)
    key = ec.generate_private_key(ec.SECP256R1())
    return _save(folder, stem, _cert(_name(cn, org), key, ca.subject, ca_key, usages=usages, names=names, ips=ips), key)


def _ca(folder: Path, cn: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    return _save(folder, "ca", _cert(_name(cn), key, _name(cn), key, ca=True), key)


def create(folder: Path, *, server_ips: tuple[str, ...] = ()) -> Pki:
    """Write a CA, serving and client certificates and a service-account key pair into ``folder``.

    The serving certificate is valid for loopback and the API server's usual names, and for
    ``server_ips`` (the address it advertises, the ``kubernetes`` Service's ClusterIP).
    """
    ca_cert, ca_key_path = _ca(folder, "flowmap-local-ca")
    serving = issue(folder, "serving", "kube-apiserver", server=True, names=SERVER_NAMES,
                    ips=("127.0.0.1", "::1", *server_ips))
    admin = issue(folder, "admin", "flowmap-admin", "system:masters")
    etcd_client = issue(folder, "etcd-client", "kube-apiserver-etcd-client")

    # The token signing key is RSA: every Kubernetes version and client library accepts RS256.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_key_path, sa_pub_path = folder / "sa.key", folder / "sa.pub"
    _write_key(sa_key_path, sa_key)
    sa_pub_path.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    front_proxy_ca, _ = _ca(folder / "front-proxy", "flowmap-local-front-proxy-ca")
    front_proxy = issue(folder / "front-proxy", "client", FRONT_PROXY_NAME)
    return Pki(ca_cert, ca_key_path, *serving, *admin, *etcd_client, sa_key_path, sa_pub_path, front_proxy_ca,
               *front_proxy)
