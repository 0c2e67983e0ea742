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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from flowmap_agent.captures import Orders, orders, statuses
from flowmap_agent.following import alongside, bearer, follow, secure_channel
from flowmap_agent.settings import Settings
from flowmap_api import report_pb2 as pb
from flowmap_api import report_pb2_grpc as pb_grpc
from flowmap_dp import wire_pb2

log = logging.getLogger("flowmap.agent.capture")


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

    def _load(self) -> pb.NodeCaptures | None:
        try:
            return pb.NodeCaptures.FromString(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # protobuf's DecodeError is a ValueError
            log.error("cannot read the saved capture orders %s (%s): none until the operator's", self.path, exc)
            return None

    def _save(self, message: pb.NodeCaptures) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(message.SerializeToString())
        os.replace(temporary, self.path)

    def orders(self, pods: Mapping[str, str]) -> Orders:
        """What the next Control carries, for the pods known now."""
        made = orders(self.wanted, pods) if self.wanted is not None else Orders()
        self.refused = made.refused
        self.running.set(len(made.captures))
        return made

    def took(self, health: wire_pb2.Health) -> None:
        """The dp's worker 0 reported its health: its captures as they stand."""
        self.reported = tuple(health.packet_captures)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the orders and report, until ``stop``."""
        await alongside(stop, self.watch(stop), self.report_loop(stop))

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep the stream open; each message becomes the orders (saved: see the module docstring)."""
        s = self.settings
        first = [True]

        def take(message: pb.NodeCaptures) -> None:
            if first[0]:
                first[0] = False
                self.sent = None  # a new stream: the operator hears how every capture stands
            self.wanted = message
            self.version.set(message.version)
            try:
                self._save(message)
            except OSError as exc:
                log.error("cannot save the capture orders to %s (%s): a restarted agent would not know them",
                          self.path, exc)

        def open_stream(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
                        ) -> grpc.aio.UnaryStreamCall:
            first[0] = True
            return pb_grpc.CaptureServiceStub(channel).Watch(pb.WatchRequest(node=s.node), metadata=metadata)

        await follow(s, open_stream, take, self.streams, stop, what="capture",
                     stays="the captures ordered stay", max_receive=s.capture_max_bytes)

    async def report_loop(self, stop: asyncio.Event) -> None:
        """Each interval, report the statuses when they changed (or were not taken)."""
        channel: grpc.aio.Channel | None = None
        try:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.settings.interval)
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
                    code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                    self.reports.labels(code.lower()).inc()
                    log.warning("capture report failed (%s): sent again in %.1f s", code, self.settings.interval)
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
