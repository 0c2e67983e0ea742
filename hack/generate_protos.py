#!/usr/bin/env python3
"""Regenerate the Python code of every .proto in the repository (`make proto`).

Each proto lives inside the package that imports it (api/flowmap_api/report.proto,
dp/flowmap_dp/wire.proto), so the component folder is the include root and the generated
imports read ``flowmap_api.report_pb2``. ``--out DIR`` writes elsewhere: the drift test compares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
# include root -> (proto relative to it, also generate gRPC stubs?)
PROTOS = {"api": [("flowmap_api/report.proto", True)], "dp": [("flowmap_dp/wire.proto", False)]}


def generate(out: Path | None = None) -> list[Path]:
    """Generate into the repository (or under ``out``, mirroring it); return the files written."""
    written = []
    for root, protos in PROTOS.items():
        target = (out / root) if out else (REPO / root)
        for proto, with_grpc in protos:
            (target / Path(proto).parent).mkdir(parents=True, exist_ok=True)
            args = ["protoc", f"-I{REPO / root}", f"--python_out={target}", f"--pyi_out={target}"]
            if with_grpc:
                args.append(f"--grpc_python_out={target}")
            if protoc.main([*args, str(REPO / root / proto)]) != 0:
                raise SystemExit(f"protoc failed on {root}/{proto}")
            stem = target / proto.removesuffix(".proto")
            written += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi")]
            if with_grpc:
                written.append(Path(f"{stem}_pb2_grpc.py"))
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    for path in generate(parser.parse_args().out):
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path, file=sys.stderr)
