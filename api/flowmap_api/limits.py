"""Bounds of the report contract that both sides keep: the agent splits and trims its batches to
them. The operator refuses a message above MAX_MESSAGE_BYTES (RESOURCE_EXHAUSTED) and a batch with
more edges, node addresses or pod addresses than allowed (INVALID_ARGUMENT, naming no edge); names beyond MAX_NAMES
are metadata, dropped and counted (flowmap_api.validity). A batch within them is never refused for
its size.
"""

# The operator's gRPC receive limit, for every message. Well below the operator's 1 GiB memory
# limit even with several reports parsed at once; a typical edge is ~120 bytes, so a batch of
# MAX_BATCH_EDGES edges is ~0.6 MB, and the agent splits by ByteSize() as well as by count (threat
# snippets and pod names make an edge up to ~20 KB).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# ReportBatch.edges: a batch is applied in one step of the operator's event loop; 5,000 edges keep
# that step short for every other agent waiting on the same loop.
MAX_BATCH_EDGES = 5_000

# ReportBatch.names: DNS answers (IP -> name) seen in one interval.
MAX_NAMES = 10_000

# ReportBatch.node_addresses: a node's uplinks, a CNI's bridge and tunnel, each in two families,
# fit many times over; kube-proxy's IPVS dummy, which holds every ClusterIP, is down and not sent.
MAX_NODE_ADDRESSES = 64

# ReportBatch.vms: the libvirt VMs running on a node (flowmap_agent.libvirting follows at most as
# many), each with at most MAX_VM_ADDRESSES addresses and a name of at most MAX_VM_NAME characters.
MAX_NODE_VMS = 1024
MAX_VM_ADDRESSES = 16
MAX_VM_NAME = 200

# ReportBatch.pod_addresses: the secondary (Multus) addresses of a node's pods, in all. A node runs at
# most 110 pods by default (the kubelet's --max-pods; 250 where raised), each on a few secondary
# networks in one or two families; the agent keeps the first (by pod name) within the bound.
MAX_POD_ADDRESSES = 1024

# CaptureReport.captures: how the node's captures stand. A node runs at most a few at once (the dp's
# --max-captures, default 4) and keeps finished ones until their TTL; 256 is far beyond both.
MAX_CAPTURE_STATUSES = 256

# CaptureStatus.message: the node's words on a failure (kept in a condition's message).
MAX_CAPTURE_MESSAGE = 512

# Fetching a finished capture's file (CaptureService.Upload, flowmap_operator.uploading): the data
# of one UploadChunk, well under MAX_MESSAGE_BYTES with the first message's names around it.
MAX_UPLOAD_CHUNK = 1 << 20

# UploadChunk.error: the agent's words on why it cannot send a file.
MAX_UPLOAD_ERROR = 256

# NodeCaptures.uploads: the fetches one node serves at once (the operator asks no more of a node,
# the agent sends no more at once), so that a node's uplink and disk are not the fetches' alone.
MAX_NODE_UPLOADS = 2

# A NetworkLearningPolicy's spec.threats (the CRD's maxItems) and PodPolicy.block_threats: one entry
# per threat name at most, with room for names to come (flowmap_api.threats has 16).
MAX_POLICY_THREATS = 32
