"""The operator's errors, typed by what whoever meets one should do: retry, give up, or refuse.

Two kinds of caller meet them:

* an agent, whose report, watch or upload the operator turns down. Raised by the pure core
  (validation, ledger, topology, resolution) and by authentication; ``flowmap_operator.serving``
  maps them to gRPC status codes, in one table. ``InvalidReport`` is the only refusal that would
  repeat forever: when it names an edge (trailing metadata ``flowmap-refused-edge``) the agent
  sets that edge aside, counted, and resends the rest at once. Everything else the agent keeps
  and resends, in order, with backoff.
* the operator itself, whose call the Kubernetes API server answers with an error. Its client's
  exceptions become the ``ApiError`` kinds below in one place (flowmap_operator.kubeapi), so no
  other module reads an HTTP status.
"""

from __future__ import annotations


class Retry(Exception):
    """Nothing is wrong with what was asked: ask again later, with backoff."""


class GiveUp(Exception):
    """Asking again as it is will not help: stop, and say why."""


class Refuse(ValueError):
    """What was sent is wrong and is turned down whole; sending it again changes nothing."""


class Unauthenticated(GiveUp):
    """No credentials, or credentials the API server does not accept."""


class PermissionDenied(GiveUp):
    """Authenticated, but not allowed to report this (wrong account, or another node)."""


class Unavailable(Retry):
    """The token cannot be checked now (the API server is away): the agent should retry."""


class InvalidReport(Refuse):
    """The batch breaks the contract (flowmap_api.validity); the message names the first problem found.

    ``edge`` is the index into ``batch.edges`` of the one edge that cannot be counted, or None when
    the problem is the batch's own (agent id, node, sequence order, counts beyond the limits).
    """

    def __init__(self, message: str, edge: int | None = None) -> None:
        super().__init__(message)
        self.edge = edge


class Malformed(InvalidReport):
    """The message is not the protobuf its RPC takes: nothing of it can be read."""


class OutOfOrder(Retry, ValueError):
    """A batch follows one that has not arrived: the agent must resend what it holds, in order."""

    def __init__(self, sequence: int, previous: int, delivered: int) -> None:
        super().__init__(f"batch {sequence} follows batch {previous}, but the last batch received is {delivered}: "
                         "resend in order")
        self.delivered = delivered


class Busy(Retry):
    """The operator holds too much of this agent's unwritten data: retry later, keep the batch."""


class Crowded(Retry):
    """An edge has as many unconfirmed observers as it may hold: retry the batch a little later.

    Watermarks are pruned as soon as their agents confirm the acknowledgement, so this only
    delays a batch; refusing it whole keeps it exact.
    """


class NotKnownYet(Retry):
    """A delta names an address inside a node's pod range that neither a pod the operator knows nor
    an address of a node holds: most likely a pod whose Pod object the operator's watch has not
    delivered yet, or a node whose agent has not reported its addresses to this operator yet. The
    batch is refused whole, without a trace, and the agent resends it with backoff; the wait is
    bounded (flowmap_operator.resolution), so a batch can never jam an agent."""

    def __init__(self, ip: str, node: str) -> None:
        super().__init__(f"{ip} is inside node {node}'s pod range, but no known pod or node holds it yet: "
                         "resend shortly")
        self.ip, self.node = ip, node


class SecondaryNotKnownYet(NotKnownYet):
    """A delta names a secondary (Multus) address its node's agent confirms for a pod that the
    operator's watch has not delivered yet, or whose network-status annotation it has not seen list
    the address yet: waited for like a new pod's address (and as long)."""

    def __init__(self, ip: str, node: str, pod: str) -> None:
        Retry.__init__(self, f"{ip} is a secondary address node {node}'s agent confirms for pod {pod}, which is "
                             "not known with it yet: resend shortly")
        self.ip, self.node = ip, node


class NotRequested(GiveUp):
    """An upload names a fetch the operator did not ask of this node (or no longer asks: withdrawn
    as the agent started), or another capture, or one being sent already: the agent stops sending
    (flowmap_operator.uploading)."""


class Withdrawn(GiveUp):
    """The fetch an upload serves ended on the operator's side (its reader stopped, timed out or
    found the file wrong): the agent stops sending; a new fetch asks again."""


# -- the Kubernetes API server's answers to the operator's own calls --------------------------------


class ApiError(Exception):
    """The API server refused a call, or did not answer: ``status`` is its HTTP status (None: no
    answer), ``message`` its own words (its Status message, else the HTTP reason)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status} {message}" if status else message)
        self.status, self.message = status, message


class NotFound(ApiError, GiveUp):
    """404: the object is not there (deleted meanwhile, or never made): make it, or let it go."""


class Conflict(ApiError, Retry):
    """409: someone wrote first (the resourceVersion moved, or the object exists): read it again."""


class Throttled(ApiError, Retry):
    """429: the API server (its Priority and Fairness) asks for fewer calls: slow down, then again."""


class Rejected(ApiError, GiveUp):
    """Any other 4xx: the schema, an admission policy or RBAC refuses this write as it is."""


class Expired(ApiError, Retry):
    """410: a list's continue token (or a watch's resourceVersion) is older than etcd keeps: start over."""


class InDoubt(ApiError, Retry):
    """A 5xx, or no answer at all: the write may or may not have reached etcd; read before trusting."""
