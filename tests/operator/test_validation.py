"""A report batch is checked whole before anything of it is applied (flowmap_operator.validation), pure.

What a malformed batch looks like to an agent, over gRPC, is in test_refusals.
"""

from __future__ import annotations

import pytest

from flowmap_api import report_pb2 as pb
from flowmap_api.limits import MAX_NODE_ADDRESSES
from flowmap_operator.errors import InvalidReport
from flowmap_operator.validation import validate


def test_node_addresses_are_bounded_and_must_be_addresses() -> None:
    said = [f"10.244.1.{i}" for i in range(MAX_NODE_ADDRESSES)]
    validate(pb.ReportBatch(agent_id="a", node="node-a", sequence=1, node_addresses=said), max_edges=10)
    validate(pb.ReportBatch(agent_id="a", node="node-a", node_addresses=said), max_edges=10)  # with an ack question too
    with pytest.raises(InvalidReport, match=f"65 addresses, more than the limit {MAX_NODE_ADDRESSES}"):
        validate(pb.ReportBatch(agent_id="a", node="node-a", node_addresses=[*said, "fd00::1"]), max_edges=10)
    with pytest.raises(InvalidReport, match=r"node_addresses\[1\]: 'cni0' is not an IP address"):
        validate(pb.ReportBatch(agent_id="a", node="node-a", node_addresses=["10.244.1.0", "cni0"]), max_edges=10)
