"""Bounds of the report contract that both sides keep: the agent trims to them, the operator
refuses a batch beyond them (flowmap_operator.validation)."""

# ReportBatch.node_addresses: a node's uplinks, a CNI's bridge and tunnel, each in two families,
# fit many times over; kube-proxy's IPVS dummy, which holds every ClusterIP, is down and not sent.
MAX_NODE_ADDRESSES = 64
