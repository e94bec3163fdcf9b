"""The namespace child: the first process forked by the parent (runtime/spawn/parent.py).

PDEATHSIG, joins the cgroup itself (so every descendant is in it), joins the namespaces
given by path, unshares the user namespace (the parent writes uid_map/gid_map and
answers "mapped"), unshares the rest, forks PID 1 (runtime/spawn/init.py), reports its
pid and exits. PID 1 is then reparented to the nearest subreaper: `zviz run` itself, or
containerd's shim under `zviz create` (no monitor in between).

Everything here runs after fork and leaves only through os._exit.
"""

import os
import signal

from runtime import denials, errors, idmap, linux
from runtime.idmap import (
    host_id_of_root,
)
from runtime.spawn.common import Request, Stages, close_inherited_fds, preload, run_child
from runtime.spawn.init import run_init
from runtime.sync import Sync


def run_namespace_child(request: Request, sync: Sync, flags: int, join_fds, new_user: bool) -> None:
    stages = Stages()
    spec = request.spec
    preload(request, stages)
    with stages("fds"):
        close_inherited_fds(
            request,
            sync,
            extra=[fd for _, fd in join_fds]
            + [fd for fd in request.bind_source_fds if fd is not None],
        )
    with stages("prctl"):
        linux.set_pdeathsig(signal.SIGKILL)
    if request.cgroup is not None and request.cgroup.cheap_self_join:
        with stages("cgroup"):
            # As host root, before any namespace: PID 1 is then forked inside.
            request.cgroup.join_self()
    with stages("rootfs"):
        # While still host root: the container's root may not be able to walk there.
        try:
            os.chdir(spec.root.path)
        except (FileNotFoundError, NotADirectoryError):
            raise errors.field_error("root.path", f"{spec.root.path} is not a directory") from None
    if denials.enabled():
        with stages("audit session"):
            # While host root in the initial user namespace (after it, no one in the
            # container can change it): the kernel's denial records name this session.
            denials.start_session(host_id_of_container_root(spec))
    with stages("namespaces"):
        for ns_type, fd in join_fds:
            linux.setns(fd, linux.NAMESPACE_FLAGS[ns_type])
            os.close(fd)
    if new_user or any(ns_type == "user" for ns_type, _ in join_fds):
        with stages("user namespace"):
            if new_user:
                linux.unshare(linux.CLONE_NEWUSER)
            sync.send("userns")  # the parent writes the id maps or checks the joined ones
            message, fds = sync.recv_fds(1)
            if message is None or message.get("type") != "mapped":
                raise errors.FailedPrecondition(f"expected 'mapped', got {message!r}")
            request.rootfs_mount_fd = fds[0] if fds else None
            _become_root_in_userns()
    with stages("namespaces"):
        # The cgroup namespace waits for PID 1 to be in its cgroup (see run_init).
        if flags & ~linux.CLONE_NEWCGROUP:
            linux.unshare(flags & ~linux.CLONE_NEWCGROUP)
    with stages("fork"):
        pid1 = os.fork()
    if pid1 == 0:
        in_userns = new_user or any(t == "user" for t, _ in join_fds)
        run_child(sync, lambda: run_init(request, sync, stages, in_userns=in_userns))
    sync.send("pid", pid=pid1)


def host_id_of_container_root(spec) -> int:
    """The container's audit login uid: its root's host uid (0 without a user namespace)."""
    ranges = ((m.container_id, m.host_id, m.size) for m in spec.linux.uid_mappings)
    host = idmap.host_id_in(ranges, 0)
    return 0 if host is None else host


def _become_root_in_userns() -> None:
    uid_mapped = host_id_of_root(os.getpid(), "uid_map") is not None
    gid_mapped = host_id_of_root(os.getpid(), "gid_map") is not None
    if gid_mapped:
        os.setresgid(0, 0, 0)
        os.setgroups([])
    if uid_mapped:
        os.setresuid(0, 0, 0)
