"""A detector's name is the contract: the dp registry, the API and the CRD enums agree."""

from __future__ import annotations

import yaml

from flowmap_api import threats
from flowmap_api.apps import APPLICATIONS, UNKNOWN
from flowmap_api.limits import MAX_POLICY_THREATS
from flowmap_dp.detectors import REGISTRY
from tests.conftest import REPO


def test_detector_names_are_the_applications_of_the_api_and_the_crds() -> None:
    assert sorted(d.name for d in REGISTRY) == sorted(APPLICATIONS)
    assert len(APPLICATIONS) == 21
    conn = yaml.safe_load((REPO / "crds" / "flowmap.dev_connections.yaml").read_text())
    nlp = yaml.safe_load((REPO / "crds" / "flowmap.dev_networklearningpolicies.yaml").read_text())
    status = conn["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    rule = nlp["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rules"]
    for enum in (status["applications"]["items"]["enum"], rule["items"]["properties"]["app"]["enum"]):
        assert sorted(enum) == sorted((*APPLICATIONS, UNKNOWN))


def test_threat_names_and_severities_are_the_api_s_in_the_crd() -> None:
    conn = yaml.safe_load((REPO / "crds" / "flowmap.dev_connections.yaml").read_text())
    status = conn["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    item = status["threats"]["items"]["properties"]
    assert item["name"]["enum"] == [*threats.NAMES, threats.UNKNOWN]
    assert item["severity"]["enum"] == list(threats.SEVERITIES)
    assert status["threats"]["maxItems"] >= len(threats.NAMES) + 1


def test_a_policy_s_threats_are_the_api_s_and_only_the_dp_s_can_be_blocked() -> None:
    nlp = yaml.safe_load((REPO / "crds" / "flowmap.dev_networklearningpolicies.yaml").read_text())
    spec = nlp["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    entry = spec["threats"]["items"]
    assert entry["properties"]["name"]["enum"] == list(threats.NAMES)
    assert entry["properties"]["action"]["enum"] == ["Alert", "Block"]
    assert spec["threats"]["maxItems"] == MAX_POLICY_THREATS >= len(threats.NAMES)
    # What no node sees in a session cannot be blocked there: the schema says so, for those names.
    (rule,) = entry["x-kubernetes-validations"]
    not_on_nodes = [k.name for k in threats.KINDS if k.found_by != "dp"]
    assert rule["rule"].endswith(f"!(self.name in {not_on_nodes!r})")


def test_the_threats_page_lists_every_threat_and_every_threshold_with_its_default() -> None:
    from flowmap_dp import threats as dp

    page = (REPO / "docs" / "threats.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines() if line.startswith("| `")}
    assert list(rows) == list(threats.NAMES)
    for kind in threats.KINDS:
        assert f"| {kind.severity} |" in rows[kind.name], kind.name
    limits: dict[str, dict[str, float]] = {}
    for spec in (*dp.SCANNERS, *dp.WATCHERS):
        limits.setdefault(spec.name, {}).update(spec.limits)
    for name, values in limits.items():
        for key, default in values.items():
            assert f"`{name}.{key}={default:g}`" in rows[name], f"{name}.{key}={default:g}"
