"""`delete`: containerd's cleanup after a shim connection closes.

containerd runs `<shim> delete` every time a shim connection closes, also after a normal
Delete and Shutdown, and `ctr run --rm` waits for it. So the common case (the daemon
already deleted everything) is a fast path: standard library only, no protobuf, no
runtime core. Only when the runtime state shows a container the daemon left behind
(it was killed, or crashed) is the runtime core loaded to kill and remove it.

The answer is a protobuf DeleteResponse on stdout.
"""

import os
import time
from _signal import SIGKILL  # the C module: `signal` imports enum

from shim import config as shim_config
from shim import manager, wire


def _bundle_state(bundle: str) -> dict:
    return shim_config.read_bundle_state(os.path.join(bundle, shim_config.BUNDLE_STATE_FILE))


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def cleanup_dead_container(flags, bundle: str) -> bytes:
    saved = _bundle_state(bundle)
    root = saved.get("root") or shim_config.runtime_root(flags.address, flags.namespace)
    pid = 0
    if os.path.exists(os.path.join(root, flags.id)):
        from shim import engine

        pid = engine.delete_leftover(root, flags.id)
    rootfs = os.path.join(bundle, "rootfs")
    if _mounted(rootfs):
        from shim import mounts

        mounts.unmount_all(rootfs)
    group_dir = saved.get("group_dir")
    if group_dir:
        manager.release(group_dir, flags.id)
        # A dead daemon could not remove its own directory; its last container's delete does.
        manager.remove_if_dead(group_dir)
        manager.tidy_state_root(os.path.dirname(group_dir))
    return encode_delete_response(pid, 128 + SIGKILL, time.time())


def encode_delete_response(pid: int, exit_status: int, exited_at: float) -> bytes:
    """containerd.task.v2.DeleteResponse{pid=1, exit_status=2, exited_at=3 Timestamp{seconds=1,
    nanos=2}}."""
    seconds = int(exited_at)
    nanos = int((exited_at - seconds) * 1e9)
    timestamp = wire.field_varint(1, seconds) + wire.field_varint(2, nanos)
    return (
        wire.field_varint(1, pid)
        + wire.field_varint(2, exit_status)
        + wire.field_bytes(3, timestamp)
    )
