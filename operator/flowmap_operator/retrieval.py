"""Reading a PacketCapture's files with one's own Kubernetes credentials (pure).

The operator serves an aggregated API, ``results.flowmap.dev/v1alpha1``, that holds one thing:
the subresource ``packetcaptures/pcapng`` of each capture. The API server authenticates the user
(any means it knows: certificates, tokens, OIDC, exec plugins), authorises the request with RBAC
as for any resource (``get`` on ``packetcaptures/pcapng`` in ``results.flowmap.dev``, the
capture's namespace and name), and proxies it to the operator with the user's name in headers,
over a TLS connection whose client certificate only the API server holds (the front proxy's,
checked against the ``requestheader`` CA it publishes in ``kube-system/extension-apiserver-
authentication``). The operator believes those headers only on such a connection, and asks the
API server again (a SubjectAccessReview) before it sends a byte: no new credential, and nobody who
could not ``get`` that subresource reads a packet.

This module decides: which paths exist, who the caller is, which files a request gets, and the
documents and errors the API server expects back (discovery, ``metav1.Status``). The edge is
:mod:`flowmap_operator.results`.

A capture's result is the files of its nodes, concatenated in the order of their node names
(``?node=NAME``: that node's alone). Each is a whole pcapng section, so the concatenation is
itself a pcapng file (Wireshark and tshark read every section), and each slice can be checked
against the node's ``fileBytes`` and ``sha256`` in the capture's status.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GROUP, VERSION = "results.flowmap.dev", "v1alpha1"
RESOURCE, SUBRESOURCE = "packetcaptures", "pcapng"
MEDIA_TYPE = "application/x-pcapng"
# /apis/results.flowmap.dev/v1alpha1/namespaces/<namespace>/packetcaptures/<name>/pcapng
_NAME = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"
_PATH = re.compile(rf"/apis/{re.escape(GROUP)}/{VERSION}/namespaces/(?P<ns>{_NAME})/{RESOURCE}/(?P<name>{_NAME})"
                   rf"/{SUBRESOURCE}")
MAX_HEADER_VALUES = 64  # groups, extra values: what one request may claim (the API server sends few)


def discovery(path: str) -> dict[str, Any] | None:
    """The discovery document at ``path`` (the API server reads them to list the group), or None."""
    version = {"groupVersion": f"{GROUP}/{VERSION}", "version": VERSION}
    group = {"name": GROUP, "versions": [version], "preferredVersion": version}
    if path == "/apis":
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}
    if path == f"/apis/{GROUP}":
        return {"kind": "APIGroup", "apiVersion": "v1", **group}
    if path == f"/apis/{GROUP}/{VERSION}":
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{GROUP}/{VERSION}", "resources": [
            # The capture itself lives in flowmap.dev; here only its files. A resource with no
            # verbs is listed so that its subresource has a parent (kubectl skips it).
            {"name": RESOURCE, "singularName": "packetcapture", "namespaced": True, "kind": "PacketCapture",
             "verbs": []},
            {"name": f"{RESOURCE}/{SUBRESOURCE}", "singularName": "", "namespaced": True, "kind": "PacketCapture",
             "verbs": ["get"]}]}
    return None


def target(path: str) -> tuple[str, str] | None:
    """(namespace, name) of a capture's files path, or None."""
    m = _PATH.fullmatch(path)
    return (m["ns"], m["name"]) if m else None


@dataclass(frozen=True)
class FrontProxy:
    """How the API server says who is calling (``kube-system/extension-apiserver-authentication``)."""

    client_ca: str  # PEM: the CA of the certificates the API server proxies with
    allowed_names: tuple[str, ...] = ()  # common names of those certificates; none: any the CA signed
    username_headers: tuple[str, ...] = ("X-Remote-User",)
    group_headers: tuple[str, ...] = ("X-Remote-Group",)
    extra_prefixes: tuple[str, ...] = ("X-Remote-Extra-",)

    @classmethod
    def from_configmap(cls, data: Mapping[str, str]) -> FrontProxy:
        """From the ConfigMap's data; ValueError when the API server publishes no front proxy."""
        ca = data.get("requestheader-client-ca-file", "")
        if "BEGIN CERTIFICATE" not in ca:
            raise ValueError("the API server has no front proxy (requestheader-client-ca-file): start it with "
                             "--requestheader-client-ca-file and --proxy-client-cert-file for aggregated APIs")

        def strings(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
            raw = data.get(key)
            if not raw:
                return default
            value = json.loads(raw)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{key} is not a list of strings: {raw[:100]!r}")
            return tuple(value)

        return cls(ca, strings("requestheader-allowed-names", ()),
                   strings("requestheader-username-headers", cls.username_headers),
                   strings("requestheader-group-headers", cls.group_headers),
                   strings("requestheader-extra-headers-prefix", cls.extra_prefixes))


@dataclass(frozen=True)
class Caller:
    """The user the API server authenticated."""

    user: str
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] | None = None


def caller(proxy: FrontProxy, peer_name: str, headers: Sequence[tuple[str, str]]) -> Caller | str:
    """Who calls, from a request that came on a connection whose verified client certificate is
    named ``peer_name``; a string says why the request is not believed."""
    if proxy.allowed_names and peer_name not in proxy.allowed_names:
        return f"the client certificate {peer_name[:100]!r} is not one the API server proxies with"
    lowered = [(k.lower(), v) for k, v in headers]
    users = [v for k, v in lowered if k in {h.lower() for h in proxy.username_headers}]
    if len(users) != 1 or not users[0]:
        return "no user: not a request the API server proxied"
    groups = tuple(v for k, v in lowered if k in {h.lower() for h in proxy.group_headers})
    extra: dict[str, list[str]] = {}
    for k, v in lowered:
        for prefix in proxy.extra_prefixes:
            if k.startswith(prefix.lower()) and len(k) > len(prefix):
                extra.setdefault(_unescape(k[len(prefix):]), []).append(v)
    if len(groups) > MAX_HEADER_VALUES or sum(map(len, extra.values())) > MAX_HEADER_VALUES:
        return "too many groups or extra values"
    return Caller(users[0], groups, {k: tuple(v) for k, v in extra.items()} or None)


def _unescape(key: str) -> str:
    """An extra key as the API server percent-encodes it in a header name."""
    return re.sub(r"%([0-9a-fA-F]{2})", lambda m: chr(int(m[1], 16)), key)


def review(who: Caller, namespace: str, name: str) -> dict[str, Any]:
    """The SubjectAccessReview body that asks whether ``who`` may read the capture's files."""
    spec: dict[str, Any] = {"user": who.user, "groups": list(who.groups),
                            "resourceAttributes": {"group": GROUP, "version": VERSION, "resource": RESOURCE,
                                                   "subresource": SUBRESOURCE, "verb": "get",
                                                   "namespace": namespace, "name": name}}
    if who.extra:
        spec["extra"] = {k: list(v) for k, v in who.extra.items()}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}


@dataclass(frozen=True)
class NodeFile:
    """One node's file of a capture, as the capture's status describes it."""

    node: str
    size: int
    sha256: str


def files(status: Mapping[str, Any] | None, node: str | None = None) -> list[NodeFile] | str:
    """The files a request gets, in order (by node name), from the capture's status; a string
    says why there are none (the capture is still running, no such node...)."""
    status = status or {}
    done = sorted((NodeFile(str(e["node"]), int(e.get("fileBytes") or 0), str(e["sha256"]))
                   for e in status.get("nodes") or [] if e.get("sha256") and e.get("node")),
                  key=lambda f: f.node)
    if node is not None:
        done = [f for f in done if f.node == node]
        if not done:
            return f"node {node[:100]!r} holds no finished file of this capture"
    if not done:
        phase = status.get("phase") or "Pending"
        return f"no node has a finished file yet (the capture is {phase})"
    return done


def error(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``metav1.Status`` failure, as kubectl and the client libraries show errors."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message[:1024],
            "reason": reason, "code": code}
