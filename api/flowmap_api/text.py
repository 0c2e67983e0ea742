"""Text that came from packets or from another program, made safe to show: one rule for the
Connection's threat examples, Events and terminal lines."""

from __future__ import annotations

import re

# C0, DEL, C1, and the line and paragraph separators: any of them can move the cursor, end a line
# or clear the screen of a terminal that shows them, or end a line-oriented reader's record.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: object, limit: int) -> str:
    """``text`` with control characters as ``\\xNN`` (``\\uNNNN``), at most ``limit`` characters
    (an ellipsis says it was cut)."""
    shown = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                             else f"\\u{ord(m.group()):04x}", str(text))
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"
