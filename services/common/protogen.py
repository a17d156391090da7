"""Generates the Python gRPC stubs from `protos/` into `services/common/proto/`.

    python -m services.common.protogen          # regenerate
    python -m services.common.protogen --check  # exit 1 if the committed stubs are stale

The stubs are committed so that running Tandem needs no code generation; the test suite runs
`--check`. protoc writes imports as `from tandem.v1 import x_pb2`; they are rewritten to the
package path the stubs live at. grpcio-tools is pinned (pyproject) so output is reproducible.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "services" / "common" / "proto"
PACKAGE_PREFIX = "services.common.proto."


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}",
            *[str(p) for p in protos]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out_root.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        for proto in protos:
            module = ".".join(proto.relative_to(PROTO_ROOT).with_suffix("").parts[:-1])
            text = text.replace(f"from {module} import", f"from {PACKAGE_PREFIX}{module} import")
        path.write_text(text)
        written.append(path)
    for folder in {p.parent for p in written} | {out_root}:
        cur = folder
        while cur != out_root.parent:
            init = cur / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated gRPC stubs (services.common.protogen)."""\n')
            cur = cur.parent
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = ap.parse_args(argv)
    if not args.check:
        for old in OUT_ROOT.rglob("*_pb2*.py*"):
            old.unlink()
        OUT_ROOT.mkdir(parents=True, exist_ok=True)
        generate(OUT_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "proto"
        fresh.mkdir()
        shutil.copy(OUT_ROOT / "__init__.py", fresh / "__init__.py")
        stale: list[str] = []
        for path in generate(fresh):
            committed = OUT_ROOT / path.relative_to(fresh)
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(str(committed.relative_to(ROOT)))
        if stale:
            print("stale or missing stubs (run `python -m services.common.protogen`):\n  "
                  + "\n  ".join(stale), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
