"""The map rebuilt from the API on start: the Connections and Groups are the only store.

Counters and watermarks go back into the ledger, what an edge and a group carry back into the
topology; what the objects say is read by flowmap_operator.status. Both lists are read at once and
a page at a time (flowmap_operator.kubeapi.listed): no report is served before they are in, and
10,000 Connections in one answer is a response the API server must build whole in its memory.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kubernetes_asyncio.client import CustomObjectsApi

from flowmap_operator import status as objects
from flowmap_operator.kubeapi import listed
from flowmap_operator.topology import GroupInfo, Topology

log = logging.getLogger("flowmap.operator.loading")


async def load(api: CustomObjectsApi, topology: Topology) -> None:
    """Rebuild counters, watermarks and groups from the objects."""
    conns, groups = await asyncio.gather(listed(api, "connections"), listed(api, "groups"))
    for obj in conns:
        conn = objects.read_connection(obj)
        topology.ledger.load(conn.key, conn.counters, conn.watermarks, conn.resource_version)
        objects.edge_read_back(topology.edge(conn.key), conn)
        topology.ports.setdefault((conn.key[0], conn.key[1], conn.key[3]), set()).add(conn.key[2])
    started = time.time()
    for obj in groups:
        # Pods deleted before the cluster was read (the previous operator's own) are known only
        # here: batches resent after the restart still name them.
        topology.resolver.group_members_seen(obj, started)
        kept = objects.read_group(obj)
        group = topology.groups.setdefault(kept.name, GroupInfo(kept.peer))
        if kept.mode:
            topology.modes.prior[kept.name] = kept.mode
        for ip in kept.fqdn_ips:
            # What agents saw this name resolve to holds a grace period after we start: Protect
            # keeps allowing it until agents see the name again.
            topology.resolver.learn_name(ip, kept.peer.member, 0, kept.last_seen)
        group.exists, group.user_defined, group.generation = True, kept.user_defined, kept.generation
        group.conditions, group.written_said = kept.conditions, objects.written_facts(kept.conditions)
        group.written_last_seen = group.last_seen = max(group.last_seen, kept.last_seen)
    log.info("loaded %d connections and %d groups", len(topology.edges), len(topology.groups))
