"""Kubernetes timestamps, the one way the operator writes and reads them (pure)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def iso(ts: float) -> str:
    """A Kubernetes timestamp (RFC 3339, UTC, seconds)."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(value: Any, default: float = 0.0) -> float:
    """Seconds since the epoch of a Kubernetes timestamp; ``default`` when absent or not a timestamp.
    One without an offset is UTC (kopf writes its peering times so)."""
    if not value:
        return default
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return default
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
