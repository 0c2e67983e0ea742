"""Why the operator refuses a report, a watch or an upload, typed by what the agent should do.

Raised by the pure core (validation, ledger, topology, resolution) and by authentication;
``flowmap_operator.serving`` maps them to gRPC status codes, in one table. ``InvalidReport`` is
the only refusal that would repeat forever: when it names an edge (trailing metadata
``flowmap-refused-edge``) the agent sets that edge aside, counted, and resends the rest at once.
Everything else the agent keeps and resends, in order, with backoff.
"""

from __future__ import annotations


class Unauthenticated(Exception):
    """No credentials, or credentials the API server does not accept."""


class PermissionDenied(Exception):
    """Authenticated, but not allowed to report this (wrong account, or another node)."""


class Unavailable(Exception):
    """The token cannot be checked now (the API server is away): the agent should retry."""


class InvalidReport(ValueError):
    """The batch breaks the contract (flowmap_api.validity); the message names the first problem found.

    ``edge`` is the index into ``batch.edges`` of the one edge that cannot be counted, or None when
    the problem is the batch's own (agent id, node, sequence order, counts beyond the limits).
    """

    def __init__(self, message: str, edge: int | None = None) -> None:
        super().__init__(message)
        self.edge = edge


class Malformed(InvalidReport):
    """The message is not the protobuf its RPC takes: nothing of it can be read."""


class OutOfOrder(ValueError):
    """A batch follows one that has not arrived: the agent must resend what it holds, in order."""

    def __init__(self, sequence: int, previous: int, delivered: int) -> None:
        super().__init__(f"batch {sequence} follows batch {previous}, but the last batch received is {delivered}: "
                         "resend in order")
        self.delivered = delivered


class Busy(Exception):
    """The operator holds too much of this agent's unwritten data: retry later, keep the batch."""


class Crowded(Exception):
    """An edge has as many unconfirmed observers as it may hold: retry the batch a little later.

    Watermarks are pruned as soon as their agents confirm the acknowledgement, so this only
    delays a batch; refusing it whole keeps it exact.
    """


class NotKnownYet(Exception):
    """A delta names an address inside a node's pod range that neither a pod the operator knows nor
    an address of a node holds: most likely a pod whose Pod object the operator's watch has not
    delivered yet, or a node whose agent has not reported its addresses to this operator yet. The
    batch is refused whole, without a trace, and the agent resends it with backoff; the wait is
    bounded (flowmap_operator.resolution), so a batch can never jam an agent."""

    def __init__(self, ip: str, node: str) -> None:
        super().__init__(f"{ip} is inside node {node}'s pod range, but no known pod or node holds it yet: "
                         "resend shortly")
        self.ip, self.node = ip, node


class NotRequested(Exception):
    """An upload names a fetch the operator did not ask of this node (or no longer asks: withdrawn
    as the agent started), or another capture, or one being sent already: the agent stops sending
    (flowmap_operator.uploading)."""


class Withdrawn(Exception):
    """The fetch an upload serves ended on the operator's side (its reader stopped, timed out or
    found the file wrong): the agent stops sending; a new fetch asks again."""
