"""The CRI client the tests and the pod benchmark speak to containerd's CRI plugin with.

integration/cri/api.proto (the part of k8s.io/cri-api runtime.v1 used here) compiled
at run time with grpcio-tools into grpclib stubs: (api_pb2, api_grpc). Here rather than
in integration/ so that bench/ uses the same client without the tests' fixtures.
"""

import importlib
import os
import sys

from tools.containerd import VENV_BIN
from tools.mkimage import DEFAULT_REF, build_image

PROTO_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integration", "cri"
)
# The pods' sandbox ("pause") image: built here, a busybox that sleeps (no registry is asked).
PAUSE_IMAGE = "zviz.local/pause:latest"


def compile_cri(out_dir: str):
    """api.proto compiled into OUT_DIR: its (messages, grpclib stubs) modules."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--plugin=protoc-gen-grpclib_python={VENV_BIN}/protoc-gen-grpclib_python",
        f"--grpclib_python_out={out_dir}",
        "api.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR}/api.proto")
    sys.path.insert(0, out_dir)
    try:
        return importlib.import_module("api_pb2"), importlib.import_module("api_grpc")
    finally:
        sys.path.remove(out_dir)


def build_pod_images(directory: str) -> list[str]:
    """The archives a CRI node imports into k8s.io: the sandbox image and busybox (DEFAULT_REF)."""
    pause = os.path.join(directory, "pause.tar")
    busybox = os.path.join(directory, "busybox.tar")
    build_image(pause, PAUSE_IMAGE, cmd=("sleep", "2147483647"))
    build_image(busybox, DEFAULT_REF)
    return [pause, busybox]
