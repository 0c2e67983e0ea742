"""A report batch is checked whole before anything of it is applied, and its metadata normalised.

The rules are the contract's (flowmap_api.validity), the same the agent applies before it sends:
an old agent may not have. A batch is refused only for what cannot be counted, and names the one
edge at fault; names, applications, pods and snippets are normalised or dropped and counted.
"""

from __future__ import annotations

from flowmap_api import report_pb2 as pb
from flowmap_api import validity
from flowmap_operator.errors import InvalidReport


def validate(batch: pb.ReportBatch, *, max_edges: int) -> validity.Tally:
    """Normalise the batch in place; what was normalised or dropped, by (field, reason).

    Raises InvalidReport (naming the edge when one edge is at fault) for a batch that cannot be applied.
    """
    try:
        return validity.normalise(batch, max_edges=max_edges)
    except validity.Invalid as exc:
        raise InvalidReport(str(exc), edge=exc.edge) from None


def validate_captures(report: pb.CaptureReport) -> None:
    """Raise InvalidReport, naming the field, unless the whole capture report is within the contract."""
    try:
        validity.check_capture_report(report)
    except validity.Invalid as exc:
        raise InvalidReport(str(exc)) from None
