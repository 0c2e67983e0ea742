"""Packet captures through the agent: an operator's CaptureService (a real gRPC server, TLS and
token) streams orders; the agent's loop step puts them in the Control a dp reads off the agent's
real socket (the dp's own Exporter); the dp's statuses in its health go back to the operator's
Report, when they change and once after a reconnect. Live: a real dp on a simulated node writes
the packets an order selects, and the operator hears the file's size and sha256."""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from flowmap_agent import plumbing
from flowmap_agent.capturing import Capturer
from flowmap_agent.pods import LocalPods
from flowmap_agent.running import Agent
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api.limits import MAX_UPLOAD_CHUNK
from flowmap_devenv import pki
from flowmap_dp import wire_pb2
from flowmap_dp.capturing import file_name
from flowmap_dp.sending import Exporter
from tests.agent.test_receiving import Acknowledging
from tests.dp.test_live import A4, B4, FLOWMAP, Node, node  # noqa: F401 (the fixture)

ID = "shop/cap/0f1e2d3c-aaaa-bbbb-cccc-000000000001"
ORDER = pb.CaptureOrder(id=ID, targets=[pb.CaptureTarget(pod="shop/web-1", workload="web"),
                                        pb.CaptureTarget(pod="shop/ghost", workload="ghost")],
                        snap_length=128, max_bytes=1 << 20,
                        max_packets=100, duration_seconds=60, armed=True, pre_trigger_seconds=5,
                        filters=[pb.CaptureFilter(cidrs=["10.0.0.0/8"], protocol=pb.TCP, port=5432)])
FIRED = pb.CaptureOrder()
FIRED.CopyFrom(ORDER)
FIRED.fired = True


class Operator(pb_grpc.CaptureServiceServicer):
    """Streams what the test queues (None: break the stream), takes reports and uploads (whole,
    or while ``hold`` is set only the first chunk, then waits to be cancelled); checks the token."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.queue: asyncio.Queue[pb.NodeCaptures | None] = asyncio.Queue()
        self.reports: list[pb.CaptureReport] = []
        self.watches: list[str] = []
        self.uploads: dict[str, list[pb.UploadChunk]] = {}  # request -> its chunks, once the stream ended
        self.hold = False
        self.held: list[str] = []  # requests held
        self.cancelled: list[str] = []  # held requests the agent cancelled

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        if dict(context.invocation_metadata() or ()).get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")

    async def Watch(self, request: pb.WatchRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.NodeCaptures]:
        await self._check(context)
        self.watches.append(request.node)
        while (message := await self.queue.get()) is not None:
            yield message
        await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")

    async def Report(self, request: pb.CaptureReport,  # noqa: N802
                     context: grpc.aio.ServicerContext) -> pb.CaptureReportAck:
        await self._check(context)
        self.reports.append(request)
        return pb.CaptureReportAck(leader=True)

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadChunk],  # noqa: N802
                     context: grpc.aio.ServicerContext) -> pb.UploadAck:
        await self._check(context)
        if self.hold:
            first = await anext(aiter(request_iterator))
            self.held.append(first.request)
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.append(first.request)
                raise
        chunks = [c async for c in request_iterator]
        self.uploads[chunks[0].request] = chunks
        return pb.UploadAck(leader=True)


def received(chunks: list[pb.UploadChunk]) -> tuple[pb.UploadChunk, bytes]:
    """An upload's first chunk without its data, and the data of all."""
    head = pb.UploadChunk()
    head.CopyFrom(chunks[0])
    head.ClearField("data")
    assert all(len(c.data) <= MAX_UPLOAD_CHUNK and c == pb.UploadChunk(data=c.data) for c in chunks[1:])
    return head, b"".join(c.data for c in chunks)


async def serve(operator: Operator, keys: pki.Pki) -> tuple[grpc.aio.Server, int]:
    """The operator's CaptureService (and a ReportService taking every batch), TLS."""
    server = grpc.aio.server()
    pb_grpc.add_CaptureServiceServicer_to_server(operator, server)
    pb_grpc.add_ReportServiceServicer_to_server(Acknowledging(), server)
    creds = grpc.ssl_server_credentials([(keys.serving_key.read_bytes(), keys.serving_cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port


async def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_orders_reach_the_dp_and_its_statuses_reach_the_operator(tmp_path: Path) -> None:
    keys = pki.create(tmp_path / "pki")
    (tmp_path / "token").write_text("secret-token\n")

    async def scenario() -> None:
        operator = Operator("secret-token")
        server, port = await serve(operator, keys)
        settings = Settings(node="node-a", operator=f"localhost:{port}", ca_file=str(keys.ca_cert),
                            token_file=str(tmp_path / "token"), state_file=str(tmp_path / "state"),
                            socket=str(tmp_path / "run" / "dp.sock"), interval=0.2)
        registry = CollectorRegistry()
        agent = Agent(settings, registry=registry)
        dp = agent.open_dp()
        exporter = Exporter(settings.socket).start()  # the dp's end of the socket, as the dp runs it
        stop = asyncio.Event()
        following = asyncio.create_task(agent.capturer.run(stop))
        pods = LocalPods(None, "node-a")  # type: ignore[arg-type]  # filled by hand: no API server here
        pods.by_ip.update({"10.244.1.5": "shop/web-1", "10.244.1.6": "shop/db-0"})
        plan = plumbing.Plan(pods={"10.244.1.5": "veth5", "10.244.1.6": "veth6"}, interfaces=("veth5", "veth6"),
                             own=frozenset({"10.0.0.1"}), underlay=(), overlay=())

        def control() -> wire_pb2.Control:
            """The latest Control the dp read off the socket."""
            latest = None
            deadline = time.monotonic() + 10
            while latest is None or not exporter.controls.empty():
                try:
                    latest = exporter.controls.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise AssertionError("no Control reached the dp") from None
            return latest

        def metric(name: str, labels: dict[str, str] | None = None) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        try:
            await until(lambda: exporter.connects > 0, "the dp to connect")
            agent.dp_control.update(dp, plan, pods)  # before any order: the dp hears of none
            first = await asyncio.to_thread(control)
            assert list(first.interfaces) == ["veth5", "veth6"] and not first.packet_captures and not first.keep

            await operator.queue.put(pb.NodeCaptures(version=1, captures=[ORDER], keep=["shop/old/u"]))
            await until(lambda: metric("flowmap_agent_capture_version") == 1, "the first orders")
            assert operator.watches == ["node-a"]
            agent.dp_control.update(dp, plan, pods)
            told = await asyncio.to_thread(control)
            assert list(told.interfaces) == ["veth5", "veth6"]  # the rest of the Control as it was
            (entry,) = told.packet_captures
            assert entry == wire_pb2.PacketCapture(
                id=ID, snap_length=128, max_bytes=1 << 20, max_packets=100, duration_seconds=60, armed=True,
                pre_trigger_seconds=5,
                targets=[wire_pb2.PacketCaptureTarget(name="veth5", description="shop/web web-1")],  # ghost: unknown
                filters=[wire_pb2.PacketCaptureFilter(
                    peers=[wire_pb2.PacketCaptureNetwork(address=bytes([10, 0, 0, 0]), prefix_length=8)],
                    protocol=6, port=5432)])
            assert list(told.keep) == ["shop/old/u"]
            assert metric("flowmap_agent_capture_orders") == 1

            # The trigger fires: the next loop step tells the dp; an unchanged step sends nothing.
            await operator.queue.put(pb.NodeCaptures(version=2, captures=[FIRED]))
            await until(lambda: metric("flowmap_agent_capture_version") == 2, "the fired order")
            agent.dp_control.update(dp, plan, pods)
            assert (await asyncio.to_thread(control)).packet_captures[0].fired
            agent.dp_control.update(dp, plan, pods)
            await asyncio.sleep(0.3)
            assert exporter.controls.empty()

            # The dp's worker 0 says how the capture stands: the operator hears it, once.
            running = wire_pb2.PacketCaptureStatus(id=ID, state="running", packets=3, bytes=300, file_bytes=900,
                                                   path="/var/lib/flowmap/captures/x.pcapng")
            exporter.offer(wire_pb2.Report(run_id=7, worker=0, workers=1, sequence=1, part=0, parts=1,
                                           health=wire_pb2.Health(packet_captures=[running])))
            await until(lambda: bool(agent.receiver and agent.receiver.waiting), "the dp's report")
            await agent.step(dp)
            want = pb.CaptureStatus(id=ID, state="running", packets=3, bytes=300, file_bytes=900)
            await until(lambda: any(list(r.captures) == [want] for r in operator.reports), "the status report")
            assert all(r.node == "node-a" for r in operator.reports)
            reports = len(operator.reports)
            await asyncio.sleep(1.0)  # five intervals, nothing changed
            assert len(operator.reports) == reports

            # The stream breaks and comes back: the operator hears how things stand once more.
            await operator.queue.put(None)
            await until(lambda: metric("flowmap_agent_capture_watch_breaks_total", {"code": "unavailable"}) == 1,
                        "the break")
            await operator.queue.put(pb.NodeCaptures(version=3, captures=[FIRED]))
            await until(lambda: len(operator.watches) == 2, "the reconnection")
            await until(lambda: len(operator.reports) == reports + 1, "the report after the reconnection")
            assert list(operator.reports[-1].captures) == [want]
            await asyncio.sleep(0.6)
            assert len(operator.reports) == reports + 1
            assert metric("flowmap_agent_capture_reports_total", {"result": "ok"}) == reports + 1

            # A restarted agent names the same captures in its first Control, before the operator answers.
            again = Capturer(settings, CollectorRegistry())
            assert again.wanted is not None and again.wanted.version == 3
        finally:
            stop.set()
            await following
            exporter.stop(timeout=1)
            assert agent.receiver is not None
            agent.receiver.close()
            agent.intake.conntrack.shutdown()
            await server.stop(None)

    asyncio.run(scenario())


def test_asked_files_are_sent_byte_exact_and_nothing_else_is(tmp_path: Path) -> None:
    keys = pki.create(tmp_path / "pki")
    (tmp_path / "token").write_text("secret-token\n")
    folder = tmp_path / "captures"
    folder.mkdir()
    good, link, outside, unknown = (f"shop/{n}/0f1e2d3c-aaaa-bbbb-cccc-00000000000{i}"
                                    for i, n in enumerate(("good", "link", "outside", "unknown")))
    data = os.urandom(2 * MAX_UPLOAD_CHUNK + 777)
    (folder / file_name(good)).write_bytes(data)
    (tmp_path / "secret").write_bytes(b"not a capture")
    (folder / file_name(link)).symlink_to(tmp_path / "secret")
    (tmp_path / file_name(outside)).write_bytes(b"not in the folder")
    sha = hashlib.sha256(data).hexdigest()

    def done(capture_id: str, path: Path) -> wire_pb2.PacketCaptureStatus:
        return wire_pb2.PacketCaptureStatus(id=capture_id, state="done", file_bytes=len(data), sha256=sha,
                                            path=str(path))

    async def scenario() -> None:
        operator = Operator("secret-token")
        server, port = await serve(operator, keys)
        settings = Settings(node="node-a", operator=f"localhost:{port}", ca_file=str(keys.ca_cert),
                            token_file=str(tmp_path / "token"), state_file=str(tmp_path / "state"),
                            interval=0.2, capture_dir=str(folder))
        registry = CollectorRegistry()
        capturer = Capturer(settings, registry)
        capturer.took(wire_pb2.Health(packet_captures=[
            done(good, folder / file_name(good)), done(link, folder / file_name(link)),
            done(outside, tmp_path / file_name(outside))]))
        stop = asyncio.Event()
        running = asyncio.create_task(capturer.run(stop))
        asked = pb.NodeCaptures(version=1, uploads=[pb.UploadRequest(request=f"r{i}", id=capture_id) for i, capture_id
                                                    in enumerate((good, link, outside, unknown))])
        try:
            await operator.queue.put(asked)
            await until(lambda: len(operator.uploads) == 4, "four uploads")
            head, sent = received(operator.uploads["r0"])
            assert head == pb.UploadChunk(node="node-a", request="r0", id=good, size=len(data), sha256=sha)
            assert sent == data
            assert len(operator.uploads["r0"]) == 3  # 1 MiB, 1 MiB, the rest
            errors = {r: received(operator.uploads[r]) for r in ("r1", "r2", "r3")}
            assert {r: (head.id, sent) for r, (head, sent) in errors.items()} == {
                "r1": (link, b""), "r2": (outside, b""), "r3": (unknown, b"")}
            assert errors["r1"][0].error == f"{file_name(link)} is a symbolic link"
            assert errors["r2"][0].error.startswith(f"capture {outside}'s file is not {file_name(outside)} in the "
                                                    f"capture folder: '{tmp_path}")
            assert len(errors["r2"][0].error) <= 256
            assert errors["r3"][0].error == f"the dp reports no capture {unknown} (not run here, or by an earlier dp)"

            # The same requests again: each was served once.
            await operator.queue.put(asked)
            await asyncio.sleep(0.5)
            assert len(operator.uploads) == 4

            # A request withdrawn while it is sent: the agent cancels its call.
            operator.hold = True
            await operator.queue.put(pb.NodeCaptures(version=2, uploads=[pb.UploadRequest(request="r4", id=good)]))
            await until(lambda: operator.held == ["r4"], "the held upload")
            await operator.queue.put(pb.NodeCaptures(version=3))
            await until(lambda: operator.cancelled == ["r4"], "the call cancelled")
            assert registry.get_sample_value("flowmap_agent_capture_uploads_total", {"result": "withdrawn"}) == 1
            assert registry.get_sample_value("flowmap_agent_capture_uploads_total", {"result": "ok"}) == 4
            assert not capturer.uploading
        finally:
            stop.set()
            await running
            await server.stop(None)

    asyncio.run(scenario())


PORT = 6354


def test_live_a_real_dp_captures_what_the_order_selects(node: Node, tmp_path: Path) -> None:
    keys = pki.create(tmp_path / "pki")
    (tmp_path / "token").write_text("secret-token\n")
    folder = tmp_path / "captures"
    cid = "default/udp-dump/4f1c"
    order = pb.CaptureOrder(id=cid, targets=[pb.CaptureTarget(pod="default/b", workload="b")], snap_length=64, max_bytes=1 << 20, max_packets=100,
                            duration_seconds=2, filters=[pb.CaptureFilter(
                                cidrs=[f"{A4}/32"], protocol=pb.UDP, port=PORT,
                                direction=pb.CAPTURE_DIRECTION_INGRESS)])
    sizes = [10, 100, 1000]

    async def scenario() -> None:
        operator = Operator("secret-token")
        server, port = await serve(operator, keys)
        settings = Settings(node="node-a", operator=f"localhost:{port}", ca_file=str(keys.ca_cert),
                            token_file=str(tmp_path / "token"), state_file=str(tmp_path / "state"),
                            socket=str(tmp_path / "run" / "dp.sock"), interval=0.2,
                            capture_dir=str(folder))
        agent = Agent(settings, registry=CollectorRegistry())
        dp = agent.open_dp()
        log = open(tmp_path / "dp.log", "w")
        proc = node.lab.popen(node.node, [FLOWMAP, "dp", "run", "--socket", settings.socket, "--interval", "0.2",
                                          "--retire-ms", "10", "--block-size", str(1 << 18),
                                          "--capture-dir", str(folder)], stdout=log, stderr=subprocess.STDOUT)
        stop = asyncio.Event()
        following = asyncio.create_task(agent.capturer.run(stop))
        pods = LocalPods(None, "node-a")  # type: ignore[arg-type]  # filled by hand: no API server here
        pods.by_ip.update({A4: "default/a", B4: "default/b"})
        plan = plumbing.Plan(pods={A4: node.host_a, B4: node.host_b}, interfaces=(node.host_a, node.host_b),
                             own=frozenset(), underlay=(), overlay=())

        def status() -> pb.CaptureStatus | None:
            found = [c for r in operator.reports for c in r.captures if c.id == cid]
            return found[-1] if found else None

        async def stands(state: str) -> pb.CaptureStatus:
            for _ in range(150):  # the agent's loop, as Agent.run runs it
                agent.dp_control.update(dp, plan, pods)
                await agent.step(dp)
                if (s := status()) is not None and s.state == state:
                    return s
                await asyncio.sleep(0.1)
            raise AssertionError(f"no {state!r} status: {status()}; dp: {(tmp_path / 'dp.log').read_text()[-2000:]}")

        try:
            await operator.queue.put(pb.NodeCaptures(version=1, captures=[order]))
            await stands("running")
            send = ("import socket\n"
                    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    f"for n in {sizes}: s.sendto(b'x' * n, ('{B4}', {PORT}))\n"
                    f"s.sendto(b'y', ('{B4}', {PORT + 1}))\n")  # another port: left out
            await asyncio.to_thread(node.lab.exec, node.pod_a, sys.executable, "-c", send)
            done = await stands("done")
            assert (done.stop_reason, done.drops, done.message) == ("DurationReached", 0, "")
            # Ethernet 14 + IPv4 20 + UDP 8 + payload, at most the snap length of each.
            assert (done.packets, done.bytes) == (3, sum(min(64, 42 + n) for n in sizes))
            (file,) = folder.iterdir()
            raw = file.read_bytes()
            assert (done.file_bytes, done.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
            assert b"default/b b" in raw  # the interface's description, "namespace/workload pod"

            # The operator asks for the finished file: it comes byte-exact, as the dp reported it.
            await operator.queue.put(pb.NodeCaptures(version=2, uploads=[pb.UploadRequest(request="r1", id=cid)]))
            await until(lambda: "r1" in operator.uploads, "the upload")
            head, sent = received(operator.uploads["r1"])
            assert sent == raw and (head.size, head.sha256, head.error) == (done.file_bytes, done.sha256, "")
        finally:
            stop.set()
            await following
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            assert agent.receiver is not None
            agent.receiver.close()
            agent.intake.conntrack.shutdown()
            await agent.delivery.close()
            await server.stop(None)

    asyncio.run(scenario())
