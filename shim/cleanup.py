"""`delete`: containerd's cleanup of a container whose shim daemon is gone (killed, crashed).

Kills what is left of the container and removes its cgroup and runtime state, unmounts
the rootfs, drops start's reservation, and answers a DeleteResponse on stdout.
"""

import json
import logging
import os
import signal
import time

from runtime import errors
from shim import config as shim_config
from shim import manager, mounts

log = logging.getLogger("shim.cleanup")


def _bundle_state(bundle: str) -> dict:
    try:
        with open(os.path.join(bundle, shim_config.BUNDLE_STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _response(pid: int, exit_status: int) -> bytes:
    from api.gen.containerd.task.v2 import shim_pb2
    from shim.events import timestamp

    return shim_pb2.DeleteResponse(
        pid=pid, exit_status=exit_status, exited_at=timestamp(time.time())
    ).SerializeToString()


def cleanup_dead_container(flags, bundle: str) -> bytes:
    saved = _bundle_state(bundle)
    root = saved.get("root") or shim_config.runtime_root(flags.address, flags.namespace)
    pid = 0
    from runtime.container import Container

    try:
        container = Container.load(root, flags.id)
    except errors.NotFound:
        container = None
    if container is not None:
        pid = container.pid
        try:
            container.delete(force=True)
        except errors.ZvizError as e:
            log.warning("delete %s: %s", flags.id, e)
            raise
    rootfs = mounts.rootfs_path(bundle)
    mounts.unmount_all(rootfs)
    group_dir = saved.get("group_dir")
    if group_dir:
        manager.release(group_dir, flags.id)
        # The dead daemon could not remove its own directory; the last delete does.
        manager.remove_if_dead(group_dir)
    manager.remove_empty_parents(root, stop=shim_config.STATE_ROOT)
    return _response(pid, 128 + signal.SIGKILL)
