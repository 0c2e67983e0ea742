"""Stable, readable object names: a readable prefix, and a short hash when the name is too long."""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 253
_INVALID = re.compile(r"[^a-z0-9.-]+")


def object_name(readable: str, limit: int = MAX_NAME) -> str:
    """A valid DNS-subdomain object name derived from ``readable``, the same for the same input."""
    cleaned = _INVALID.sub("-", readable.lower()).strip(".-") or "x"
    cleaned = re.sub(r"\.{2,}", ".", cleaned)
    cleaned = re.sub(r"-*\.-*", ".", cleaned)
    if cleaned == readable and len(cleaned) <= limit:
        return cleaned
    digest = hashlib.sha256(readable.encode()).hexdigest()[:10]
    prefix = cleaned[: limit - len(digest) - 1].rstrip(".-")
    return f"{prefix}-{digest}"


def connection_name(client: str, server: str, port: int, protocol: str) -> str:
    """``<client>-<server>-<port>-<protocol>``, e.g. ``shop.web-shop.api-8080-tcp``."""
    return object_name(f"{client}-{server}-{port if port else 'any'}-{protocol.lower()}")
