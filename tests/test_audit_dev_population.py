"""Devices from linux.devices must be made inside the rootfs, never by a path walk
that a swapped symlink can redirect (issue 10, suspicion: "/dev population uses path
calls while the root is still the host's").

Before pivot_root, PID 1's root is the host's: `_create_device` resolved the device's
path inside the rootfs (`secure_join`) and then used it by path (makedirs, unlink,
open O_CREAT, mknod, mount). A volume shared with another container can change in
between (the window the mount code already closes with pinned fds): a directory
swapped for a symlink to a host directory sent the unlink and the mknod there. The
test widens that window deterministically, as tests/test_audit_mount_race.py does.
"""

import os

import pytest

from runtime import errors
from runtime.rootfs import RootfsBuilder
from runtime.spec import Device
from tests.privileges import mounts_in_own_namespace
from tests.recording_syscall import RecordingSyscall
from tests.test_audit_mount_race import (
    _builder,
    _in_private_mount_namespace,
    _swap_for_a_symlink_once_resolved,
)


def test_device_parent_swapped_for_a_symlink_never_touches_the_host(tmp_path, monkeypatch):
    """Without root: the mknod is recorded (tests/recording_syscall.py), the parent's
    refusal is the kernel's (O_NOFOLLOW, openat2 RESOLVE_NO_SYMLINKS)."""
    bundle = tmp_path / "bundle"
    root = bundle / "rootfs"
    (root / "vol" / "sub").mkdir(parents=True)
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "victim").write_text("host file\n")
    device = Device(path="/vol/sub/victim", type="p")
    _swap_for_a_symlink_once_resolved(monkeypatch, device.path, host_dir)
    monkeypatch.chdir(root)
    recorder = RecordingSyscall(root)
    builder = RootfsBuilder(
        None,
        bundle=str(bundle),
        cgroup_paths={},
        no_pivot=False,
        in_userns=False,
        new_netns=False,
        log=lambda *a, **k: None,
        syscall=recorder,
    )
    with pytest.raises(errors.ZvizError, match="/vol/sub/victim"):
        builder._create_device(device)
    victim = host_dir / "victim"
    assert victim.is_file() and victim.read_text() == "host file\n"
    assert sorted(os.listdir(host_dir)) == ["victim"]
    assert not recorder.named("mknod", "mount")


@mounts_in_own_namespace
def test_devices_still_land_in_the_rootfs(tmp_path):
    bundle = tmp_path / "bundle"
    root = bundle / "rootfs"
    (root / "dev").mkdir(parents=True)

    def body():
        os.chdir(root)
        builder = _builder(str(bundle))
        builder._create_device(Device(path="/dev/fifo", type="p"))
        builder._create_device(Device(path="/dev/sub/null", type="c", major=1, minor=3))
        fifo = os.lstat(root / "dev" / "fifo")
        null = os.stat(root / "dev" / "sub" / "null")
        return {
            "fifo": oct(fifo.st_mode >> 12),
            "null": [os.major(null.st_rdev), os.minor(null.st_rdev)],
        }

    assert _in_private_mount_namespace(body) == {"fifo": "0o1", "null": [1, 3]}
