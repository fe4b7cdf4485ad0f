"""Generates the gRPC stubs (imagelsh/v1/imagelsh_pb2*.py) from the proto before anything is
built: setuptools looks for the imagelsh.v1 package already when it writes the metadata."""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join("imagelsh", "v1", "imagelsh.proto")
# The repository's proto/ (an in-tree build), or a copy beside this file (an sdist).
PROTO_ROOTS = [os.path.join(HERE, "..", "..", "proto"), os.path.join(HERE, "proto")]


def generate_stubs():
    from grpc_tools import protoc

    root = next((r for r in PROTO_ROOTS if os.path.isfile(os.path.join(r, PROTO))), None)
    if root is None:
        raise RuntimeError(f"{PROTO} not found under any of {PROTO_ROOTS}")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={HERE}", f"--grpc_python_out={HERE}",
            os.path.join(root, PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + os.path.join(root, PROTO))
    # protoc writes modules, not packages.
    open(os.path.join(HERE, "imagelsh", "v1", "__init__.py"), "w").close()


generate_stubs()
setup()
