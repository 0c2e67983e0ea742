"""results.flowmap.dev, pure: its paths and discovery, who the front proxy says calls, the review
asked of the API server, and which files a request gets."""

from __future__ import annotations

import json

import pytest

from flowmap_operator.retrieval import (GROUP, Caller, FrontProxy, NodeFile, caller, discovery, error, files, review,
                                        target)

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PATH = f"/apis/{GROUP}/v1alpha1/namespaces/shop/packetcaptures/denied/pcapng"


def test_paths_and_discovery() -> None:
    assert target(PATH) == ("shop", "denied")
    for wrong in (PATH + "/", PATH.replace("pcapng", "pcap"),
                  f"/apis/{GROUP}/v1alpha1/namespaces/Shop/packetcaptures/x/pcapng",
                  f"/apis/{GROUP}/v1alpha1/namespaces/shop/packetcaptures/../pcapng", "/apis/flowmap.dev/v1alpha1"):
        assert target(wrong) is None, wrong
    listed = discovery(f"/apis/{GROUP}/v1alpha1")
    assert listed is not None and {r["name"]: r["verbs"] for r in listed["resources"]} == {
        "packetcaptures": [], "packetcaptures/pcapng": ["get"]}
    assert discovery("/apis")["groups"][0]["name"] == GROUP  # type: ignore[index]
    assert discovery(f"/apis/{GROUP}")["preferredVersion"]["version"] == "v1alpha1"  # type: ignore[index]
    assert discovery("/api") is None and discovery(PATH) is None


def test_the_front_proxy_as_the_api_server_publishes_it() -> None:
    proxy = FrontProxy.from_configmap({
        "requestheader-client-ca-file": CA, "requestheader-allowed-names": '["front-proxy-client"]',
        "requestheader-username-headers": '["X-Remote-User"]', "requestheader-group-headers": '["X-Remote-Group"]',
        "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]', "client-ca-file": "ignored"})
    assert proxy.allowed_names == ("front-proxy-client",) and proxy.username_headers == ("X-Remote-User",)
    with pytest.raises(ValueError, match="no front proxy"):
        FrontProxy.from_configmap({"client-ca-file": CA})
    with pytest.raises(ValueError, match="not a list"):
        FrontProxy.from_configmap({"requestheader-client-ca-file": CA, "requestheader-allowed-names": '"x"'})


def test_who_calls_is_believed_only_from_the_proxy() -> None:
    proxy = FrontProxy(CA, allowed_names=("front-proxy-client",))
    headers = [("X-Remote-User", "alice"), ("x-remote-group", "devs"), ("X-Remote-Group", "system:authenticated"),
               ("X-Remote-Extra-Scopes", "a"), ("X-Remote-Extra-Scopes", "b"), ("X-Remote-Extra-Acme.com%2fteam", "x"),
               ("Accept", "*/*")]
    assert caller(proxy, "front-proxy-client", headers) == Caller(
        "alice", ("devs", "system:authenticated"), {"scopes": ("a", "b"), "acme.com/team": ("x",)})
    assert "not one the API server proxies with" in str(caller(proxy, "mallory", headers))
    assert "no user" in str(caller(proxy, "front-proxy-client", headers[1:]))
    assert "no user" in str(caller(proxy, "front-proxy-client", [("X-Remote-User", "a"), ("X-Remote-User", "b")]))
    assert "too many" in str(caller(proxy, "front-proxy-client", [("X-Remote-User", "a")] +
                                    [("X-Remote-Group", f"g{i}") for i in range(65)]))
    assert caller(FrontProxy(CA), "anyone-the-ca-signed", headers[:1]) == Caller("alice")  # no names: the CA decides


def test_the_review_asks_for_exactly_the_subresource() -> None:
    body = review(Caller("alice", ("devs",), {"scopes": ("a",)}), "shop", "denied")
    assert json.loads(json.dumps(body))["spec"] == {
        "user": "alice", "groups": ["devs"], "extra": {"scopes": ["a"]},
        "resourceAttributes": {"group": GROUP, "version": "v1alpha1", "resource": "packetcaptures",
                               "subresource": "pcapng", "verb": "get", "namespace": "shop", "name": "denied"}}


def test_which_files_a_request_gets() -> None:
    sha = "ab" * 32
    status = {"phase": "Running", "nodes": [
        {"node": "node-b", "phase": "Completed", "fileBytes": 300, "sha256": sha},
        {"node": "node-a", "phase": "Completed", "fileBytes": 200, "sha256": sha},
        {"node": "node-c", "phase": "Running", "fileBytes": 100}]}
    assert files(status) == [NodeFile("node-a", 200, sha), NodeFile("node-b", 300, sha)]  # by node, finished only
    assert files(status, "node-b") == [NodeFile("node-b", 300, sha)]
    assert "holds no finished file" in str(files(status, "node-c"))
    assert "the capture is Pending" in str(files({}))
    assert error(403, "Forbidden", "x" * 5000)["message"] == "x" * 1024
