"""The documents of a one-layer OCI image archive (the image-spec's layout), for the two
images tools/ builds: the busybox image (mkimage.py) and the workload suite's Debian
images (debimage.py). One place decides the media types, the platform and the ref."""

import hashlib
import json
import os

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP = LAYER_TAR + "+gzip"
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def documents(
    *, ref: str, cmd, diff_id: str, layer_digest: str, layer_size: int, layer_media_type: str
) -> tuple[bytes, bytes, dict[str, bytes]]:
    """The config and manifest blobs, and the layout's top-level files (oci-layout,
    index.json naming REF) of an image whose one layer is already written."""
    machine = os.uname().machine
    config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine),
        "os": "linux",
        "config": {"Env": [_PATH], "Cmd": list(cmd), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_data = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": _MANIFEST,
        "config": {
            "mediaType": _CONFIG,
            "digest": digest_of(config_data),
            "size": len(config_data),
        },
        "layers": [{"mediaType": layer_media_type, "digest": layer_digest, "size": layer_size}],
    }
    manifest_data = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": _MANIFEST,
                "digest": digest_of(manifest_data),
                "size": len(manifest_data),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    layout = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index).encode(),
    }
    return config_data, manifest_data, layout
