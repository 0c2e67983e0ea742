"""No setting can be set by accident: the kubelet's service-link variables never take a setting's name,
and a variable that names no setting is refused (flowmap_api.settings).

For every Service of a pod's namespace (unless ``enableServiceLinks: false``) the kubelet sets
variables named after it (``pkg/kubelet/envvars``): the name upper-cased with ``-`` → ``_``, then
``_SERVICE_HOST``, ``_SERVICE_PORT``, ``_SERVICE_PORT_<PORT NAME>``, ``_PORT``, and per port
``_PORT_<N>_<PROTO>`` with ``_PROTO``, ``_PORT``, ``_ADDR``. The Service ``flowmap-operator-metrics``
once set ``FLOWMAP_OPERATOR_METRICS_PORT=tcp://10.96.119.91:9090`` and the operator crash-looped.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import pytest
import yaml

from flowmap_agent.settings import Settings as AgentSettings
from flowmap_api.settings import port, read, setting
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


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Sample:
    count: int = setting(3, at_least=1, at_most=10)
    ratio: float = setting(0.5, above=0, why="a share")
    on: bool = False
    name: str = "x"
    folder: Path = Path("/tmp")
    names: tuple[str, ...] = ("a",)
    mode: Literal["one", "two"] = "one"
    colour: Colour = Colour.RED
    listen: int = port(80)


def sample(**env: str) -> Sample:
    return read(Sample, "FLOWMAP_SAMPLE_", "the sample", {f"FLOWMAP_SAMPLE_{k.upper()}": v for k, v in env.items()})


def test_each_type_reads_its_own_way() -> None:
    assert sample() == Sample()
    got = sample(count="7", ratio="2.5", on="yes", name="y", folder="/var/lib", names="b, c,,d ", mode="two",
                 colour="blue", listen="0")
    assert got == Sample(7, 2.5, True, "y", Path("/var/lib"), ("b", "c", "d"), "two", Colour.BLUE, 0)
    assert sample(names="").names == ()


@pytest.mark.parametrize(("env", "says"), [
    ({"count": "x"}, "FLOWMAP_SAMPLE_COUNT='x' is not a valid int"),
    ({"count": "0"}, "FLOWMAP_SAMPLE_COUNT=0: 1 to 10"),
    ({"count": "11"}, "FLOWMAP_SAMPLE_COUNT=11: 1 to 10"),
    ({"ratio": "0"}, r"FLOWMAP_SAMPLE_RATIO=0.0: above 0 \(a share\)"),
    ({"ratio": "nan"}, "FLOWMAP_SAMPLE_RATIO=nan: above 0"),
    ({"mode": "three"}, "FLOWMAP_SAMPLE_MODE='three': one or two"),
    ({"colour": "green"}, "FLOWMAP_SAMPLE_COLOUR='green': red or blue"),
    ({"listen": "65536"}, "FLOWMAP_SAMPLE_LISTEN=65536: 0 to 65535"),
])
def test_a_bad_value_is_refused_naming_its_variable(env: dict[str, str], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        sample(**env)


def test_an_unknown_variable_of_the_prefix_is_refused_with_the_nearest_name() -> None:
    with pytest.raises(ValueError, match="FLOWMAP_AGENT_NODEE is not a setting of the agent; "
                                         "did you mean FLOWMAP_AGENT_NODE\\?"):
        AgentSettings.from_env({"FLOWMAP_AGENT_NODE": "n", "FLOWMAP_AGENT_NODEE": "m"})
    with pytest.raises(ValueError, match="FLOWMAP_OPERATOR_ZZZ is not a setting of the operator; the settings are "
                                         "the fields of flowmap_operator.settings.Settings"):
        OperatorSettings.from_env({"FLOWMAP_OPERATOR_ZZZ": "1"})
    assert AgentSettings.from_env({"FLOWMAP_AGENT_NODE": "n", "FLOWMAP_OPERATOR_X": "other prefix"}).node == "n"
    with pytest.raises(ValueError, match="FLOWMAP_AGENT_NODE is required"):
        AgentSettings.from_env({})


# Where flowmap itself sets settings: the manifests, the development cluster, the tests, the scripts,
# CI and the documentation users copy from.
SETTERS = ("manifests", "devenv", "tests", "hack", "docs", "benchmarks", ".ci", "Dockerfile", "Makefile", "README.md")
NAMED = re.compile(r"\bFLOWMAP_(?:OPERATOR|AGENT)_[A-Z0-9_]*[A-Z0-9]\b")


def test_every_variable_flowmap_sets_is_a_setting() -> None:
    """A renamed setting leaves no manifest, script or page setting the old name."""
    paths = [p for top in SETTERS for p in ([REPO / top] if (REPO / top).is_file() else (REPO / top).rglob("*"))
             if p.is_file() and p.suffix in ("", ".py", ".yaml", ".yml", ".md", ".sh", ".json", ".toml")
             and p != Path(__file__).resolve()]  # this file's wrong names are on purpose
    named = {m for p in paths for m in NAMED.findall(p.read_text(errors="replace"))}
    strangers = {n for n in named - set(VARIABLES) if not SERVICE_LINK.fullmatch(n)}
    assert not strangers, f"not a setting (any more?): {sorted(strangers)}"
    assert "FLOWMAP_OPERATOR_MAX_CONNECTIONS" in named  # the scan reads docs/operations.md
