"""What the dp is told (its ``Control``): where to capture, the node's own addresses, the overlay
to drop on the uplinks, and the packet captures the operator ordered.

A Control goes only when one of those changed: the node's plumbing (flowmap_agent.plumbing) or the
captures (flowmap_agent.capturing, for the pods whose interface is found now). Every Control names
the whole set of captures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from flowmap_agent import plumbing
from flowmap_agent.captures import Orders, local_pods
from flowmap_agent.capturing import Capturer
from flowmap_agent.listening import ReportReader
from flowmap_agent.pods import LocalPods
from flowmap_dp import wire_pb2

log = logging.getLogger("flowmap.agent")


class DpControl:
    """Remembers what the dp was told last, and tells it again when that changed."""

    def __init__(self, capturer: Capturer, own_changed: Callable[[plumbing.Plan], None]) -> None:
        self.capturer, self.own_changed = capturer, own_changed
        self.told: tuple[plumbing.Plan, Orders] | None = None  # what the dp was told last

    def update(self, dp: ReportReader, wanted: plumbing.Plan, pods: LocalPods,
               vms: Mapping[str, Sequence[str]] | None = None) -> None:
        """Tell the dp when what it should do changed: the node's plumbing, or its packet captures
        (the operator's orders, for the pods whose interface is found now, and the libvirt VMs'
        taps, ``vms``: flowmap_agent.captures.local_vms)."""
        orders = self.capturer.orders(local_pods(pods.by_ip, wanted.pods), vms)
        told, told_orders = self.told if self.told is not None else (None, None)
        if told is None or orders != told_orders or (
                wanted.interfaces, wanted.own, wanted.underlay, wanted.overlay) != (
                told.interfaces, told.own, told.underlay, told.overlay):
            self._tell(dp, wanted, told, orders)
            self.told = (wanted, orders)

    def _tell(self, dp: ReportReader, wanted: plumbing.Plan, told: plumbing.Plan | None, orders: Orders) -> None:
        """The node's plumbing or its packet captures changed: the dp captures what it should, and
        the node's own addresses go to the rest of the agent too (``own_changed``)."""
        if told is None or wanted.own != told.own:
            log.info("the node's own addresses: %s", sorted(wanted.own))
            self.own_changed(wanted)
        if told is None or (wanted.underlay, wanted.overlay) != (told.underlay, told.overlay):
            log.info("overlay %s dropped on %s", [tuple(e) for e in wanted.overlay], list(wanted.underlay))
        dp.set_control(wire_pb2.Control(
            interfaces=wanted.interfaces, local_addresses=sorted(wanted.own), underlay=wanted.underlay,
            overlay=[wire_pb2.Encapsulation(ip_proto=e.ip_proto, port=e.port) for e in wanted.overlay],
            packet_captures=orders.captures, keep=orders.keep))
