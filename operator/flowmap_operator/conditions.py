"""``status.conditions``, one way for every object the operator writes (pure).

The Kubernetes API conventions: one entry per type; ``lastTransitionTime`` moves only when the
status does (so a condition rewritten every few seconds still says since when it holds); the
``observedGeneration`` of the spec it judged, where the object has one; a CamelCase reason; a
bounded message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flowmap_operator.times import iso

MAX_MESSAGE = 1024
# What an object says of itself: (type, holds, reason, message).
Said = tuple[str, bool, str, str]


def conditions(said: Iterable[Said], before: Mapping[str, Mapping[str, Any]], now: float,
               generation: int | None = None) -> list[dict[str, Any]]:
    """The conditions to write for ``said``, given those written ``before`` (by type)."""
    out = []
    for kind, holds, reason, message in said:
        status = "True" if holds else "False"
        old = before.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        condition: dict[str, Any] = {"type": kind, "status": status, "reason": reason,
                                     "message": message[:MAX_MESSAGE], "lastTransitionTime": since or iso(now)}
        if generation is not None:
            condition["observedGeneration"] = generation
        out.append(condition)
    return out
