"""Debian images for the workload suite (integration/workloads/), built here from Debian
packages and cached: no registry is reachable, and none is needed.

Each image is `debootstrap --variant=minbase` of the host's Debian release plus its
packages (apt-get in the new root, from the mirror debootstrap and apt choose by default),
written as an OCI image archive for `ctr images import`. The archive is cached under
/var/cache/zviz-tools/images, keyed by the release, the package list and this builder's
format version: a machine builds each image once, every later run imports the cached file.
A lock per image lets concurrent sessions wait for one build instead of racing.

    python3 -m tools.debimage [NAME...]    # build (or find cached) images; all without NAME

Standard library only: `make images` runs before the venv exists. A build that fails
raises with the failing command's output: the suite never skips for a failed build.
"""

import argparse
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass

from tools import oci_image

CACHE_ROOT = os.environ.get("ZVIZ_TOOLS_CACHE", "/var/cache/zviz-tools")
IMAGE_CACHE = os.path.join(CACHE_ROOT, "images")
# Changing how an archive is laid out changes every key, so old archives are rebuilt.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DebianImage:
    name: str
    packages: tuple[str, ...]

    def key(self, release: str) -> str:
        material = json.dumps([FORMAT_VERSION, release, sorted(self.packages)])
        return hashlib.sha256(material.encode()).hexdigest()[:16]

    def ref(self, release: str) -> str:
        # A domain of its own: containerd files a bare name under a public registry's.
        return f"zviz.local/wl-{self.name}:{release}-{self.key(release)}"

    def archive(self, release: str) -> str:
        return os.path.join(IMAGE_CACHE, f"{self.name}-{release}-{self.key(release)}.tar")


IMAGES = {
    image.name: image
    for image in (
        DebianImage("nginx", ("nginx-light",)),
        DebianImage("redis", ("redis-server", "redis-tools")),
        DebianImage("python", ("python3",)),
        DebianImage("node", ("nodejs",)),
        # pgbench ships in the server package since PostgreSQL 10.
        DebianImage("postgres", ("postgresql", "procps")),
        # pip and npm install from registries served by other containers (the suite's
        # CI job); apt-get is in every image.
        DebianImage(
            "ci",
            ("git", "gcc", "libc6-dev", "make", "python3-pytest", "python3-pip", "nodejs", "npm"),
        ),
    )
}

# Paths left out of the layer: runtimes mount /dev, /proc and /sys; apt's downloads and
# lists only cost space. Each is kept as an empty directory.
EMPTIED = ("dev", "proc", "sys", "var/cache/apt/archives", "var/lib/apt/lists")


def host_release() -> str:
    """The host's Debian codename: the images match the machine's own packages."""
    with open("/etc/os-release") as f:
        fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    release = fields.get("VERSION_CODENAME", "").strip('"')
    if not release:
        raise RuntimeError("/etc/os-release names no VERSION_CODENAME (not Debian?)")
    return release


def _run(cmd: list[str], log) -> None:
    log.write(f"$ {' '.join(cmd)}\n".encode())
    log.flush()
    result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {result.returncode}")


def _build_rootfs(image: DebianImage, release: str, rootfs: str, log) -> None:
    if not shutil.which("debootstrap"):
        raise RuntimeError("debootstrap missing: `make deps` installs it")
    apt_cache = os.path.join(IMAGE_CACHE, "debs")
    os.makedirs(apt_cache, exist_ok=True)
    # A mount namespace of its own: whatever debootstrap mounts in the new root (/proc,
    # /sys) goes away with it, even when it fails half way.
    unshare = ["unshare", "--mount", "--propagation", "private"]
    _run(
        [*unshare, "debootstrap", "--variant=minbase", f"--cache-dir={apt_cache}", release, rootfs],
        log,
    )
    # No service starts from a maintainer script while the packages are installed here
    # (nginx and PostgreSQL would start on the host's network, outside any container).
    policy = os.path.join(rootfs, "usr/sbin/policy-rc.d")
    with open(policy, "w") as f:
        f.write("#!/bin/sh\nexit 101\n")
    os.chmod(policy, 0o755)
    env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C"]
    in_root = [*unshare, "--pid", "--fork", "chroot", rootfs, "sh", "-ec"]
    script = (
        "mount -t proc proc /proc; "
        f"{' '.join(env_cmd)} apt-get -o Acquire::Retries=3 update -qq; "
        f"{' '.join(env_cmd)} apt-get install -y -qq --no-install-recommends "
        f"{' '.join(image.packages)}; "
        "apt-get clean; umount /proc"
    )
    _run([*in_root, script], log)
    os.unlink(policy)


def _add_bytes(out: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    out.addfile(info, io.BytesIO(data))


def _file_digest(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest(), os.path.getsize(path)


def _write_archive(rootfs: str, ref: str, work: str, out_path: str) -> None:
    """An OCI image archive of ROOTFS as one uncompressed layer (GNU tar keeps owners,
    modes, hard links and capabilities as debootstrap made them)."""
    layer_path = os.path.join(work, "layer.tar")
    excludes = [f"--exclude=./{path}/*" for path in EMPTIED]
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=security.capability",
         "-C", rootfs, *excludes, "-cf", layer_path, "."],
        check=True,
    )  # fmt: skip
    layer_digest, layer_size = _file_digest(layer_path)
    config, manifest, layout = oci_image.documents(
        ref=ref,
        cmd=["bash"],
        diff_id=layer_digest,  # uncompressed: the layer's digest is its diff id
        layer_digest=layer_digest,
        layer_size=layer_size,
        layer_media_type=oci_image.LAYER_TAR,
    )
    with tarfile.open(out_path, "w") as out:
        out.add(layer_path, arcname=f"blobs/sha256/{layer_digest.split(':')[1]}")
        for data in (config, manifest):
            _add_bytes(out, "blobs/sha256/" + oci_image.digest_of(data).split(":")[1], data)
        for name, data in layout.items():
            _add_bytes(out, name, data)


def ensure(name: str, release: str | None = None) -> tuple[str, str]:
    """The cached archive of image NAME and its ref, built first when missing."""
    image = IMAGES[name]
    release = release or host_release()
    archive = image.archive(release)
    os.makedirs(IMAGE_CACHE, exist_ok=True)
    with open(archive + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session building it: wait, then reuse
        if not os.path.exists(archive):
            _build(image, release, archive)
    return archive, image.ref(release)


def _build(image: DebianImage, release: str, archive: str) -> None:
    log_path = archive + ".log"
    print(f"building image {image.name} ({release}: {' '.join(image.packages)})", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"build-{image.name}-", dir=IMAGE_CACHE) as work:
        rootfs = os.path.join(work, "rootfs")
        try:
            with open(log_path, "wb") as log:
                _build_rootfs(image, release, rootfs, log)
            partial = os.path.join(work, "image.tar")
            _write_archive(rootfs, image.ref(release), work, partial)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
            with open(log_path, "rb") as f:
                tail = f.read()[-4000:].decode(errors="replace")
            raise RuntimeError(
                f"building image {image.name} failed: {error}\n(log {log_path}):\n{tail}"
            ) from error
        os.rename(partial, archive)  # complete or absent: never a half-written archive


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(IMAGES))
    opts = parser.parse_args(argv)
    unknown = set(opts.names) - set(IMAGES)
    if unknown:
        parser.error(f"unknown image {', '.join(sorted(unknown))}; known: {', '.join(IMAGES)}")
    for name in opts.names or IMAGES:
        archive, ref = ensure(name)
        print(f"{ref} {archive}")


if __name__ == "__main__":
    sys.exit(main())
