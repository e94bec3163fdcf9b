"""Nothing a container mounts may appear in the host's mount namespace (issue 10, item 6).

A bind source or a bundle rootfs that sits on a shared mount (systemd makes "/" shared)
is cloned by open_tree into the host's peer group: every mount the container then
makes beneath it (proc, sysfs, /dev, cgroups, a tmpfs nested in a volume) propagates
back to the host, and a tmpfs nested in a volume even stays there after the container
exited. A shared rootfs also makes pivot_root refuse (EINVAL); zviz must then refuse,
never fall back to chroot behind a warning.

Each test makes its own shared mount point under a temp dir (`mount --bind X X;
mount --make-shared X`) and removes it.
"""

import os
import shutil
import subprocess
import tempfile
import time

import pytest

from integration.ids import tagged, unique_id
from integration.zviz_cli import edit_config
from tools.mkbundle import build_bundle


def _mountpoints_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sorted(p for p in points if p == path or p.startswith(path + "/"))


@pytest.fixture
def shared_dir():
    """A temp dir that is its own shared mount (a peer group of one on the host)."""
    base = tempfile.mkdtemp(prefix=tagged("zviz-audit-shared") + "-")
    os.chmod(base, 0o755)  # the mapped container root must reach the bundle
    subprocess.run(["mount", "--bind", base, base], check=True)
    try:
        subprocess.run(["mount", "--make-shared", base], check=True)
        yield base
    finally:
        # Anything a container leaked goes too (-R: nested mounts first).
        subprocess.run(["umount", "-R", "-l", base], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_nothing_a_container_mounts_reaches_the_host(zviz_bin, shared_dir):
    volume = os.path.join(shared_dir, "volume")
    os.makedirs(os.path.join(volume, "sub"))
    os.chmod(volume, 0o777)
    bundle = os.path.join(shared_dir, "bundle")
    build_bundle(bundle, args=["/bin/sh", "-c", "grep -q ' /data/sub ' /proc/self/mountinfo"
                               " && echo NESTED; sleep 2"])  # fmt: skip

    def add_nested_volume(config):
        config["mounts"] += [
            {"destination": "/data", "type": "bind", "source": volume, "options": ["rbind", "rw"]},
            {"destination": "/data/sub", "type": "tmpfs", "source": "tmpfs", "options": []},
        ]

    edit_config(bundle, add_nested_volume)
    os.makedirs(os.path.join(bundle, "rootfs", "data"))
    before = _mountpoints_under(shared_dir)
    assert before == [shared_dir]
    cid = unique_id("zviz-audit-leak")
    root = os.path.join(shared_dir, "state")
    process = subprocess.Popen(
        [zviz_bin, "--root", root, "run", "--bundle", bundle, cid],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    during = []
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            during = sorted(set(during) | set(_mountpoints_under(shared_dir)))
            time.sleep(0.05)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        subprocess.run([zviz_bin, "--root", root, "delete", "-f", cid], capture_output=True)
    after = _mountpoints_under(shared_dir)
    assert process.returncode == 0, stderr
    assert "NESTED" in stdout, stdout  # the nested tmpfs was there, inside
    assert during == before, f"container mounts seen on the host while it ran: {during}"
    assert after == before, f"container mounts left on the host after it exited: {after}"
    assert "chroot" not in stderr and "pivot_root" not in stderr, stderr


def test_a_refused_pivot_root_is_an_error_never_a_chroot(zviz_bin, tmp_path):
    # A createContainer hook runs in the container's mount namespace with the rootfs
    # as its cwd, just before pivot_root: making that mount shared there gets the
    # kernel's EINVAL for real. The container must not start under chroot instead.
    base = tempfile.mkdtemp(prefix=tagged("zviz-audit-pivot") + "-")
    os.chmod(base, 0o755)
    try:
        bundle = build_bundle(os.path.join(base, "bundle"), args=["/bin/echo", "STARTED"])
        hook = {"path": "/bin/sh", "args": ["sh", "-c", "mount --make-shared ."]}
        edit_config(bundle, lambda config: config.update(hooks={"createContainer": [hook]}))
        cid = unique_id("zviz-audit-pivot")
        root = os.path.join(base, "state")
        try:
            result = subprocess.run(
                [zviz_bin, "--root", root, "run", "--bundle", bundle, cid],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            subprocess.run([zviz_bin, "--root", root, "delete", "-f", cid], capture_output=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert "STARTED" not in result.stdout, (result.stdout, result.stderr)
    assert result.returncode != 0
    assert "pivot_root refused" in result.stderr and "--no-pivot" in result.stderr, result.stderr
