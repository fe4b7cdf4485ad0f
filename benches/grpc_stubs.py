"""Python stubs of imagelsh.v1, generated from proto/ by grpcio-tools for the benchmark scripts."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stubs(work_dir):
    """Generates the stubs under `work_dir`/py and returns (imagelsh_pb2, imagelsh_pb2_grpc)."""
    out = os.path.join(work_dir, "py")
    os.makedirs(out, exist_ok=True)
    from grpc_tools import protoc
    proto = os.path.join(ROOT, "proto")
    assert protoc.main(["protoc", f"-I{proto}", f"--python_out={out}", f"--grpc_python_out={out}",
                        os.path.join(proto, "imagelsh/v1/imagelsh.proto")]) == 0
    sys.path.insert(0, out)
    from imagelsh.v1 import imagelsh_pb2, imagelsh_pb2_grpc
    return imagelsh_pb2, imagelsh_pb2_grpc
