"""Packet captures on the node: follow ``CaptureService.Watch``, hand the orders to the run loop
(which puts them in every Control to the dp), and report how each capture stands.

The pure part is flowmap_agent.captures. Here:

* **The orders** are the latest ``NodeCaptures`` streamed (flowmap_agent.following: the same
  stream, token and backoff as Protect mode's). They are saved beside the agent's state and read
  back when the agent starts, because the dp takes every Control as the whole set of captures,
  its first included: a restarted agent that named none until the operator answered would stop
  an external dp's running captures and delete the files it keeps. Until a first order has ever
  arrived, Controls name none (nothing is held to lose).
* **Reports.** Each interval, the statuses of the dp's latest health (its worker 0's
  ``packet_captures``) and the agent's own refusals go to ``CaptureService.Report`` when they
  differ from what the operator last took, and once after each new Watch stream. A failed report
  goes again at the next interval.
* **Uploads.** A request in the orders (``NodeCaptures.uploads``) is answered with an Upload call
  streaming the file in chunks of at most ``MAX_UPLOAD_CHUNK`` bytes, each read from the disk
  only when gRPC takes the previous one (the operator's reader sets the pace); one the orders no
  longer carry is cancelled. Which to start is decided in flowmap_agent.captures; the file is
  opened here without following a link and sent only if it is a regular file. A request is served
  once, whatever the outcome: the operator asks again under a new id.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from flowmap_agent.captures import Orders, orders, statuses, upload_path, uploads
from flowmap_agent.errors import Unservable, failure
from flowmap_agent.following import alongside, bearer, follow, secure_channel
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_api.limits import MAX_UPLOAD_CHUNK, MAX_UPLOAD_ERROR
from flowmap_api.pacing import pause
from flowmap_dp import wire_pb2

log = logging.getLogger("flowmap.agent.capture")


def open_capture(path: str) -> BinaryIO:
    """The file at ``path`` for reading, if it is a regular file: never through a symbolic link,
    never a FIFO or a device someone put in its place. Unservable otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Unservable(f"{os.path.basename(path)} is a symbolic link") from None
        raise Unservable(f"cannot open {os.path.basename(path)}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Unservable(f"{os.path.basename(path)} is not a regular file")
    return os.fdopen(fd, "rb")


class Capturer:
    """The node's packet captures, as the operator orders them and as the dp runs them."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.path = Path(settings.state_file + ".captures")
        self.wanted: pb.NodeCaptures | None = self._load()  # the latest orders (None: never any)
        self.reported: tuple[wire_pb2.PacketCaptureStatus, ...] = ()  # the dp's, from its latest health
        self.refused: Mapping[str, str] = {}  # the agent's refusals in the orders told the dp last
        self.sent: list[pb.CaptureStatus] | None = None  # what the operator took last (None: send)
        self.version = Gauge("flowmap_agent_capture_version", "Version of the capture orders followed.",
                             registry=registry)
        self.running = Gauge("flowmap_agent_capture_orders", "Packet captures told to the dp (a target pod "
                             "known here).", registry=registry)
        self.streams = Counter("flowmap_agent_capture_watch_breaks", "CaptureService.Watch streams that broke, "
                               "by code.", ("code",), registry=registry)
        self.reports = Counter("flowmap_agent_capture_reports", "CaptureService.Report calls by result.",
                               ("result",), registry=registry)
        self.uploads = Counter("flowmap_agent_capture_uploads", "CaptureService.Upload calls by result (ok: "
                               "the operator took the stream, a refusal to send included; withdrawn: cancelled).",
                               ("result",), registry=registry)
        self.asked: tuple[pb.UploadRequest, ...] = ()  # the operator's latest upload requests
        self.uploading: dict[str, asyncio.Task[None]] = {}  # request id -> its call
        self.served: set[str] = set()  # request ids whose call ended (only those still asked)

    def _load(self) -> pb.NodeCaptures | None:
        try:
            kept: pb.NodeCaptures = pb.NodeCaptures.FromString(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # protobuf's DecodeError is a ValueError
            log.error("cannot read the saved capture orders %s (%s): none until the operator's", self.path, exc)
            return None
        return kept

    def _save(self, message: pb.NodeCaptures) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(message.SerializeToString())
        os.replace(temporary, self.path)

    def orders(self, pods: Mapping[str, str], vms: Mapping[str, Sequence[str]] | None = None) -> Orders:
        """What the next Control carries, for the pods (and libvirt VMs) known now."""
        made = orders(self.wanted, pods, vms) if self.wanted is not None else Orders()
        self.refused = made.refused
        self.running.set(len(made.captures))
        return made

    def took(self, health: wire_pb2.Health) -> None:
        """The dp's worker 0 reported its health: its captures as they stand."""
        self.reported = tuple(health.packet_captures)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the orders, report and send the files asked for, until ``stop``."""
        try:
            await alongside(stop, self.watch(stop), self.report_loop(stop))
        finally:
            self.asked = ()
            calls = list(self.uploading.values())
            self.uploading.clear()
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep the stream open; each message becomes the orders (saved: see the module docstring)."""
        s = self.settings
        first = [True]

        def adopt(message: pb.NodeCaptures) -> None:
            if first[0]:
                first[0] = False
                self.sent = None  # a new stream: the operator hears how every capture stands
            self.wanted = message
            self.version.set(message.version)
            self.asked = tuple(message.uploads)
            self.serve()
            try:
                self._save(message)
            except OSError as exc:
                log.error("cannot save the capture orders to %s (%s): a restarted agent would not know them",
                          self.path, exc)

        def open_stream(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
                        ) -> grpc.aio.UnaryStreamCall:
            first[0] = True
            return pb_grpc.CaptureServiceStub(channel).Watch(pb.WatchRequest(node=s.node), metadata=metadata)

        await follow(s, open_stream, adopt, self.streams, stop, what="capture",
                     stays="the captures ordered stay", max_receive=s.capture_max_bytes)

    def serve(self) -> None:
        """Start the calls the operator's requests call for, cancel the withdrawn ones."""
        asked = {r.request for r in self.asked}
        self.served &= asked
        todo = uploads(self.asked, self.uploading.keys(), self.served)
        for request in todo.cancel:
            self.uploading.pop(request).cancel()
            self.uploads.labels("withdrawn").inc()
        for r in todo.start:
            call = asyncio.create_task(self.upload(r))
            self.uploading[r.request] = call
            call.add_done_callback(partial(self._ended, r.request))

    def _ended(self, request: str, call: asyncio.Task[None]) -> None:
        if self.uploading.get(request) is call:  # not cancelled: the next waiting request may start
            del self.uploading[request]
            self.served.add(request)
            self.serve()

    async def upload(self, request: pb.UploadRequest) -> None:
        """One Upload call answering ``request``; its outcome counted and logged, never raised."""
        s = self.settings
        channel: grpc.aio.Channel | None = None
        try:
            channel = secure_channel(s)
            ack = await pb_grpc.CaptureServiceStub(channel).Upload(self.chunks(request), metadata=bearer(s))
            result = "ok" if ack.leader else "not_leader"
        except (grpc.RpcError, OSError) as exc:
            failed = failure(exc, upload=True)  # served once whatever the outcome: Unwanted or not, never again
            result = failed.label
            log.warning("upload of capture %s ended (%s)", request.id[:200], failed.code)
        finally:
            if channel is not None:
                await channel.close()
        self.uploads.labels(result).inc()

    async def chunks(self, request: pb.UploadRequest) -> AsyncIterator[pb.UploadChunk]:
        """The Upload's messages: the first names the file as the dp reported it, or says why it is
        not sent; then the file's data, read as gRPC takes each chunk."""
        head = pb.UploadChunk(node=self.settings.node, request=request.request, id=request.id)
        try:
            path, status = upload_path(request.id, self.reported, self.settings.capture_dir)
            file = open_capture(path)
        except Unservable as exc:
            head.error = str(exc)[:MAX_UPLOAD_ERROR]
            log.warning("capture %s not sent: %s", request.id[:200], head.error)
            yield head
            return
        with file:
            head.size, head.sha256 = status.file_bytes, status.sha256
            head.data = await asyncio.to_thread(file.read, MAX_UPLOAD_CHUNK)
            yield head
            while data := await asyncio.to_thread(file.read, MAX_UPLOAD_CHUNK):
                yield pb.UploadChunk(data=data)

    async def report_loop(self, stop: asyncio.Event) -> None:
        """Each interval, report the statuses when they changed (or were not taken)."""
        channel: grpc.aio.Channel | None = None
        try:
            while not stop.is_set():
                await pause(stop, self.settings.interval)
                now = statuses(self.reported, self.refused)
                if now == self.sent:
                    continue
                try:
                    if channel is None:
                        channel = secure_channel(self.settings)
                    ack = await pb_grpc.CaptureServiceStub(channel).Report(
                        pb.CaptureReport(node=self.settings.node, captures=now), metadata=bearer(self.settings),
                        timeout=self.settings.send_timeout)
                except (grpc.RpcError, OSError) as exc:
                    failed = failure(exc)  # whatever the code, the statuses go again at the next interval
                    self.reports.labels(failed.label).inc()
                    log.warning("capture report failed (%s): sent again in %.1f s", failed.code, self.settings.interval)
                    if channel is not None:
                        await channel.close()
                        channel = None
                    continue
                if not ack.leader:  # a replica that keeps no captures: a new connection may reach another
                    self.reports.labels("not_leader").inc()
                    await channel.close()
                    channel = None
                    continue
                self.reports.labels("ok").inc()
                self.sent = now
        finally:
            if channel is not None:
                await channel.close()
