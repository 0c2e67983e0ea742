"""Why the agent could not do something, typed by what the caller should do about it.

Three kinds, as the operator's refusals are (flowmap_operator.errors), so that a caller decides
by the type and never by a message or a code it reads itself:

* :class:`Retry`: keep what was to be done and try again later (after the backoff, or at the next
  interval); nothing is dropped.
* :class:`GiveUp`: do not try this again; go on without it, saying why.
* :class:`SetAside`: this one thing can never be taken: set it apart (counted, said) and go on
  with the rest at once.

And the one reading of the operator's gRPC status codes (:func:`failure`; what each means is
flowmap_operator.serving's ``STATUS`` table): every place in the agent that looks at a failed
call's code (reports, the policy and capture streams, capture reports and uploads) asks it.
"""

from __future__ import annotations

import grpc

from flowmap_api import validity


class Retry(Exception):
    """Keep what was to be done and try again later."""


class GiveUp(Exception):
    """Not to be tried again: go on without it."""


class SetAside(Exception):
    """This one thing is refused: set it apart, counted, and go on with the rest."""


# -- the agent's own -----------------------------------------------------------------------------

class NftError(Retry, RuntimeError):
    """``nft`` failed: nothing of the transaction was applied (retried at the next interval; the
    rules in force stay)."""


class PolicyRefused(SetAside, ValueError):
    """The policy is invalid or too large: it is refused whole, the rules in force stay, and the
    next policy is taken as it comes."""


class StateError(GiveUp, ValueError):
    """The state file is not one this agent can read: start afresh (and count it as lost)."""


class NoConntrack(GiveUp):
    """The kernel's connection tracking cannot be read (no nf_conntrack_netlink, no permission):
    the agent goes on without undoing the node's source NAT."""


class Untranslatable(SetAside, ValueError):
    """A capture order the agent cannot put in the dp's words; the message says why (that order
    is reported failed, the others go to the dp)."""


class Unservable(GiveUp, ValueError):
    """A file the agent will not send; the message says why (it goes in the upload's ``error``)."""


# -- calls to the operator -----------------------------------------------------------------------

class Failed(Exception):
    """A call to the operator that did not go through.

    ``code`` is the status code's name, or the error's type when no status came back (the call
    never went out, or the agent ended it); ``status`` is None then.
    """

    def __init__(self, code: str, details: str = "", status: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{code}: {details}" if details else code)
        self.code, self.details, self.status = code, details, status

    @property
    def label(self) -> str:
        """How the failure is counted (a metric's ``result``/``code`` label)."""
        return self.code.lower()


class Resend(Failed, Retry):
    """Keep what was sent and send it again, in order, after the backoff: the operator is away or
    busy, defers a batch naming a pod it does not know yet, wants batches resent in order, or
    cannot check the token now (and a rotated token or a fixed binding is read at the next try)."""


class RefusedWhole(Resend):
    """The operator refused a batch whole for its size (RESOURCE_EXHAUSTED: busy, or over gRPC's
    receive limit): a batch over the contract's limits is cut down and goes again at once; any
    other is resent after the backoff."""


class Invalid(RefusedWhole):
    """The batch breaks the contract (INVALID_ARGUMENT): cut down if it is over the contract's
    limits; else kept and resent after the backoff, until an agent and an operator that agree on
    the contract run (nothing the agent could take out is named)."""


class RefusedEdge(Invalid, SetAside):
    """The batch was refused for one edge the operator can never count (``flowmap-refused-edge``):
    set that edge apart, counted, and resend the rest at once; as :class:`Invalid` when the
    batch has no such edge."""

    def __init__(self, code: str, details: str, status: grpc.StatusCode, edge: int) -> None:
        super().__init__(code, details, status)
        self.edge = edge


class Unwanted(Failed, GiveUp):
    """An upload the operator did not ask for, or no longer wants (NotRequested, Withdrawn): stop
    sending it, and never send it again (the operator asks again under a new id)."""


# The operator's codes (flowmap_operator.serving.STATUS) and what each tells the agent to do;
# any other code, or none, is a Resend.
STATUS: dict[grpc.StatusCode, type[Failed]] = {
    grpc.StatusCode.INVALID_ARGUMENT: Invalid,  # Malformed, InvalidReport (RefusedEdge when it names one)
    grpc.StatusCode.RESOURCE_EXHAUSTED: RefusedWhole,  # Busy, Crowded; or gRPC's own receive limit
    grpc.StatusCode.FAILED_PRECONDITION: Resend,  # OutOfOrder: everything unacknowledged, in order
    grpc.StatusCode.UNAVAILABLE: Resend,  # Unavailable, NotKnownYet (deferred: the backoff starts small)
    grpc.StatusCode.UNAUTHENTICATED: Resend,
    grpc.StatusCode.PERMISSION_DENIED: Resend,
}
# On an upload the operator uses two codes for its own refusals: the file is not wanted.
UPLOAD_STATUS: dict[grpc.StatusCode, type[Failed]] = {
    grpc.StatusCode.FAILED_PRECONDITION: Unwanted,  # NotRequested
    grpc.StatusCode.CANCELLED: Unwanted,  # Withdrawn
}


def failure(exc: grpc.RpcError | OSError, *, upload: bool = False) -> Failed:
    """What a failed call to the operator (``upload``: an Upload) tells the agent to do."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return Resend(type(exc).__name__, str(exc))
    status, details = exc.code(), exc.details() or ""
    kind = (UPLOAD_STATUS.get(status) if upload else None) or STATUS.get(status, Resend)
    if kind is Invalid and (edge := refused_edge(exc)) is not None:
        return RefusedEdge(status.name, details, status, edge)
    return kind(status.name, details, status)


def refused_edge(exc: grpc.aio.AioRpcError) -> int | None:
    """The edge an INVALID_ARGUMENT refusal names (flowmap_api.validity.REFUSED_EDGE), if any."""
    for key, value in exc.trailing_metadata() or ():
        if key == validity.REFUSED_EDGE:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return int(text) if text.isdigit() else None
    return None
