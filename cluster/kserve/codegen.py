"""Regenerate `kserve_pb2.py` from `kserve.proto`: `python -m moeray.cluster.kserve.codegen`.

A developer tool (needs `grpcio-tools`); nothing imports it at run time. Two choices it makes:

- The proto is compiled as `moeray/cluster/kserve/kserve.proto`, its import path, so the generated
  classes live in module `moeray.cluster.kserve.kserve_pb2`. Pickling a message (Ray Serve pickles
  requests from its proxy to the replicas) records that module name, and the replica must be able
  to import it; compiled as plain `kserve.proto` they would claim a top-level `kserve_pb2`.
- Generated code refuses to import under a protobuf runtime older than the protoc that generated
  it. tritonclient[grpc] pins protobuf < 7, Ray's grpcio-reflection 1.85 wants >= 7.35, so we
  generate with protoc 33.5 (grpcio-tools 1.81), "gencode 6.33.5", which imports on every
  protobuf from 6.33.5 through 7.x. `MAX_GENCODE` makes a newer grpcio-tools fail loudly instead
  of silently raising that floor.
"""

import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
PROTO = HERE / "kserve.proto"
GENERATED = HERE / "kserve_pb2.py"
PROTO_PATH = "moeray/cluster/kserve/kserve.proto"  # the name the descriptor pool knows it by
MAX_GENCODE = (6, 33, 5)  # keep in step with the protobuf floor in pyproject.toml


def compile_proto(out_dir: Path, descriptor_set: bool = False) -> Path:
    """Runs protoc on kserve.proto under its import path; returns the generated module (or the
    serialized FileDescriptorSet when `descriptor_set`)."""
    from grpc_tools import protoc

    root = out_dir / "src"
    (root / PROTO_PATH).parent.mkdir(parents=True)
    shutil.copyfile(PROTO, root / PROTO_PATH)
    out = out_dir / ("kserve.desc" if descriptor_set else "py")
    out_flag = f"--descriptor_set_out={out}" if descriptor_set else f"--python_out={out}"
    if not descriptor_set:
        out.mkdir()
    if protoc.main(["protoc", f"-I{root}", out_flag, str(root / PROTO_PATH)]) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return out if descriptor_set else out / PROTO_PATH.replace(".proto", "_pb2.py")


def gencode_version(source: str) -> tuple[int, int, int]:
    match = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", source, re.M)
    if match is None:
        raise RuntimeError("no 'Protobuf Python Version' line in the generated code")
    return tuple(int(part) for part in match.groups())


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        source = compile_proto(Path(tmp)).read_text()
    version = gencode_version(source)
    if version > MAX_GENCODE:
        print(f"this protoc writes gencode {'.'.join(map(str, version))}, which would need protobuf >= that "
              f"at run time; use grpcio-tools==1.81.1 (gencode {'.'.join(map(str, MAX_GENCODE))})", file=sys.stderr)
        return 1
    GENERATED.write_text(source)
    print(f"wrote {GENERATED} (gencode {'.'.join(map(str, version))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
