"""The one reading of the operator's status codes (flowmap_agent.errors.failure): what each tells
the agent to do, as flowmap_operator.serving's STATUS table says the operator means it."""

from __future__ import annotations

import grpc
import pytest

from flowmap_agent.errors import (GiveUp, Invalid, RefusedEdge, RefusedWhole, Resend, Retry, SetAside, Unwanted,
                                  failure)
from flowmap_api import validity


def refusal(code: grpc.StatusCode, *trailing: tuple[str, str]) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details="no")


@pytest.mark.parametrize("code,kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, Invalid),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, RefusedWhole),
    (grpc.StatusCode.FAILED_PRECONDITION, Resend),
    (grpc.StatusCode.UNAVAILABLE, Resend),
    (grpc.StatusCode.UNAUTHENTICATED, Resend),
    (grpc.StatusCode.PERMISSION_DENIED, Resend),
    (grpc.StatusCode.CANCELLED, Resend),
    (grpc.StatusCode.DEADLINE_EXCEEDED, Resend),
])
def test_every_refusal_of_a_report_or_a_stream_keeps_what_was_sent(code: grpc.StatusCode, kind: type) -> None:
    failed = failure(refusal(code))
    assert type(failed) is kind and isinstance(failed, Retry)
    assert (failed.code, failed.label, failed.status, failed.details) == (code.name, code.name.lower(), code, "no")


def test_an_invalid_batch_naming_an_edge_sets_that_edge_aside() -> None:
    failed = failure(refusal(grpc.StatusCode.INVALID_ARGUMENT, (validity.REFUSED_EDGE, "3")))
    assert isinstance(failed, RefusedEdge) and isinstance(failed, SetAside) and failed.edge == 3
    assert type(failure(refusal(grpc.StatusCode.INVALID_ARGUMENT, (validity.REFUSED_EDGE, "x")))) is Invalid


@pytest.mark.parametrize("code", [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED])
def test_an_upload_the_operator_does_not_want_is_given_up(code: grpc.StatusCode) -> None:
    failed = failure(refusal(code), upload=True)
    assert isinstance(failed, Unwanted) and isinstance(failed, GiveUp) and failed.label == code.name.lower()
    assert type(failure(refusal(grpc.StatusCode.UNAVAILABLE), upload=True)) is Resend


def test_a_call_that_never_went_out_is_resent_and_named_by_its_error() -> None:
    failed = failure(ConnectionRefusedError("refused"))
    assert type(failed) is Resend and failed.status is None and failed.label == "connectionrefusederror"
