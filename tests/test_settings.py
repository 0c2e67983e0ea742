"""No setting can be set by accident: the kubelet's service-link variables never take a setting's name.

For every Service of a pod's namespace (unless ``enableServiceLinks: false``) the kubelet sets
variables named after it (``pkg/kubelet/envvars``): the name upper-cased with ``-`` → ``_``, then
``_SERVICE_HOST``, ``_SERVICE_PORT``, ``_SERVICE_PORT_<PORT NAME>``, ``_PORT``, and per port
``_PORT_<N>_<PROTO>`` with ``_PROTO``, ``_PORT``, ``_ADDR``. The Service ``flowmap-operator-metrics``
once set ``FLOWMAP_OPERATOR_METRICS_PORT=tcp://10.96.119.91:9090`` and the operator crash-looped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import pytest
import yaml

from flowmap_agent.settings import Settings as AgentSettings
from flowmap_operator.settings import Settings as OperatorSettings
from tests.conftest import REPO

# A Service name is a DNS-1035 label; a port name an IANA service name. Both are matched loosely
# (no length bounds, digits-only port names): the test may refuse more than the kubelet makes, never less.
SERVICE = r"[A-Z](?:[A-Z0-9_]*[A-Z0-9])?"
PORT_NAME = r"[A-Z0-9](?:[A-Z0-9_]*[A-Z0-9])?"
SERVICE_LINK = re.compile(rf"""{SERVICE}_(?:
      SERVICE_HOST
    | SERVICE_PORT(?:_{PORT_NAME})?
    | PORT
    | PORT_[0-9]+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?
)""", re.VERBOSE)

VARIABLES = ([f"FLOWMAP_OPERATOR_{f.name.upper()}" for f in fields(OperatorSettings)]
             + [f"FLOWMAP_AGENT_{f.name.upper()}" for f in fields(AgentSettings)])


def service_links(service: dict) -> dict[str, str]:  # type: ignore[type-arg]
    """What the kubelet sets for one Service (pkg/kubelet/envvars.FromServices), ClusterIP made up."""
    prefix, ip = service["metadata"]["name"].upper().replace("-", "_"), "10.96.119.91"
    ports = service["spec"]["ports"]
    env = {f"{prefix}_SERVICE_HOST": ip, f"{prefix}_SERVICE_PORT": str(ports[0]["port"]),
           f"{prefix}_PORT": f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"}
    for p in ports:
        proto = p.get("protocol", "TCP")
        if p.get("name"):
            env[f"{prefix}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
        link = f"{prefix}_PORT_{p['port']}_{proto}"
        env |= {link: f"{proto.lower()}://{ip}:{p['port']}", f"{link}_PROTO": proto.lower(),
                f"{link}_PORT": str(p["port"]), f"{link}_ADDR": ip}
    return env


def test_the_shapes_are_the_kubelets() -> None:
    links = service_links({"metadata": {"name": "flowmap-operator-metrics"},
                           "spec": {"ports": [{"name": "metrics", "port": 9090, "protocol": "TCP"}]}})
    assert links["FLOWMAP_OPERATOR_METRICS_PORT"] == "tcp://10.96.119.91:9090"  # the crash, as it was
    assert all(SERVICE_LINK.fullmatch(name) for name in links), links
    assert not SERVICE_LINK.fullmatch("FLOWMAP_OPERATOR_METRICS_LISTEN")


@pytest.mark.parametrize("variable", VARIABLES)
def test_no_setting_has_the_shape_of_a_service_link(variable: str) -> None:
    match = SERVICE_LINK.fullmatch(variable)
    assert match is None, f"{variable} is what the kubelet sets for a Service of the pod's namespace: rename it"


def test_the_services_flowmap_installs_leave_both_settings_alone() -> None:
    services = [doc for path in sorted((REPO / "manifests").rglob("*.yaml"))
                for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "Service"]
    assert {s["metadata"]["name"] for s in services} >= {"flowmap-operator", "flowmap-operator-metrics"}
    env = {name: value for s in services for name, value in service_links(s).items()}
    assert OperatorSettings.from_env(env) == OperatorSettings()
    assert AgentSettings.from_env({**env, "FLOWMAP_AGENT_NODE": "n"}) == AgentSettings(node="n")


def test_the_pods_take_no_service_links() -> None:
    for path in (REPO / "manifests" / "operator" / "deployment.yaml", REPO / "manifests" / "agent" / "daemonset.yaml"):
        pod = yaml.safe_load(path.read_text())["spec"]["template"]["spec"]
        assert pod["enableServiceLinks"] is False, path


def test_booleans_are_read_alike() -> None:
    @dataclass(frozen=True)
    class Agent(AgentSettings):
        switch: bool = True

    for raw, value in (("false", False), ("0", False), ("No", False), ("true", True), ("1", True), ("yes", True)):
        assert Agent.from_env({"FLOWMAP_AGENT_NODE": "n", "FLOWMAP_AGENT_SWITCH": raw}).switch is value
        assert OperatorSettings.from_env({"FLOWMAP_OPERATOR_ENFORCEMENT_DISABLED": raw}).enforcement_disabled is value
    with pytest.raises(ValueError, match="FLOWMAP_AGENT_SWITCH='off' is not a valid bool"):
        Agent.from_env({"FLOWMAP_AGENT_NODE": "n", "FLOWMAP_AGENT_SWITCH": "off"})
