"""The parent's side of a spawn: what runs in the runtime process (zviz, or the shim).

    zviz (parent) ──fork──▶ namespace child ──fork──▶ PID 1 ──execve──▶ workload
                   sync socket shared by child and PID 1 (runtime/sync.py,
                   messages declared in runtime/spawn/messages.py)

The parent opens the namespaces to join and the bind sources, forks the namespace child
(runtime/spawn/namespace_child.py), answers it (id maps, the cgroup join, the runtime's
hooks) and waits for PID 1's "ready"; on any error it kills and reaps every process
started. It then sends "start" (`zviz run`, no fifo round trip) or "ack" (`zviz create`:
PID 1 waits for `zviz start` to open the exec fifo). An exec (runtime/spawn/exec.py)
goes the same way with its own child.
"""

import errno
import os
import signal

from runtime import errors, hooks, linux, state
from runtime.idmap import (
    check_joined_user_namespace,
    idmap_requested_mounts,
    idmap_volumes,
    idmapped_rootfs,
    read_only_volumes,
    requested_idmap_mounts,
)
from runtime.rootfs import open_bind_sources
from runtime.spawn.common import Request, close_all, import_child_modules, run_child
from runtime.spawn.exec import run_exec_child
from runtime.spawn.init import DEFAULT_UMASK
from runtime.spawn.namespace_child import run_namespace_child
from runtime.sync import Sync

# Join order for namespaces given by path (their fds are opened beforehand). The user
# namespace last: until then we are host root, who may enter any namespace, while the
# container's root may not enter one owned by another user namespace (a Kubernetes
# pod's IPC, UTS and network namespaces belong to its sandbox's). Mount after the rest.
_JOIN_ORDER = ("ipc", "uts", "network", "pid", "cgroup", "time", "mount", "user")


# How long the parent waits for each message from the processes it spawned, before it
# kills them: a child stuck in the kernel (a hung FUSE or NFS lookup in a volume)
# must not hang zviz, or the shim that serves every other container, forever. The
# OCI hooks that run meanwhile add their own timeouts (or this much, when they have
# none).
SETUP_MESSAGE_TIMEOUT = 60.0


class Spawned:
    """PID 1 (or an exec'd process) after it reported ready; the sync end still open."""

    def __init__(self, pid: int, sync: Sync):
        self.pid = pid
        self.sync = sync
        # The startContainer hooks it runs after "start" (PID 1's; None for an exec).
        self.hooks: dict | None = None
        stat = state.proc_stat(pid)
        self.start_time = stat.start_time if stat else None


def new_namespace_flags(spec) -> tuple[int, list[tuple[str, str]], bool]:
    """(flags to unshare except user, [(type, path) to join], new user namespace?)."""
    flags, joins, new_user = 0, [], False
    for ns in spec.linux.namespaces or ():
        if ns.type not in linux.NAMESPACE_FLAGS:
            raise errors.field_error("linux.namespaces", f"unknown namespace type {ns.type!r}")
        if ns.path:
            joins.append((ns.type, ns.path))
        elif ns.type == "user":
            new_user = True
        else:
            flags |= linux.NAMESPACE_FLAGS[ns.type]
    joins.sort(key=lambda item: _JOIN_ORDER.index(item[0]) if item[0] in _JOIN_ORDER else 99)
    return flags, joins, new_user


def _fork_child(fds_for_child: list[int], child_main) -> tuple[int, Sync]:
    """Fork a child that runs child_main(its sync end) and never returns; the parent keeps
    the other end. `fds_for_child` are the child's to use: the parent closes its copies."""
    import_child_modules()
    parent_end, child_end = Sync.pair()
    try:
        child = os.fork()
    except BaseException:
        parent_end.close()
        child_end.close()
        close_all(fds_for_child)
        raise
    if child == 0:
        # Per process, so only the child's: whatever it and PID 1 make in the container
        # (mount points, /dev, the cgroup mount points) is made as under umask 0022,
        # never the caller's (0027 leaves them unsearchable by the container's root, a
        # mapped uid). The workload's own comes later (init.workload_umask).
        os.umask(DEFAULT_UMASK)
        parent_end.close()
        run_child(child_end, lambda: child_main(child_end))
    child_end.close()
    close_all(fds_for_child)
    return child, parent_end


def spawn_init(request: Request, log) -> Spawned:
    """Fork the container's processes; returns once PID 1 reported ready.

    On any error every process started here is killed and reaped, and the error is
    raised as a ZvizError. The caller then sends "start" (run) or "ack" (create).
    """
    spec = request.spec
    flags, joins, new_user = new_namespace_flags(spec)
    join_fds = []
    volumes_to_map: list[tuple[str, int]] = []
    try:
        for ns_type, path in joins:
            join_fds.append((ns_type, _open_ns(ns_type, path)))
        if new_user:
            owner = _foreign_owner(join_fds)
            if owner is None:
                _refuse_host_owned_joins(join_fds, request.profile, spec)
            if owner is not None:
                # A pod's containers share their sandbox's user namespace: a namespace
                # owned by another user namespace is usable only from inside that one
                # (proc of a shared pid namespace cannot be mounted from a fresh one).
                join_fds.append(("user", owner))
                new_user = False
        request.bind_source_fds = open_bind_sources(spec.mounts, request.bundle)
        # The parent's own handles on the read-only volumes it id-maps once the user
        # namespace exists: the fds themselves go to the child (closed here by the fork).
        volumes_to_map = read_only_volumes(spec, request.bind_source_fds, request.profile)
        # And those config.json asks to be id-mapped (a hostUsers: false pod's).
        mounts_to_map = requested_idmap_mounts(spec, request.bind_source_fds)
    except BaseException:
        close_all(fd for _, fd in join_fds)
        close_all(fd for fd in request.bind_source_fds if fd is not None)
        close_all(fd for _, fd in volumes_to_map)
        raise
    try:
        return _spawn_init(request, log, flags, join_fds, new_user, volumes_to_map, mounts_to_map)
    finally:
        close_all(fd for _, fd in volumes_to_map + mounts_to_map)


def _spawn_init(
    request: Request, log, flags, join_fds, new_user, volumes_to_map, mounts_to_map
) -> Spawned:
    spec = request.spec
    child, parent_end = _fork_child(
        [fd for _, fd in join_fds] + [fd for fd in request.bind_source_fds if fd is not None],
        lambda child_end: run_namespace_child(request, child_end, flags, join_fds, new_user),
    )

    def on_message(kind: str, message: dict, pid1: int | None) -> None:
        if kind == "userns":
            if new_user:
                write_id_maps(child, spec.linux.uid_mappings, spec.linux.gid_mappings)
            else:
                check_joined_user_namespace(child, request.profile, spec.linux)
            rootfs_fd = idmapped_rootfs(child, spec, log)
            idmap_volumes(child, volumes_to_map, log)
            idmap_requested_mounts(child, mounts_to_map)
            if rootfs_fd is None:
                parent_end.send("mapped")
            else:
                try:
                    parent_end.send_fds("mapped", [rootfs_fd], idmapped=True)
                finally:
                    os.close(rootfs_fd)
        elif kind == "pid":
            # PID 1 builds its rootfs meanwhile and waits for "joined" before
            # anything can fork or run (prepare_join made this quicker).
            if request.cgroup is not None and not request.cgroup.cheap_self_join:
                request.cgroup.add_pid(pid1)
            joined = {}
            if spec.hooks:  # PID 1 runs createContainer and startContainer with it
                joined["state"] = hooks.state(request.hook_state, "creating", pid1)
            try:
                parent_end.send("joined", **joined)
            except BrokenPipeError:
                pass  # PID 1 already failed: its error is queued for the next recv
        elif kind == "hooks":
            for hook_kind in hooks.RUNTIME_HOOKS:
                hooks.run(hook_kind, spec.hooks, hooks.state(request.hook_state, "creating", pid1))
            parent_end.send("hooked")

    spawned = _until_ready(
        child,
        parent_end,
        "container init",
        spec.process.oom_score_adj,
        log,
        on_message,
        timeout=setup_timeout(spec.hooks, hooks.CONTAINER_HOOKS),
    )
    spawned.hooks = spec.hooks
    return spawned


def setup_timeout(spec_hooks, kinds) -> float:
    """SETUP_MESSAGE_TIMEOUT plus what the hooks of `kinds`, run meanwhile, may take."""
    total = SETUP_MESSAGE_TIMEOUT
    for kind in kinds:
        for hook in (spec_hooks or {}).get(kind) or ():
            declared = hook.get("timeout") if isinstance(hook, dict) else None
            total += declared if declared and declared > 0 else SETUP_MESSAGE_TIMEOUT
    return total


def spawn_exec(request: Request, init_pid: int, process, log) -> Spawned:
    """Fork a process that joins the namespaces and cgroup of `init_pid`.

    `process` is the OCI process (same shape as spec.process). Returns once the
    process reported ready; the caller then sends "start".
    """
    ns_fds = []
    for ns_type in _JOIN_ORDER:
        proc_name = linux.NAMESPACE_PROC_NAMES[ns_type]
        theirs = f"/proc/{init_pid}/ns/{proc_name}"
        try:
            if os.stat(theirs).st_ino == os.stat(f"/proc/self/ns/{proc_name}").st_ino:
                continue
        except FileNotFoundError:
            continue
        ns_fds.append((ns_type, _open_ns(ns_type, theirs)))
    child, parent_end = _fork_child(
        [fd for _, fd in ns_fds],
        lambda child_end: run_exec_child(request, child_end, ns_fds, process),
    )

    def on_message(kind, message, _pid):
        if kind == "anchor-unanswered":
            from runtime import exec_anchor

            raise exec_anchor.Unanswered(message["why"])

    return _until_ready(child, parent_end, "exec: process", process.oom_score_adj, log, on_message)


def _until_ready(
    child: int,
    parent_end,
    what: str,
    oom_score_adj,
    log,
    on_message=None,
    timeout: float = SETUP_MESSAGE_TIMEOUT,
):
    """The parent's side of a spawn, until the new process reports ready.

    The namespace child reports the process's pid and is reaped; the process's logs are
    passed on; on_message(kind, message, pid) handles the rest. On any error (a child's
    report, EOF, no message within `timeout` seconds, an exception here) every process
    started is killed and reaped.
    """
    pid = None
    ready = False
    try:
        while True:
            message = parent_end.recv(timeout=timeout)
            if message is None:
                raise errors.FailedPrecondition(f"{what} exited during setup without a report")
            kind = message["type"]
            if kind == "pid":
                pid = message["pid"]
                _reap(child)
                child = None
                set_oom_score_adj(pid, oom_score_adj)
            elif kind == "log":
                log(message.get("level", "info"), message.get("msg", ""))
            elif kind == "ready":
                ready = True
            elif kind == "error":
                from runtime.sync import error_from_message

                raise error_from_message(message)
            if on_message is not None:
                on_message(kind, message, pid)
            if ready and pid is not None:
                return Spawned(pid, parent_end)
    except BaseException:
        parent_end.close()
        if child is not None:
            _kill_and_reap(child)
        if pid is not None:
            _kill(pid)
        raise


def wait_exec_result(spawned: Spawned) -> None:
    """After "start": EOF means execve succeeded; an error message means it did not.

    A process that neither execs nor reports within the timeout is killed.
    """
    timeout = setup_timeout(spawned.hooks, ("startContainer",))
    try:
        message = spawned.sync.recv(timeout=timeout)
        while message is not None and message["type"] == "log":
            message = spawned.sync.recv(timeout=timeout)
    except errors.FailedPrecondition:
        _kill(spawned.pid)
        raise
    finally:
        spawned.sync.close()
    if message is not None and message["type"] == "error":
        from runtime.sync import error_from_message

        raise error_from_message(message)


# Namespaces a container cannot set up from a user namespace that does not own them: its
# rootfs is mounted in the mount namespace, its /proc belongs to the pid namespace.
_NEEDS_OWNERSHIP = ("mount", "pid")


def _refuse_host_owned_joins(join_fds, profile, spec) -> None:
    """A fresh user namespace has no privilege over the host's namespaces: joining the
    host's mount or pid namespace by path would fail halfway (mount: EPERM), and so
    would setting the hostname of its uts namespace (sethostname: EPERM). Refused up
    front, naming the profile's rule. runc joins them as host root."""
    name = getattr(profile, "name", "the profile")
    for ns_type, _ in join_fds:
        if ns_type in _NEEDS_OWNERSHIP:
            raise errors.InvalidArgument(
                f"config.json: linux.namespaces: a {ns_type} namespace given by path belongs"
                f" to the host's user namespace: profile {name} runs every container in a"
                " user namespace of its own, which has no privilege there to mount the"
                " container's root and /proc"
            )
        if ns_type == "uts" and (spec.hostname or spec.domainname):
            raise errors.InvalidArgument(
                "config.json: hostname: the uts namespace given by path belongs to the"
                f" host's user namespace: profile {name} runs every container in a user"
                " namespace of its own, which has no privilege there to set the hostname"
            )


def _foreign_owner(join_fds) -> int | None:
    """The user namespace owning the namespaces joined by path, when it is not ours.

    None when they all belong to this process's user namespace. Refused when they
    belong to different ones: one process can be in only one.
    """
    own = os.stat("/proc/self/ns/user")
    owners: dict[tuple[int, int], int] = {}
    try:
        for ns_type, fd in join_fds:
            try:
                owner = linux.owner_user_namespace(fd)
            except PermissionError:
                # NS_GET_USERNS: the owner is no descendant of this user namespace.
                raise errors.InvalidArgument(
                    f"config.json: linux.namespaces: the {ns_type} namespace given by path is"
                    " owned by a user namespace outside zviz's: it cannot be joined"
                ) from None
            st = os.fstat(owner)
            key = (st.st_dev, st.st_ino)
            if key == (own.st_dev, own.st_ino) or key in owners:
                os.close(owner)
            else:
                owners[key] = owner
    except BaseException:
        close_all(owners.values())
        raise
    if len(owners) > 1:
        close_all(owners.values())
        raise errors.InvalidArgument(
            "config.json: linux.namespaces: the namespaces given by path belong to different"
            " user namespaces; a container can join only one"
        )
    return next(iter(owners.values()), None)


def set_oom_score_adj(pid: int, value: int | None) -> None:
    """process.oomScoreAdj, written by the parent as host root (as runc does).

    The process itself cannot: in its user namespace its /proc files belong to host
    root, and a value below the current one needs CAP_SYS_RESOURCE in the initial
    user namespace.
    """
    if value is None:
        return
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as exc:
        raise errors.FailedPrecondition(
            f"config.json: process.oomScoreAdj: cannot set {value}: {exc.strerror}"
            " (lowering it needs CAP_SYS_RESOURCE)"
        ) from None


def write_id_maps(pid: int, uid_mappings, gid_mappings) -> None:
    """uid_map and gid_map of `pid`'s new user namespace, from config.json."""
    for name, mappings in (("uid_map", uid_mappings), ("gid_map", gid_mappings)):
        if not mappings:
            raise errors.field_error(
                f"linux.{name[:3]}Mappings", "required with a new user namespace"
            )
        text = "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in mappings)
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        except OSError as exc:
            raise errors.InvalidArgument(
                f"config.json: linux.{name[:3]}Mappings: the kernel refused {text.strip()!r}: {exc.strerror}"
            ) from None
        finally:
            os.close(fd)


def _open_ns(ns_type: str, path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.InvalidArgument(
            f"config.json: linux.namespaces: {ns_type} path {path}: {exc.strerror}"
        ) from None


def _reap(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_and_reap(pid: int) -> None:
    _kill(pid)
    _reap(pid)


def reap_if_child(pid: int) -> None:
    """Reap `pid` if it is ours (run/exec as subreaper); ignore it otherwise."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    except OSError as exc:
        if exc.errno != errno.ECHILD:
            raise
