"""The state directory's filesystem full, or read-only, when a container is created: a
clear error naming the cause, and nothing half-made (no state, cgroup or process), and
the next Create after the space is back works. Both for `zviz --root` and for the shim
daemon (ZVIZ_SHIM_ROOT), each on a small tmpfs the test mounts and unmounts."""

import contextlib
import errno
import os
import subprocess
import tempfile

import pytest

from api.gen.containerd.task.v2 import shim_pb2
from api.ttrpc import Code, TtrpcError
from integration.ids import tagged, unique_id
from integration.reliability.harness import (
    NAMESPACE,
    Harness,
    _scenario,
    _wait_gone,
    cgroup_pids,
    plain_bundle,
)
from integration.zviz_cli import Zviz
from shim import config as shim_config


@contextlib.contextmanager
def small_tmpfs(size: str = "1m"):
    directory = tempfile.mkdtemp(prefix=tagged("zrl-state") + "-", dir="/tmp")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0711", "zrl-state", directory],
        check=True,
    )
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", directory], check=False)
        os.rmdir(directory)


def fill(directory: str) -> str:
    """Fill the filesystem to its last byte; returns the filler's path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for size in (1 << 16, 1):  # pages first, then whatever a page left over
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as raised:
            os.write(fd, b"\0")
    finally:
        os.close(fd)  # an open fd would keep the file's pages after the unlink
    assert raised.value.errno == errno.ENOSPC
    return path


def remount(directory: str, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", directory], check=True)


def _files_under(directory: str) -> set[str]:
    found = set()
    for dirpath, dirnames, files in os.walk(directory):
        found.update(os.path.join(dirpath, name) for name in (*dirnames, *files))
    return found


def _no_cgroup(container_id: str) -> bool:
    return not [d for d, _, _ in os.walk("/sys/fs/cgroup") if container_id in d]


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_zviz_create_on_a_failing_state_fs(zviz_bin, make_bundle, fault):
    bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    container_id = unique_id("zviz-rel-statefs")
    with small_tmpfs() as root:
        zviz = Zviz(zviz_bin, os.path.join(root, "state"))
        os.mkdir(zviz.root, 0o700)
        filler = fill(root) if fault == "full" else None
        if fault == "read-only":
            remount(root, "ro")
        before = _files_under(root)
        result = zviz.create(bundle, container_id)
        assert result.returncode != 0
        cause = "No space left on device" if fault == "full" else "Read-only file system"
        # clear: the cause and the file it hit, not a bare OSError
        assert cause in result.stderr and zviz.root in result.stderr, result.stderr
        assert "internal error" not in result.stderr, result.stderr
        assert _files_under(root) == before, "half-made state left"
        assert _no_cgroup(container_id) and cgroup_pids(container_id) == []
        # The space comes back: the same id can be created, and deleted.
        if filler:
            os.unlink(filler)
        else:
            remount(root, "rw")
        created = zviz.create(bundle, container_id)
        assert created.returncode == 0, created.stderr
        assert zviz("delete", "--force", container_id).returncode == 0
        assert _no_cgroup(container_id)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_shim_create_on_a_failing_state_fs(make_bundle, short_root, fault):
    bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    container_id = unique_id("zviz-rel-shimfs")
    with small_tmpfs() as root:
        runtime_root = ""

        async def body(harness: Harness, recorder) -> int:
            nonlocal runtime_root
            harness.start(bundle, container_id)
            shim_pid = (
                await harness.call(
                    "Connect", shim_pb2.ConnectRequest(id=container_id), shim_pb2.ConnectResponse
                )
            ).shim_pid
            runtime_root = shim_config.runtime_root(harness.events_address, NAMESPACE).replace(
                shim_config.STATE_ROOT, root, 1
            )
            filler = fill(root) if fault == "full" else None
            if fault == "read-only":
                remount(root, "ro")
            with pytest.raises(TtrpcError) as raised:
                await harness.call(
                    "Create",
                    shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
                    shim_pb2.CreateTaskResponse,
                )
            cause = "No space left on device" if fault == "full" else "Read-only file system"
            assert cause in raised.value.message and root in raised.value.message, raised.value
            expected = Code.RESOURCE_EXHAUSTED if fault == "full" else Code.FAILED_PRECONDITION
            assert raised.value.code == expected, raised.value
            assert not os.path.exists(os.path.join(runtime_root, container_id))
            assert "internal error" not in raised.value.message
            assert _no_cgroup(container_id) and cgroup_pids(container_id) == []
            if filler:
                os.unlink(filler)
            else:
                remount(root, "rw")
            # not stuck: the daemon serves, and the same id can be created now
            created = await harness.call(
                "Create",
                shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
                shim_pb2.CreateTaskResponse,
            )
            assert created.pid in cgroup_pids(container_id)
            await harness.call("Kill", shim_pb2.KillRequest(id=container_id, signal=9))
            await harness.call("Wait", shim_pb2.WaitRequest(id=container_id), shim_pb2.WaitResponse)
            await harness.call(
                "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
            )
            return shim_pid

        _wait_gone(_scenario(root, body, events_dir=short_root))
        assert _no_cgroup(container_id)
