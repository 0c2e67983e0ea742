"""Fetching a finished capture's file from its node, on request: what the operator's HTTPS API
streams to a user.

The file stays on the node (the dp wrote it there, flowmap_dp.capturing) and the operator keeps
none of it. A fetch (:meth:`Uploads.fetch`) asks the node for it in the node's
``NodeCaptures.uploads``, which the CaptureHub carries and streams at once; the agent answers with
a ``CaptureService.Upload`` stream, which the servicer hands to :meth:`Uploads.receive`; its chunks
reach the reader through a small bounded queue as they come, so a slow reader slows the agent
(gRPC's flow control) instead of the file piling up in the operator's memory. The bytes are
checked against the size and sha256 the capture's status shows: a fetch that ends without
:class:`UploadFailed` brought exactly that file.

Everything is bounded: ``max_in_flight`` fetches in the operator and ``max_per_node`` per node
(one more fails "busy" at once, not queued), ``queue_chunks`` chunks of at most
``MAX_UPLOAD_CHUNK`` bytes queued per fetch, ``start_timeout`` for the node to start and
``stall_timeout`` for each chunk to come (or for the reader to take one). A fetch whose reader
stops (its generator closed or cancelled) is withdrawn: gone from the node's NodeCaptures (the
agent cancels its call) and its stream ended by the operator (CANCELLED).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from flowmap_api import report_pb2 as pb
from flowmap_api.limits import MAX_NODE_UPLOADS, MAX_UPLOAD_CHUNK, MAX_UPLOAD_ERROR
from flowmap_operator.errors import InvalidReport, NotRequested, Retry, Withdrawn
from flowmap_operator.recording import CaptureHub

MAX_IN_FLIGHT = 8  # fetches at once in the operator: each holds at most QUEUE_CHUNKS chunks
QUEUE_CHUNKS = 4  # between the agent's stream and the reader: at most 4 MiB per fetch
START_TIMEOUT = 30.0  # seconds for the node to start sending (its agent may be reconnecting)
STALL_TIMEOUT = 30.0  # seconds a stream may send nothing, or the reader take nothing
MAX_WHY = 512  # characters of an UploadFailed's message (the node's own words are MAX_UPLOAD_ERROR)
SHOWN = 64  # characters of a value the agent sent, quoted in a refusal

T = TypeVar("T")


class UploadFailed(Exception):
    """A fetch did not bring the whole file; the message says why, bounded. Raised before the
    first byte (busy, the node's refusal, no start) or after some (a stall, a broken stream, the
    bytes not the file the status names): a reader that has passed bytes on must say the copy is
    broken."""

    def __init__(self, why: str) -> None:
        super().__init__(why[:MAX_WHY])


class FetchesBusy(UploadFailed, Retry):
    """As many files are being fetched (from the node, or in all) as may be: ask again shortly."""


@dataclass(eq=False)
class _Fetch:
    """One fetch, between its reader (fetch) and the agent's stream (take)."""

    request: str
    node: str
    capture_id: str
    size: int
    sha256: str
    queue: asyncio.Queue[bytes | None]  # data; None: the end, or a failure to look at
    withdrawn: asyncio.Future[None]  # done when the reader has stopped
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the agent's stream came
    failure: UploadFailed | None = None

    def fail(self, why: str) -> None:
        """The fetch cannot bring the file: the reader raises ``why`` at its next step."""
        if self.failure is None:
            self.failure = UploadFailed(why)
        self.started.set()
        if not self.queue.full():
            self.queue.put_nowait(None)  # wakes a waiting reader; a full queue has none waiting

    def ask(self) -> pb.UploadRequest:
        return pb.UploadRequest(request=self.request, id=self.capture_id)


class Uploads:
    """The operator's fetches in flight, and the agents' streams that serve them."""

    def __init__(self, hub: CaptureHub, is_leader: Callable[[], bool] = lambda: True, *,
                 start_timeout: float = START_TIMEOUT, stall_timeout: float = STALL_TIMEOUT,
                 max_in_flight: int = MAX_IN_FLIGHT, max_per_node: int = MAX_NODE_UPLOADS,
                 queue_chunks: int = QUEUE_CHUNKS) -> None:
        self.hub, self.is_leader = hub, is_leader
        self.start_timeout, self.stall_timeout = start_timeout, stall_timeout
        self.max_in_flight, self.max_per_node, self.queue_chunks = max_in_flight, max_per_node, queue_chunks
        self.fetches: dict[str, _Fetch] = {}  # request id -> its fetch, in the order asked
        # Unique in this process by the counter; across processes by the prefix: an agent still
        # serving a request of the previous leader never takes a new leader's for it.
        self._prefix, self._numbers = secrets.token_hex(6), itertools.count(1)

    def requests(self, node: str) -> list[pb.UploadRequest]:
        """The fetches ``node`` serves now, as its NodeCaptures carries them."""
        return [f.ask() for f in self.fetches.values() if f.node == node]

    async def fetch(self, node: str, capture_id: str, size: int, sha256: str) -> AsyncIterator[bytes]:
        """The bytes of capture ``capture_id``'s file on ``node``, as the agent sends them; at the end
        they are checked to be ``size`` bytes with this ``sha256`` (the capture's status for that
        node). Raises UploadFailed (see the class); closing the generator early withdraws the fetch."""
        f = self._ask(node, capture_id, size, sha256)
        try:
            await self._tell(node)
            try:
                await asyncio.wait_for(f.started.wait(), self.start_timeout)
            except asyncio.TimeoutError:
                raise UploadFailed(f"node {node} did not start sending {capture_id} within "
                                   f"{self.start_timeout:g} s (is its agent connected?)") from None
            digest, got = hashlib.sha256(), 0
            while True:
                if f.failure is not None:
                    raise f.failure
                try:
                    data = await asyncio.wait_for(f.queue.get(), self.stall_timeout)
                except asyncio.TimeoutError:
                    raise UploadFailed(f"node {node} sent nothing of {capture_id} for {self.stall_timeout:g} s "
                                       f"(after {got} of {size} bytes)") from None
                if data is None:
                    if f.failure is not None:
                        raise f.failure
                    break
                got += len(data)
                if got > size:
                    raise UploadFailed(f"node {node} sent more than the {size} bytes of {capture_id} "
                                       "its status says")
                digest.update(data)
                yield data
            if got != size:
                raise UploadFailed(f"node {node} sent {got} bytes of {capture_id}, its status says {size}")
            if digest.hexdigest() != sha256:
                raise UploadFailed(f"the {got} bytes node {node} sent of {capture_id} have sha256 "
                                   f"{digest.hexdigest()}, its status says {sha256[:SHOWN]}")
        finally:
            self._forget(f)
            await self._tell(node)

    def _ask(self, node: str, capture_id: str, size: int, sha256: str) -> _Fetch:
        if not self.is_leader():
            raise UploadFailed("this replica does not lead: the leader fetches captures")
        if sum(f.node == node for f in self.fetches.values()) >= self.max_per_node:
            raise FetchesBusy(f"busy: node {node} is sending {self.max_per_node} files already, try again shortly")
        if len(self.fetches) >= self.max_in_flight:
            raise FetchesBusy(f"busy: {self.max_in_flight} files are being fetched already, try again shortly")
        request = f"{self._prefix}-{next(self._numbers)}"
        f = _Fetch(request, node, capture_id, size, sha256, asyncio.Queue(self.queue_chunks),
                   asyncio.get_running_loop().create_future())
        self.fetches[request] = f
        return f

    def _forget(self, f: _Fetch) -> None:
        """The reader stopped (done, failed or gone): the agent's stream, if any, is ended."""
        self.fetches.pop(f.request, None)
        if not f.withdrawn.done():
            f.withdrawn.set_result(None)

    async def _tell(self, node: str) -> None:
        await self.hub.ask(node, self.requests(node))

    async def receive(self, node: str, first: pb.UploadChunk, rest: AsyncIterator[pb.UploadChunk]) -> None:
        """Serve one Upload stream from ``node`` (its token checked already) whose first chunk is
        ``first``: each chunk's data to the fetch's reader, as it takes them.

        Raises NotRequested (a request not asked of ``node``, another capture, one being sent
        already), InvalidReport (a chunk breaking the contract; the fetch fails too) or Withdrawn
        (the reader stopped, or the fetch failed: the stream is ended). Returns when the stream has
        ended and the reader holds its end (or the node's refusal)."""
        f = self.fetches.get(first.request)
        if f is None or f.node != node:
            raise NotRequested(f"request {first.request[:SHOWN]!r} was not asked of node {node} "
                               "(or no longer is: withdrawn)")
        if first.id != f.capture_id:
            raise NotRequested(f"request {first.request[:SHOWN]!r} is for capture {f.capture_id}, "
                               f"not {first.id[:SHOWN]!r}")
        if f.started.is_set():
            raise NotRequested(f"request {first.request[:SHOWN]!r} is being sent already")
        f.started.set()
        if first.error:
            f.fail(f"node {node} cannot send {f.capture_id}: {first.error[:MAX_UPLOAD_ERROR]}")
            return
        if (first.size, first.sha256) != (f.size, f.sha256):
            why = (f"node {node}'s file of {f.capture_id} is {first.size} bytes with sha256 {first.sha256[:SHOWN]}, "
                   f"its status says {f.size} bytes with sha256 {f.sha256[:SHOWN]}")
            f.fail(why)
            raise Withdrawn(why)
        complete, chunk, sent = False, first, 0
        try:
            while True:
                if len(chunk.data) > MAX_UPLOAD_CHUNK:
                    raise self._broken(f, f"a chunk of {len(chunk.data)} bytes (at most {MAX_UPLOAD_CHUNK})")
                if chunk is not first and (chunk.node or chunk.request or chunk.id or chunk.size or chunk.sha256
                                           or chunk.error):
                    raise self._broken(f, "a chunk after the first names more than data")
                if chunk.data:
                    sent += len(chunk.data)
                    await self._step(f, f.queue.put(chunk.data),
                                     f"the reader took nothing of {f.capture_id} for {self.stall_timeout:g} s")
                following = await self._step(f, anext(rest, None),
                                             f"node {node} sent nothing of {f.capture_id} for "
                                             f"{self.stall_timeout:g} s (after {sent} bytes)")
                if following is None:
                    break
                chunk = following
            await self._step(f, f.queue.put(None), f"the reader took nothing of {f.capture_id} "
                                                   f"for {self.stall_timeout:g} s")
            complete = True
        finally:
            if not complete:  # refused, stalled, cancelled (the agent went away) or withdrawn
                f.fail(f"node {node}'s stream of {f.capture_id} broke after {sent} bytes")

    @staticmethod
    def _broken(f: _Fetch, what: str) -> InvalidReport:
        why = f"node {f.node} sent {what} for {f.capture_id}"
        f.fail(why)
        return InvalidReport(why)

    async def _step(self, f: _Fetch, step: Awaitable[T], stalled: str) -> T:
        """``step``, unless the reader stops first (Withdrawn) or it takes ``stall_timeout`` (the
        fetch fails, saying ``stalled``)."""
        task = asyncio.ensure_future(step)
        try:
            await asyncio.wait((task, f.withdrawn), timeout=self.stall_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled():
            return task.result()
        if f.withdrawn.done():
            raise Withdrawn(f"the fetch of {f.capture_id} ended on the operator's side")
        f.fail(stalled)
        raise Withdrawn(stalled)
