"""Fetching a finished capture's file from its node (flowmap_operator.uploading) over the real
CaptureService: the operator's own parts in this process (the Gate, the Authenticator reviewing
the agent ServiceAccount's pod-bound tokens with the real API server as the operator's
ServiceAccount, the CaptureHub streaming NodeCaptures, Uploads, the CaptureServicer, TLS), and a
client playing the agent: it watches its node's NodeCaptures, and answers the upload requests it
finds there with Upload streams made by hand, right or wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from kubernetes_asyncio import client, config

from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api.limits import MAX_UPLOAD_CHUNK
from flowmap_operator.auth import Authenticator
from flowmap_operator.recording import CaptureHub
from flowmap_operator.resolution import Resolver
from flowmap_operator.serving import OPTIONS, CaptureServicer, Gate, Refusals
from flowmap_operator.uploading import MAX_IN_FLIGHT, FetchesBusy, UploadFailed, Uploads
from tests.operator.harness import NS, Cluster

CID = "snap/dump/0f1e2d3c-aaaa-bbbb-cccc-000000000009"
MIB = MAX_UPLOAD_CHUNK


@dataclass
class World:
    uploads: Uploads
    hub: CaptureHub
    port: int
    cluster: Cluster


@pytest.fixture(scope="module")
def tokens(cluster: Cluster) -> dict[str, str]:
    """node -> a token of the agent ServiceAccount bound to that node's agent pod (the harness's)."""
    return {"node-a": cluster.token("flowmap-agent", pod_name="agent-a"),
            "node-b": cluster.token("flowmap-agent", pod_name="agent-b")}


@contextlib.asynccontextmanager
async def serving(cluster: Cluster, leader: bool = True, **bounds: Any) -> AsyncIterator[World]:
    """The operator's CaptureService, as running.run builds it, on a port of its own."""
    conf = client.Configuration()
    await config.load_kube_config(config_file=str(cluster.operator_kubeconfig()), client_configuration=conf)
    async with client.ApiClient(conf) as api:
        auth = Authenticator(client.AuthenticationV1Api(api), namespace=NS, service_account="flowmap-agent",
                             audience="flowmap")
        hub = CaptureHub(Resolver(), max_per_namespace=4)
        uploads = Uploads(hub, lambda: leader, **bounds)
        refusals = Refusals()
        server = grpc.aio.server(interceptors=[Gate(auth, refusals, 4)], options=OPTIONS)
        pb_grpc.add_CaptureServiceServicer_to_server(CaptureServicer(auth, hub, refusals, lambda: leader, uploads),
                                                     server)
        keys = cluster.keys
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(keys.serving_key.read_bytes(), keys.serving_cert.read_bytes())]))
        await server.start()
        try:
            yield World(uploads, hub, port, cluster)
        finally:
            await server.stop(None)


class Agent:
    """The agent's side by hand: one node's Watch stream read as it comes, and Upload calls."""

    def __init__(self, world: World, node: str, token: str) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=world.cluster.keys.ca_cert.read_bytes())
        self.channel = grpc.aio.secure_channel(f"localhost:{world.port}", creds)
        self.stub = pb_grpc.CaptureServiceStub(self.channel)
        self.node, self.metadata = node, (("authorization", f"Bearer {token}"),)
        self.got: list[pb.NodeCaptures] = []
        self.watching = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        async for message in self.stub.Watch(pb.WatchRequest(node=self.node), metadata=self.metadata):
            self.got.append(message)

    def asked(self) -> list[pb.UploadRequest]:
        return list(self.got[-1].uploads) if self.got else []

    async def request(self, count: int = 1) -> list[pb.UploadRequest]:
        """The upload requests in the node's latest NodeCaptures, once there are ``count``."""
        await until(lambda: len(self.asked()) == count, f"{count} upload requests for {self.node}")
        return self.asked()

    async def upload(self, chunks: Iterable[pb.UploadChunk] | AsyncIterator[pb.UploadChunk],
                     metadata: tuple[tuple[str, str], ...] | None = None) -> pb.UploadAck:
        ack: pb.UploadAck = await self.stub.Upload(chunks, metadata=metadata or self.metadata, timeout=30)
        return ack

    async def close(self) -> None:
        self.watching.cancel()
        await asyncio.gather(self.watching, return_exceptions=True)
        await self.channel.close()


async def until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def read(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


def stream(request: pb.UploadRequest, data: bytes, *, size: int | None = None, sha256: str | None = None,
           node: str = "node-a") -> list[pb.UploadChunk]:
    """An agent's Upload of ``data`` as the file (first chunk with data), saying ``size`` and ``sha256``."""
    parts = [data[i:i + MIB] for i in range(0, len(data), MIB)] or [b""]
    first = pb.UploadChunk(node=node, request=request.request, id=request.id, data=parts[0],
                           size=len(data) if size is None else size,
                           sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256)
    return [first, *(pb.UploadChunk(data=p) for p in parts[1:])]


def run(cluster: Cluster, scenario: Callable[[World], Any], **settings: Any) -> None:
    async def go() -> None:
        async with serving(cluster, **settings) as world:
            await scenario(world)
    asyncio.run(go())


def test_a_fetch_brings_exactly_the_files_bytes_and_then_leaves_the_nodes_captures(
        cluster: Cluster, tokens: dict[str, str]) -> None:
    data = os.urandom(2 * MIB + 12345)

    async def scenario(world: World) -> None:
        agent = Agent(world, "node-a", tokens["node-a"])
        try:
            await until(lambda: agent.got, "the first NodeCaptures")
            assert not agent.asked()
            fetching = asyncio.create_task(read(world.uploads.fetch("node-a", CID, len(data),
                                                                    hashlib.sha256(data).hexdigest())))
            (request,) = await agent.request()
            assert request.id == CID and request.request
            ack = await agent.upload(stream(request, data))
            assert ack.leader
            assert await fetching == data
            await until(lambda: not agent.asked(), "the request gone from node-a's NodeCaptures")
            assert world.uploads.fetches == {} and "node-a" not in world.hub.uploads
        finally:
            await agent.close()

    run(cluster, scenario)


def test_a_file_that_is_not_the_one_the_status_names_fails_the_fetch_with_the_reason(
        cluster: Cluster, tokens: dict[str, str]) -> None:
    data = os.urandom(MIB + 100)
    size, sha = len(data), hashlib.sha256(data).hexdigest()
    cases: list[tuple[Callable[[pb.UploadRequest], list[pb.UploadChunk]], str, grpc.StatusCode | None]] = [
        (lambda r: stream(r, data[:-1], size=size, sha256=sha), f"sent {size - 1} bytes of {CID}, its status says {size}",
         None),
        (lambda r: stream(r, data[:-1] + b"!", size=size, sha256=sha), f"have sha256 {hashlib.sha256(data[:-1] + b'!').hexdigest()}, its status says {sha}",
         None),
        (lambda r: stream(r, data + b"!", size=size, sha256=sha), f"sent more than the {size} bytes", None),
        # The agent's own size and sha256 differ: refused at the first chunk, the stream ended.
        (lambda r: stream(r, data[:5]), f"is 5 bytes with sha256 {hashlib.sha256(data[:5]).hexdigest()}, its status "
         f"says {size} bytes", grpc.StatusCode.CANCELLED),
    ]

    async def scenario(world: World) -> None:
        agent = Agent(world, "node-a", tokens["node-a"])
        try:
            for make, why, code in cases:
                fetching = asyncio.create_task(read(world.uploads.fetch("node-a", CID, size, sha)))
                (request,) = await agent.request()
                try:
                    await agent.upload(make(request))
                    assert code is None
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in (code, grpc.StatusCode.CANCELLED)  # the fetch failed first
                with pytest.raises(UploadFailed) as failed:
                    await fetching
                assert why in str(failed.value)
                await until(lambda: not agent.asked(), "the failed request withdrawn")
        finally:
            await agent.close()

    run(cluster, scenario)


def test_the_nodes_refusal_fails_the_fetch_in_its_words(cluster: Cluster, tokens: dict[str, str]) -> None:
    async def scenario(world: World) -> None:
        agent = Agent(world, "node-a", tokens["node-a"])
        try:
            fetching = asyncio.create_task(read(world.uploads.fetch("node-a", CID, 10, "ab" * 32)))
            (request,) = await agent.request()
            ack = await agent.upload([pb.UploadChunk(node="node-a", request=request.request, id=request.id,
                                                     error="the dp reports no capture " + "x" * 1000)])
            assert ack.leader
            with pytest.raises(UploadFailed) as failed:
                await fetching
            assert str(failed.value).startswith(f"node node-a cannot send {CID}: the dp reports no capture xxx")
            assert len(str(failed.value)) < 400  # the node's words are bounded
        finally:
            await agent.close()

    run(cluster, scenario)


def test_uploads_not_asked_of_the_token_s_node_are_refused_and_a_fetch_not_started_times_out(
        cluster: Cluster, tokens: dict[str, str]) -> None:
    async def scenario(world: World) -> None:
        a, b = Agent(world, "node-a", tokens["node-a"]), Agent(world, "node-b", tokens["node-b"])
        try:
            fetching = asyncio.create_task(read(world.uploads.fetch("node-a", CID, 3, "ab" * 32)))
            other = asyncio.create_task(read(world.uploads.fetch("node-b", CID, 3, "ab" * 32)))
            (request,) = await a.request()
            (for_b,) = await b.request()
            refusals = [
                # node-b's token claiming node-a's request
                (b.upload(stream(request, b"abc")), grpc.StatusCode.PERMISSION_DENIED, "bound to node node-b"),
                # node-a's token, a request id the operator never sent
                (a.upload(stream(pb.UploadRequest(request="made-up", id=CID), b"abc")),
                 grpc.StatusCode.FAILED_PRECONDITION, "'made-up' was not asked of node node-a"),
                # node-a's token, node-b's request
                (a.upload(stream(for_b, b"abc")), grpc.StatusCode.FAILED_PRECONDITION, "was not asked of node node-a"),
                # node-a's request, another capture
                (a.upload(stream(pb.UploadRequest(request=request.request, id="snap/other/0f"), b"abc")),
                 grpc.StatusCode.FAILED_PRECONDITION, f"is for capture {CID}, not 'snap/other/0f'"),
                # no token at all: refused before a message is read
                (a.upload(stream(request, b"abc"), metadata=(("x-nothing", "1"),)),
                 grpc.StatusCode.UNAUTHENTICATED, ""),
            ]
            for call, code, why in refusals:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == code and why in (refused.value.details() or "")
            with pytest.raises(UploadFailed) as failed:
                await fetching
            assert str(failed.value) == f"node node-a did not start sending {CID} within 2 s (is its agent connected?)"
            other.cancel()
            await asyncio.gather(other, return_exceptions=True)
            await until(lambda: not a.asked() and not b.asked() and not world.uploads.fetches, "both withdrawn")
        finally:
            await a.close()
            await b.close()

    run(cluster, scenario, start_timeout=2.0)


def test_a_reader_that_stops_withdraws_the_fetch_and_a_slow_one_slows_the_agent(
        cluster: Cluster, tokens: dict[str, str]) -> None:
    total = 32
    data = os.urandom(total * MIB)

    async def scenario(world: World) -> None:
        agent = Agent(world, "node-a", tokens["node-a"])
        sent = [0]
        try:
            fetch = world.uploads.fetch("node-a", CID, len(data), hashlib.sha256(data).hexdigest())
            first = asyncio.create_task(anext(fetch))
            (request,) = await agent.request()

            async def chunks() -> AsyncIterator[pb.UploadChunk]:
                for chunk in stream(request, data):
                    sent[0] += 1
                    yield chunk

            uploading = asyncio.create_task(agent.upload(chunks()))
            assert await first == data[:MIB]
            await asyncio.sleep(1.0)  # the reader takes nothing more: the agent must wait
            assert sent[0] <= 12, f"{sent[0]} MiB sent to a reader that took 1"
            await fetch.aclose()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await uploading
            # The operator ends the stream (CANCELLED, "ended on the operator's side"); a client
            # still writing when it ends hears INTERNAL from its own gRPC core instead.
            assert ended.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)
            assert sent[0] < total
            await until(lambda: not agent.asked(), "the request withdrawn from node-a's NodeCaptures")
            assert world.uploads.fetches == {}
        finally:
            await agent.close()

    run(cluster, scenario)


def test_a_stream_that_stalls_fails_the_fetch_and_is_ended(cluster: Cluster, tokens: dict[str, str]) -> None:
    data = os.urandom(2 * MIB)

    async def scenario(world: World) -> None:
        agent = Agent(world, "node-a", tokens["node-a"])
        try:
            fetching = asyncio.create_task(read(world.uploads.fetch("node-a", CID, len(data),
                                                                    hashlib.sha256(data).hexdigest())))
            (request,) = await agent.request()

            async def stalling() -> AsyncIterator[pb.UploadChunk]:
                yield stream(request, data)[0]
                await asyncio.sleep(30)

            uploading = asyncio.create_task(agent.upload(stalling()))
            with pytest.raises(UploadFailed) as failed:
                await fetching
            assert f"node node-a sent nothing of {CID} for 1 s" in str(failed.value)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await uploading
            assert ended.value.code() == grpc.StatusCode.CANCELLED
        finally:
            await agent.close()

    run(cluster, scenario, stall_timeout=1.0)


def test_fetches_in_flight_are_bounded_per_node_and_in_all(cluster: Cluster, tokens: dict[str, str]) -> None:
    async def scenario(world: World) -> None:
        agent = Agent(world, "node-a", tokens["node-a"])
        pending: list[asyncio.Task[bytes]] = []
        try:
            def start(node: str) -> asyncio.Task[bytes]:
                task = asyncio.create_task(read(world.uploads.fetch(node, CID, 1, "ab" * 32)))
                pending.append(task)
                return task

            for _ in range(2):
                start("node-a")
            await agent.request(2)
            with pytest.raises(FetchesBusy, match="^busy: node node-a is sending 2 files already"):
                await read(world.uploads.fetch("node-a", CID, 1, "ab" * 32))
            for node in ("node-b", "node-b", "node-c", "node-c", "node-d", "node-d"):
                start(node)
            await until(lambda: len(world.uploads.fetches) == MAX_IN_FLIGHT == 8, "8 fetches in flight")
            with pytest.raises(FetchesBusy, match="^busy: 8 files are being fetched already"):
                await read(world.uploads.fetch("node-e", CID, 1, "ab" * 32))
            assert len(agent.asked()) == 2
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await until(lambda: not agent.asked() and not world.uploads.fetches and not world.hub.uploads,
                        "every fetch withdrawn")
        finally:
            await agent.close()

    run(cluster, scenario)


def test_a_follower_fetches_nothing_and_answers_an_upload_not_leader(cluster: Cluster, tokens: dict[str, str]) -> None:
    async def scenario(world: World) -> None:
        with pytest.raises(UploadFailed, match="does not lead"):
            await read(world.uploads.fetch("node-a", CID, 1, "ab" * 32))
        agent = Agent(world, "node-a", tokens["node-a"])
        try:
            ack = await agent.upload(stream(pb.UploadRequest(request="r", id=CID), b"x"))
            assert not ack.leader
        finally:
            await agent.close()

    run(cluster, scenario, leader=False)
