"""Why the dp turns something down, typed by what the caller should do: every one is a refusal of
what was handed in (a frame, a file, an order), never a reason to stop capturing.

* :class:`WireError`: the peer's bytes are not a dp frame; the connection is closed and counted.
* :class:`CaptureFormatError`: a capture file that cannot be read; the command says so and ends.
* :class:`Malformed`: one capture order of a Control the dp cannot run; that order is reported
  failed, the others run.
"""

from __future__ import annotations


class Refuse(ValueError):
    """What was handed in is wrong and is turned down whole; handing it in again changes nothing."""


class WireError(Refuse):
    """The peer sent something that is not a version-1 flowmap dp frame. ``reason`` says what, as
    the agent counts it: magic, version, length, payload (a body that is not its message)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CaptureFormatError(Refuse):
    """The file is neither pcap nor pcapng, or its headers are broken."""


class Malformed(Refuse):
    """An entry of a Control the dp cannot run; the message says why (it is reported)."""
