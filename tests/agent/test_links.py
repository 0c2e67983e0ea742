"""The node's interfaces read over netlink, in a throwaway namespace."""

from __future__ import annotations

from flowmap_agent import links
from flowmap_devenv.netns import Lab


def test_interface_addresses_are_the_global_ones_of_the_named_interfaces(privileged: None) -> None:
    lab = Lab()
    try:
        node, other = lab.ns("fmnode"), lab.ns("fmrtr")
        uplink, _ = lab.veth(node, ["172.18.0.2/24", "172.18.9.2/24", "fd00:172:18::2/64"], other, ["172.18.0.1/24"])
        lab.veth(node, ["10.244.1.1/24"], other, [])  # not an uplink
        assert "inet6 fe80:" in lab.exec(node, "ip", "addr", "show", uplink)  # link-local: left out
        assert links.interface_addresses([uplink], node) == {"172.18.0.2", "172.18.9.2", "fd00:172:18::2"}
    finally:
        lab.close()
