"""Regenerate the checked-in protobuf/gRPC modules from pdserve.proto.

    python -m pdserve.proto.generate            # rewrite proto/pdserve_pb2*.py
    python -m pdserve.proto.generate --check    # exit 1 if the checked-in files are stale

Needs grpcio-tools (a test extra). The generated gRPC module imports its messages
by a package-relative import so it works as ``pdserve.proto``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = ("pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    rc = protoc.main(
        ["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
         f"--grpc_python_out={out_dir}", str(HERE / "pdserve.proto")]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    grpc_file = out_dir / "pdserve_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace("import pdserve_pb2 as", "from . import pdserve_pb2 as"))


def stale_files() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [n for n in OUTPUTS if (Path(tmp) / n).read_text() != (HERE / n).read_text()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated files: {stale}; run python -m pdserve.proto.generate", file=sys.stderr)
            return 1
        return 0
    generate(HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
