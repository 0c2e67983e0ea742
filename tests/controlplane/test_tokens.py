"""TokenRequest and TokenReview work: the operator authenticates agents with them."""

from __future__ import annotations

import json

from flowmap_devenv.controlplane import ControlPlane


def review(plane: ControlPlane, token: str, audience: str) -> dict:  # type: ignore[type-arg]
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]}}
    out = plane.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(body)).stdout
    return json.loads(out)["status"]  # type: ignore[no-any-return]


def test_node_bound_service_account_token_is_reviewed(controlplane: ControlPlane) -> None:
    plane = controlplane
    plane.kubectl("create", "namespace", "tokens")
    plane.kubectl("create", "serviceaccount", "agent", "-n", "tokens")
    plane.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "token-node"}}))
    token = plane.kubectl("create", "token", "agent", "-n", "tokens", "--audience=flowmap",
                          "--bound-object-kind=Node", "--bound-object-name=token-node").stdout.strip()

    ok = review(plane, token, "flowmap")
    assert ok["authenticated"] is True
    assert ok["user"]["username"] == "system:serviceaccount:tokens:agent"
    assert ok["user"]["extra"]["authentication.kubernetes.io/node-name"] == ["token-node"]

    wrong_audience = review(plane, token, "someone-else")
    assert not wrong_audience.get("authenticated")
