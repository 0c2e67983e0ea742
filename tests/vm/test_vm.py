"""A real VM: QEMU booting a Debian kernel and a busybox initramfs, started through a real
libvirtd that the test starts (KVM where it boots, TCG otherwise), on a tap in a node namespace."""

from __future__ import annotations

import libvirt

from flowmap_devenv import vmimage
from tests.vm.harness import Node


def test_a_real_vm_boots_through_a_private_libvirtd_and_answers_http(node: Node) -> None:
    vm = node.boot(node.domain("web-1", label="shop-web"))
    print(f"\n{vm.domain.name} booted in {vm.booted_s:.1f} s ({node.accel})")
    # the tap libvirt made is on the node, with the host side's address, and the VM answers HTTP on it
    links = node.links()
    assert vm.domain.tap in links
    assert links[vm.domain.tap] == "fe" + vm.domain.mac[2:]  # libvirt's host side of a guest MAC
    assert node.lab.exec(node.ns, "ip", "-o", "-4", "addr", "show", "dev", vm.domain.tap).split()[3] == \
        f"{vm.domain.host_ip}/{vm.domain.prefix}"
    assert node.http(f"http://{vm.domain.vm_ip}/") == f"flowmap-vm {vm.domain.name}\n"
    # the VM is a client too: it fetches from a server on the node
    server = node.lab.popen(node.ns, ["busybox", "httpd", "-f", "-p", f"{vm.domain.host_ip}:8080", "-h",
                                      str(node.folder / "www")])
    try:
        (node.folder / "www").mkdir()
        (node.folder / "www" / "index.html").write_text("from the node\n")
        assert node.http(f"http://{vm.domain.vm_ip}/cgi-bin/fetch?http://{vm.domain.host_ip}:8080/") == \
            "from the node\n"
    finally:
        server.terminate()
        server.wait()
    # destroyed: QEMU ends and the tap goes with it; the definition stays
    conn = node.connect()
    try:
        dom = conn.lookupByUUIDString(vm.domain.uuid)
        assert dom.name() == "web-1" and dom.isActive()
        dom.destroy()
        assert not dom.isActive()
        assert [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)] == ["web-1"]
    finally:
        conn.close()
    assert vm.domain.tap not in node.links()


def test_the_image_modules_come_in_dependency_order() -> None:
    needs = {"virtio_net": ["net_failover", "virtio"], "net_failover": ["failover"], "failover": [],
             "virtio": [], "virtio_pci": ["virtio", "virtio_pci_modern_dev"], "virtio_pci_modern_dev": []}
    order = vmimage.module_order(["virtio_pci", "virtio_net"], lambda m: needs[m], needs)
    assert sorted(order) == sorted(needs)
    for module, deps in needs.items():
        assert all(order.index(d) < order.index(module) for d in deps)


def test_a_module_depends_entry_is_read_from_its_modinfo() -> None:
    ko = b"\x7fELF...\0license=GPL\0depends=virtio,net_failover\0retpoline=Y\0name=virtio_net\0"
    assert vmimage.depends(ko) == ["virtio", "net_failover"]
    assert vmimage.depends(b"\0depends=\0name=failover\0") == []
