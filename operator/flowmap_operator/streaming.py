"""Each watched node's latest message and the streams of the agents watching it: what the policy
hub (PolicyService.Watch) and the capture hub (CaptureService.Watch) share.

A hub keeps ``current[node]`` for the nodes someone watches, replaces a node's message when it
changes (never edits it in place) and calls :meth:`NodeStreams.notify`; every stream then sends
its node's message if it is not the one it sent last. When a node's last stream ends, its message
is forgotten.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Generic, Protocol, TypeVar


class Versioned(Protocol):
    version: int


M = TypeVar("M", bound=Versioned)


class NodeStreams(Generic[M]):
    """The per-node messages and streams; a hub says how a new watcher's first message is made."""

    def __init__(self) -> None:
        self.current: dict[str, M] = {}
        self.watchers: dict[str, int] = {}
        self.version = 0  # of the messages, over all nodes: each node's versions only grow
        self._changed = asyncio.Condition()

    def replace(self, node: str, message: M) -> bool:
        """Make ``message`` the node's current one, under a new version; unless it says what the
        current one says, and then nothing changes (False)."""
        old = self.current.get(node)
        if old is not None:
            message.version = old.version
            if message == old:
                return False
        self.version += 1
        message.version = self.version
        self.current[node] = message
        return True

    def watching(self) -> set[str]:
        return {node for node, n in self.watchers.items() if n}

    def first(self, node: str, now: float) -> None:
        """Make ``current[node]`` for a node that has no message yet (its first watcher came)."""
        raise NotImplementedError

    def forget(self, node: str) -> None:
        """The node's last stream ended (its message is gone already)."""

    async def notify(self) -> None:
        """Some node's message was replaced: wake every stream."""
        async with self._changed:
            self._changed.notify_all()

    async def stream(self, node: str) -> AsyncIterator[M]:
        """The node's message now, then each new one, for as long as the agent listens."""
        self.watchers[node] = self.watchers.get(node, 0) + 1
        try:
            if node not in self.current:
                self.first(node, time.time())
            sent: M | None = None
            while True:
                message = self.current[node]
                if message is not sent:
                    sent = message
                    yield message
                async with self._changed:
                    await self._changed.wait()
        finally:
            self.watchers[node] -= 1
            if not self.watchers[node]:
                del self.watchers[node]
                self.current.pop(node, None)
                self.forget(node)
