"""``flowmap graph -o`` against a real API server: the demo's map as SVG, PNG, HTML; one-line errors."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from flowmap_cli.drawing import COLOURS
from flowmap_cli.rendering import inline
from flowmap_devenv.controlplane import ControlPlane
from tests.conftest import need
from tests.graph import demo
from tests.graph.conftest import graph, start
from tests.graph.dotfile import read_svg

GROUPS = {g["metadata"]["name"] for g in demo.groups()}
EDGES = Counter(f"{c[0]}->{c[1]}" for c in demo.CONNECTIONS)


def need_dot() -> None:
    need(shutil.which("dot") is not None, "flowmap graph needs Graphviz's dot (hack/debian-packages.txt)")


def one_line_error(proc: object, *words: str) -> str:
    """The command failed with exit code 1 and said why in one line holding ``words``."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)  # type: ignore[attr-defined]
    lines = proc.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("flowmap graph: "), proc.stderr  # type: ignore[attr-defined]
    assert all(w in lines[0] for w in words), lines[0]
    return str(lines[0])


def colour(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def test_the_demo_map_as_svg_png_and_html(shop: ControlPlane, tmp_path: Path) -> None:
    need_dot()
    for ext in ("svg", "png", "html"):
        proc = graph("-o", str(tmp_path / f"map.{ext}"), plane=shop)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    svg_bytes = (tmp_path / "map.svg").read_bytes()
    svg = read_svg(svg_bytes)
    assert svg.nodes == GROUPS
    assert svg.edges == EDGES
    assert svg.clusters == {"cluster_ns/shop", "cluster_ns/kube-system", "cluster_outside"}
    assert svg.strokes["edge:" + demo.DENIED] == (COLOURS["Denied"], "5,2")  # red and dashed
    assert svg.strokes["edge:" + demo.VIOLATION] == (COLOURS["Violation"], "")
    assert svg.strokes["edge:shop.web-shop.api-8080-tcp"] == (COLOURS["Learned"], "")
    assert "8080/TCP · 17.3 kB" in svg.texts and "9090/TCP · 29.7 kB" in svg.texts and "grpc" in svg.texts

    png = (tmp_path / "map.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 600 and height >= 300, (width, height)
    counts = {rgb: n for n, rgb in Image.open(io.BytesIO(png)).convert("RGB").getcolors(1 << 24)}
    for action in ("Learned", "Violation", "Denied"):
        assert counts.get(colour(COLOURS[action]), 0) > 20, f"no {action} colour in the PNG"
    assert colour(COLOURS["Allowed"]) not in counts

    page = (tmp_path / "map.html").read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page
    assert inline(svg_bytes) in page  # the very same picture, inline: the page needs nothing else


def test_focus_on_a_namespace_and_dot_on_stdout(shop: ControlPlane) -> None:
    need_dot()
    proc = graph("-o", "-", "--namespace", "kube-system", plane=shop)
    assert proc.returncode == 0, proc.stderr
    svg = read_svg(proc.stdout.encode())
    assert svg.nodes == {"kube-system.coredns", "shop.api", "shop.web", "shop.worker"}
    assert svg.edges == Counter({"shop.api->kube-system.coredns": 1, "shop.web->kube-system.coredns": 1,
                                 "shop.worker->kube-system.coredns": 1})


def test_dot_text_needs_no_graphviz(shop: ControlPlane, tmp_path: Path) -> None:
    out = tmp_path / "map.dot"
    proc = graph("-o", str(out), plane=shop, env={**os.environ, "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("digraph flowmap {") and '"shop.web" -> "shop.api"' in out.read_text()


def test_errors_are_one_line_and_exit_code_1(shop: ControlPlane, tmp_path: Path) -> None:
    nowhere = {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing")}
    nowhere.pop("KUBERNETES_SERVICE_HOST", None)
    one_line_error(graph("-o", str(tmp_path / "m.svg"), env=nowhere), "no usable Kubernetes configuration")
    one_line_error(graph("-o", str(tmp_path / "m.jpg"), plane=shop), "cannot tell the format")
    one_line_error(graph("-o", str(tmp_path / "m.svg"), plane=shop, env={**os.environ, "PATH": str(tmp_path)}),
                   "Graphviz's dot is not installed", "apt-get install graphviz")
    assert not (tmp_path / "m.svg").exists()

    # A ServiceAccount without a single permission: RBAC says no, and the line says what is needed.
    shop.kubectl("create", "namespace", "graph-test")
    shop.kubectl("create", "serviceaccount", "nobody", "-n", "graph-test")
    token = shop.kubectl("create", "token", "nobody", "-n", "graph-test").stdout.strip()
    config = json.loads(shop.kubeconfig.read_text())
    config["users"] = [{"name": "nobody", "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = "nobody"
    (tmp_path / "nobody.kubeconfig").write_text(json.dumps(config))
    line = one_line_error(graph("-o", str(tmp_path / "m.svg"), "--kubeconfig", str(tmp_path / "nobody.kubeconfig")),
                          "forbidden", "system:serviceaccount:graph-test:nobody", "get and list")
    assert "groups" in line

    # An API server that is not there.
    server = config["clusters"][0]["cluster"]["server"]
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
    (tmp_path / "gone.kubeconfig").write_text(json.dumps(config))
    one_line_error(graph("-o", str(tmp_path / "m.svg"), "--kubeconfig", str(tmp_path / "gone.kubeconfig")),
                   "cannot reach the API server at https://127.0.0.1:1")
    assert server != "https://127.0.0.1:1"
    one_line_error(graph("-o", str(tmp_path / "m.svg"), "--context", "nope", plane=shop), "nope")


def test_a_cluster_without_the_crds(tmp_path: Path) -> None:
    plane = start(tmp_path, crds=False)
    try:
        one_line_error(graph("-o", str(tmp_path / "m.svg"), plane=plane),
                       "the flowmap CRDs are not installed", "groups.flowmap.dev")
    finally:
        plane.down(quiet=True)


def test_the_command_is_listed_in_flowmap_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "flowmap_cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and re.search(r"^\s+graph\s+a picture of the map", proc.stdout, re.M), proc.stdout
