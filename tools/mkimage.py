"""Build a busybox OCI image archive locally, for `ctr image import`.

No registry is reachable, so the image containerd runs in tests and benchmarks is
made here from the same rootfs as tools.mkbundle.

    python -m tools.mkimage OUT.tar [--ref NAME]
"""

import argparse
import gzip
import hashlib
import io
import os
import tarfile
import tempfile

from tools import oci_image
from tools.mkbundle import build_rootfs

# A local registry name, never pulled: containerd files a name without a domain under a
# public registry's, so the ref keeps a domain of its own.
DEFAULT_REF = "zviz.local/busybox:latest"


def _blob(out: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    info.mtime = 0
    out.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}", len(data)


def _layer(rootfs: str) -> tuple[bytes, str]:
    """A gzip'd layer tar of ROOTFS (reproducible: fixed mtimes and owners) and its diff id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as layer:

        def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        for name in sorted(os.listdir(rootfs)):
            layer.add(os.path.join(rootfs, name), arcname=name, filter=normalize)
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    return gzip.compress(raw.getvalue(), mtime=0), diff_id


def build_image(out_path: str, ref: str = DEFAULT_REF, cmd=("sh",), extra_files=None) -> str:
    """extra_files: {path in the image: bytes} added to the busybox rootfs (a hostile image)."""
    with tempfile.TemporaryDirectory(prefix="zviz-img-") as tmp:
        rootfs = os.path.join(tmp, "rootfs")
        build_rootfs(rootfs)
        for name, data in (extra_files or {}).items():
            with open(os.path.join(rootfs, name.lstrip("/")), "wb") as f:
                f.write(data)
        layer, diff_id = _layer(rootfs)
    with tarfile.open(out_path, "w") as out:
        layer_digest, layer_size = _blob(out, layer)
        config, manifest, layout = oci_image.documents(
            ref=ref,
            cmd=cmd,
            diff_id=diff_id,
            layer_digest=layer_digest,
            layer_size=layer_size,
            layer_media_type=oci_image.LAYER_TAR_GZIP,
        )
        _blob(out, config)
        _blob(out, manifest)
        for name, data in layout.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return ref


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--ref", default=DEFAULT_REF)
    opts = parser.parse_args(argv)
    print(build_image(opts.out, opts.ref))


if __name__ == "__main__":
    main()
