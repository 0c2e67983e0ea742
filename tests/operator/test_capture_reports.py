"""What a CaptureReport may say (flowmap_api.validity): every part bounded and of a known shape, and
a report outside the contract refused whole, naming the field (never an edge index)."""

from __future__ import annotations

import pytest

from flowmap_api import report_pb2 as pb
from flowmap_api.limits import MAX_CAPTURE_MESSAGE, MAX_CAPTURE_STATUSES
from flowmap_api.validity import Invalid, check_capture_report

SHA = "ab" * 32


def status(**fields: object) -> pb.CaptureStatus:
    return pb.CaptureStatus(**{"id": "shop/cap/0f0e-1", "state": "running", **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(("report", "field"), [
    (pb.CaptureReport(node="Node A", captures=[status()]), "node:"),
    (pb.CaptureReport(node="node-a", captures=[status()] * (MAX_CAPTURE_STATUSES + 1)), "captures:"),
    (pb.CaptureReport(node="node-a", captures=[status(id="shop/cap")]), "captures[0].id"),
    (pb.CaptureReport(node="node-a", captures=[status(id="shop/cap/UID\n")]), "captures[0].id"),
    (pb.CaptureReport(node="node-a", captures=[status(), status()]), "reported twice"),
    (pb.CaptureReport(node="node-a", captures=[status(id="shop/a/1"), status(state="paused")]), "captures[1].state"),
    (pb.CaptureReport(node="node-a", captures=[status(packets=2**63)]), "captures[0].packets"),
    (pb.CaptureReport(node="node-a", captures=[status(sha256="AB" * 32)]), "captures[0].sha256"),
    (pb.CaptureReport(node="node-a", captures=[status(stop_reason="x" * 65)]), "captures[0].stop_reason"),
    (pb.CaptureReport(node="node-a", captures=[status(message="m" * (MAX_CAPTURE_MESSAGE + 1))]), "captures[0].message"),
])
def test_a_capture_report_outside_the_contract_is_refused_naming_the_field(report: pb.CaptureReport, field: str) -> None:
    with pytest.raises(Invalid, match=field.replace("[", r"\[").replace("]", r"\]")) as refused:
        check_capture_report(report)
    assert refused.value.edge is None


def test_a_capture_report_within_the_contract_passes() -> None:
    check_capture_report(pb.CaptureReport(node="node-a", captures=[
        status(state="done", packets=10, sha256=SHA, stop_reason="MaxBytesReached"),
        status(id="shop/other/0f0e-2", state="failed", stop_reason="Failed", message="interface gone"),
    ] + [status(id=f"shop/c{i}/0f0e", state="armed") for i in range(MAX_CAPTURE_STATUSES - 2)]))
