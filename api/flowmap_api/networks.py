"""A pod's secondary networks (Multus): what its annotation claims. One reading, for the agent (which
confirms a claim in the kernel) and the operator (which names after a pod only an address both its
annotation and its node's agent say it holds).

Multus attaches a pod to networks beyond the cluster's and writes what each CNI call returned on
the pod, ``k8s.v1.cni.cncf.io/network-status``: a JSON list of ``{name, interface, ips, mac,
default, dns}``, the cluster network's entry ``default``. Anyone who may edit the pod may write
that annotation too, so it is a claim, never proof: an address it lists is the pod's only once
the pod's node's agent has found it on the pod's own side of a veth in the pod's network
namespace (the namespace whose veth holds the pod's status.podIPs;
flowmap_agent.plumbing.secondary_interfaces), held by no other of the node's pods nor by the
node. That is where the kernel delivers it: what the host-side veth carries from or to that
address is the pod's traffic.

Bounded: an annotation longer than ``MAX_ANNOTATION`` characters is not read, and at most
``MAX_CLAIMS`` addresses of one pod are taken (a pod's networks, in one or two families each).
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping

NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
MAX_ANNOTATION = 64 * 1024  # characters: a pod's few networks take a few hundred each
MAX_CLAIMS = 32  # addresses one pod's annotation may claim


class BadAnnotation(ValueError):
    """A network-status annotation that cannot be read (its pod's secondary networks are not named)."""


def claimed(annotations: Mapping[str, str] | None) -> tuple[str, ...]:
    """The secondary addresses a pod's network-status claims, canonical, in its order, at most
    ``MAX_CLAIMS`` (the cluster network's, ``default``, are its status.podIPs and not taken from
    here). No annotation: (). Raises BadAnnotation for one that is not network-status JSON."""
    raw = (annotations or {}).get(NETWORK_STATUS)
    if raw is None:
        return ()
    if len(raw) > MAX_ANNOTATION:
        raise BadAnnotation(f"{len(raw)} characters, more than {MAX_ANNOTATION}")
    try:
        networks = json.loads(raw)
    except ValueError as exc:
        raise BadAnnotation(f"not JSON ({exc})") from None
    if not isinstance(networks, list):
        raise BadAnnotation("not a list of networks")
    out: list[str] = []
    for network in networks:
        if not isinstance(network, dict) or not isinstance(network.get("ips", []), list):
            raise BadAnnotation("a network is not an object with a list of ips")
        if network.get("default") is True:
            continue
        for ip in network.get("ips", []):
            try:
                text = str(ipaddress.ip_address(ip)) if isinstance(ip, str) else None
            except ValueError:
                text = None
            if text is None:
                raise BadAnnotation(f"{str(ip)[:64]!r} is not an IP address")
            if text not in out:
                out.append(text)
    return tuple(out[:MAX_CLAIMS])

