"""Spawning: the processes that become a container (init) or enter one (exec).

    zviz (parent) ──fork──▶ child ──fork──▶ PID 1 ──execve──▶ workload
                   sync socket shared by child and PID 1 (runtime/sync.py)

child:  PDEATHSIG, joins the cgroup itself (so every descendant is in it), joins the
        namespaces given by path, unshares the user namespace (the parent writes
        uid_map/gid_map and answers "mapped"), unshares the rest, forks PID 1, reports
        its pid and exits. PID 1 is then reparented to the nearest subreaper: `zviz
        run` itself, or containerd's shim under `zviz create` (no monitor in between).
PID 1:  builds the filesystem, terminal, sysctls, hostname, rlimits, prepares the
        security layers, switches user, reports "ready" and waits: for "start" on the
        sync socket (`zviz run`, no fifo round trip), or for `zviz start` to open the
        exec fifo (`zviz create`). Then the security layers, then execve.

Each child always leaves through os._exit; a failure becomes one structured error
on the sync socket, which the parent raises as a ZvizError.
"""

import errno
import os
import signal

from runtime import denials, errors, hooks, idmap, linux, state
from runtime.idmap import (
    check_joined_user_namespace,
    host_id_of_root,
    idmap_requested_mounts,
    idmap_volumes,
    idmapped_rootfs,
    read_only_volumes,
    requested_idmap_mounts,
)
from runtime.rootfs import RootfsBuilder, open_bind_sources
from runtime.sync import Sync

_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

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
# The exec child's word that the container's exec anchor did not take the exec: nothing
# of it runs, spawn_exec raises exec_anchor.Unanswered and the caller takes the old path.
ANCHOR_UNANSWERED = "anchor-unanswered"

RLIMITS = {
    "RLIMIT_CPU": 0,
    "RLIMIT_FSIZE": 1,
    "RLIMIT_DATA": 2,
    "RLIMIT_STACK": 3,
    "RLIMIT_CORE": 4,
    "RLIMIT_RSS": 5,
    "RLIMIT_NPROC": 6,
    "RLIMIT_NOFILE": 7,
    "RLIMIT_MEMLOCK": 8,
    "RLIMIT_AS": 9,
    "RLIMIT_LOCKS": 10,
    "RLIMIT_SIGPENDING": 11,
    "RLIMIT_MSGQUEUE": 12,
    "RLIMIT_NICE": 13,
    "RLIMIT_RTPRIO": 14,
    "RLIMIT_RTTIME": 15,
}


class Request:
    """Everything the children need; built by the parent before fork."""

    def __init__(
        self,
        spec,
        *,
        bundle: str,
        profile=None,
        verbose: bool = False,
        cgroup=None,
        wait_for_fifo_fd: int | None = None,
        console_fd: int | None = None,
        stdio=(0, 1, 2),
        preserve_fds: int = 0,
        no_pivot: bool = False,
        notify_channel=None,
        hook_state: dict | None = None,
        anchor_fds: tuple[int, int] | None = None,
        anchor_connection: tuple[int, int, int] | None = None,
    ):
        self.spec = spec
        self.bundle = bundle
        self.profile = profile
        self.verbose = verbose
        self.cgroup = cgroup
        self.wait_for_fifo_fd = wait_for_fifo_fd
        self.console_fd = console_fd
        self.stdio = tuple(stdio)
        self.preserve_fds = preserve_fds
        self.no_pivot = no_pivot
        # runtime.security.NotifyChannel when the profile needs a seccomp broker.
        self.notify_channel = notify_channel
        # What OCI hooks read on stdin besides status and pid (see runtime.hooks).
        self.hook_state = hook_state or {}
        # PID 1's: (bound socket, O_PATH fd of the binary) for the exec anchor
        # (runtime/exec_anchor.py). An exec's: (a socket connected to that anchor, the
        # binary, the anchor's host /proc directory or -1) when the exec goes through it
        # (then it has no notify channel: PID 1's broker serves it).
        self.anchor_fds = anchor_fds
        self.anchor_connection = anchor_connection
        # Set in the namespace child: the id-mapped rootfs clone the parent made.
        self.rootfs_mount_fd: int | None = None
        # Set by spawn_init: per spec.mounts entry, its bind source's clone (or None).
        self.bind_source_fds: list[int | None] = []


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
    parent_end, child_end = Sync.pair()
    try:
        child = os.fork()
    except BaseException:
        parent_end.close()
        child_end.close()
        _close_all(fds_for_child)
        raise
    if child == 0:
        parent_end.close()
        _run_child(child_end, lambda: child_main(child_end))
    child_end.close()
    _close_all(fds_for_child)
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
        _close_all(fd for _, fd in join_fds)
        _close_all(fd for fd in request.bind_source_fds if fd is not None)
        _close_all(fd for _, fd in volumes_to_map)
        raise
    try:
        return _spawn_init(request, log, flags, join_fds, new_user, volumes_to_map, mounts_to_map)
    finally:
        _close_all(fd for _, fd in volumes_to_map + mounts_to_map)


def _spawn_init(
    request: Request, log, flags, join_fds, new_user, volumes_to_map, mounts_to_map
) -> Spawned:
    spec = request.spec
    child, parent_end = _fork_child(
        [fd for _, fd in join_fds] + [fd for fd in request.bind_source_fds if fd is not None],
        lambda child_end: _namespace_child(request, child_end, flags, join_fds, new_user),
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
                    parent_end.send_fds([rootfs_fd], type="mapped", idmapped=True)
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
        [fd for _, fd in ns_fds], lambda child_end: _exec_child(request, child_end, ns_fds, process)
    )

    def on_message(kind, message, _pid):
        if kind == ANCHOR_UNANSWERED:
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
        _close_all(owners.values())
        raise
    if len(owners) > 1:
        _close_all(owners.values())
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


# ---------------------------------------------------------------------------
# Children. Everything below runs after fork and leaves only through os._exit.


def _run_child(sync: Sync, body) -> None:
    code = 1
    try:
        body()
        code = 0
    except _StageError as exc:
        if not sync.send_error(exc.stage, exc.cause):
            _tell_stderr(exc.stage, exc.cause)
    except BaseException as exc:  # noqa: BLE001 - a child must never unwind into the parent's code
        if not sync.send_error("setup", exc):
            _tell_stderr("setup", exc)
    finally:
        os._exit(code)


class _StageError(Exception):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(stage)
        self.stage = stage
        self.cause = cause


class _Stages:
    """Names the stage a failure happened in: `with stages("mount"): ...`."""

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and not isinstance(exc, _StageError) and kind is not SystemExit:
            raise _StageError(self.name, exc) from exc
        return False


def _tell_stderr(stage: str, cause: BaseException) -> None:
    """After `zviz create` returned nobody reads the sync socket: say it on stderr."""
    try:
        os.write(2, f"zviz: {stage}: {cause}\n".encode())
    except OSError:
        pass


def _preload(request: Request, stages: "_Stages") -> None:
    """Import now what the child needs later: after pivot_root or setns(mnt) the
    runtime's source tree and the standard library are out of reach."""
    with stages("setup"):
        # The caller's wakeup fd (asyncio in the shim) is closed below and its number
        # reused: a signal must never write into whatever file gets it.
        signal.set_wakeup_fd(-1)
        import resource  # noqa: F401

        from runtime import console, rootfs  # noqa: F401

        if request.spec.process is not None and request.spec.process.terminal:
            import socket  # noqa: F401
        if request.notify_channel is not None:
            request.notify_channel.close_supervisor_end()
        if request.anchor_fds is not None or request.anchor_connection is not None:
            from runtime import exec_anchor  # noqa: F401


def _close_inherited_fds(request: Request, sync: Sync, extra=()) -> None:
    """Close everything the caller had open except what the container needs.

    A long-lived caller (the shim) has sockets and files open; a PID 1 blocked on
    the exec fifo must not hold them (CLOEXEC would only drop them at execve).
    """
    keep = {0, 1, 2, sync.fd, *request.stdio, *extra}
    keep.update(range(3, 3 + request.preserve_fds))
    for fd in (request.wait_for_fifo_fd, request.console_fd):
        if fd is not None:
            keep.add(fd)
    if request.notify_channel is not None:
        keep.add(request.notify_channel.container_fd)
    keep.update(request.anchor_fds or ())
    keep.update(fd for fd in request.anchor_connection or () if fd >= 0)
    low = 0
    for fd in sorted(keep):
        if fd > low:
            linux.close_range(low, fd - 1)
        low = max(low, fd + 1)
    linux.close_range(low)


def _namespace_child(request: Request, sync: Sync, flags: int, join_fds, new_user: bool) -> None:
    stages = _Stages()
    spec = request.spec
    _preload(request, stages)
    with stages("fds"):
        _close_inherited_fds(
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
            denials.start_session(_host_id_of_container_root(spec))
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
        # The cgroup namespace waits for PID 1 to be in its cgroup (see _init).
        if flags & ~linux.CLONE_NEWCGROUP:
            linux.unshare(flags & ~linux.CLONE_NEWCGROUP)
    with stages("fork"):
        pid1 = os.fork()
    if pid1 == 0:
        in_userns = new_user or any(t == "user" for t, _ in join_fds)
        _run_child(sync, lambda: _init(request, sync, stages, in_userns=in_userns))
    sync.send("pid", pid=pid1)


def _host_id_of_container_root(spec) -> int:
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


def _init(request: Request, sync: Sync, stages: _Stages, in_userns: bool) -> None:
    """PID 1: filesystem, process attributes, ready, wait for start, security, execve."""
    spec = request.spec
    process = spec.process
    new_ns = {ns.type for ns in spec.linux.namespaces or () if not ns.path}

    def log(level: str, message: str) -> None:
        try:
            sync.send("log", level=level, msg=message)
        except OSError:
            pass

    joined = None
    pre_pivot_hooks = any(
        (spec.hooks or {}).get(kind) for kind in hooks.RUNTIME_HOOKS + hooks.CONTAINER_HOOKS
    )

    def before_pivot() -> None:
        # The hooks may fork: only once in the cgroup. The runtime's ones first.
        nonlocal joined
        joined = sync.expect("joined")
        with stages("hooks"):
            if any(spec.hooks.get(kind) for kind in hooks.RUNTIME_HOOKS):
                sync.send("hooks")
                sync.expect("hooked")
            for kind in hooks.CONTAINER_HOOKS:
                hooks.run(kind, spec.hooks, joined["state"])

    if "mount" in new_ns or any(ns.type == "mount" for ns in spec.linux.namespaces or ()):
        builder = RootfsBuilder(
            spec,
            bundle=request.bundle,
            cgroup_paths=request.cgroup.paths if request.cgroup is not None else {},
            no_pivot=request.no_pivot,
            in_userns=in_userns,
            new_netns="network" in new_ns,
            log=log,
            rootfs_mount_fd=request.rootfs_mount_fd,
            bind_source_fds=request.bind_source_fds,
        )
        with stages("rootfs"):
            builder.build(before_pivot=before_pivot if pre_pivot_hooks else None)
    else:
        builder = None
        with stages("rootfs"):
            raise errors.field_error("linux.namespaces", "a mount namespace is required")
    with stages("terminal"):
        _setup_stdio(request, process)
    with stages("sysctl"):
        written_by_parent = joined_netns_sysctls(spec)  # write_joined_netns_sysctls
        for key, value in (spec.linux.sysctl or {}).items():
            if key not in written_by_parent:
                _write_sysctl(key, value)
    with stages("rootfs"):
        builder.finish()
        from runtime import security

        security.make_writable_dirs(spec, request.profile)
    with stages("hostname"):
        if spec.hostname:
            linux.sethostname(spec.hostname)
        if getattr(spec, "domainname", None):
            linux.setdomainname(spec.domainname)
    # What does not need the cgroup runs while the parent's join of it may still wait.
    plan = _prepare_process(request, stages, process, own_proc_files=True)
    with stages("cgroup"):
        if joined is None:
            joined = sync.expect("joined")
        if "cgroup" in new_ns:
            # Now, so the namespace's root is the container's own cgroup.
            linux.unshare(linux.CLONE_NEWCGROUP)
    _finish_process(
        request, sync, stages, process, plan, wait_for_fifo=request.wait_for_fifo_fd,
        hook_state=joined.get("state"),
    )  # fmt: skip


def _exec_child(request: Request, sync: Sync, ns_fds, process) -> None:
    stages = _Stages()
    _preload(request, stages)
    with stages("fds"):
        _close_inherited_fds(request, sync, extra=[fd for _, fd in ns_fds])
    with stages("prctl"):
        linux.set_pdeathsig(signal.SIGKILL)
    if request.cgroup is not None:
        with stages("cgroup"):
            request.cgroup.join_self()
    if denials.enabled():
        with stages("audit session"):
            # Its own session, as PID 1's (_namespace_child): the shim adds it to the
            # container's, so records of a caller that has exited are still the container's.
            denials.start_session(_host_id_of_container_root(request.spec))
    with stages("namespaces"):
        for ns_type, fd in ns_fds:
            linux.setns(fd, linux.NAMESPACE_FLAGS[ns_type])
            os.close(fd)
    channel = None
    if request.anchor_connection is not None:
        from runtime import exec_anchor

        try:
            with stages("exec anchor"):
                channel = _request_from_anchor(request, process)
        except _StageError as e:
            if not isinstance(e.cause, exec_anchor.Unanswered):
                raise
            # Nothing of the exec exists: the parent runs it the old way (Container.exec).
            sync.send(ANCHOR_UNANSWERED, why=str(e.cause))
            return
    with stages("fork"):
        pid = os.fork()
    if pid == 0:
        if channel is not None:
            binary = request.anchor_connection[1]
            _run_child(sync, lambda: _stand_in(sync, stages, process, channel, binary))
        _run_child(sync, lambda: _exec_process(request, sync, stages, process))
    sync.send("pid", pid=pid)


def _request_from_anchor(request: Request, process) -> int:
    """Ask the container's anchor for the exec (runtime/exec_anchor.py), from here: host
    root outside the container's pid namespace, the only sender it serves. Returns the
    stand-in's end of the reply channel; the stand-in then holds none of the stdio.
    exec_anchor.Unanswered (before any pty went to the caller's console socket) when
    the anchor did not take it."""
    from runtime import console, exec_anchor

    terminal = process.terminal and request.console_fd is not None
    connected = request.anchor_connection[0]
    try:
        channel = exec_anchor.send_request(connected, process, terminal)
    finally:
        os.close(connected)
    try:
        anchor_dir = request.anchor_connection[2]
        try:
            exec_anchor.await_ready(channel, anchor_dir)
        finally:
            if anchor_dir >= 0:
                os.close(anchor_dir)  # a host /proc directory: not for the stand-in
        if terminal:
            # The pty in the container's devpts, as _setup_stdio makes it for the old path.
            slave = console.make_pty_and_send(request.console_fd)
            stdio = (slave, slave, slave)
        else:
            stdio = request.stdio
        try:
            exec_anchor.send_stdio(channel, stdio)
        finally:
            _close_all(set(stdio))
    except BaseException:
        os.close(channel)
        raise
    null = os.open("/dev/null", os.O_RDWR)  # the container's: the stand-in is in its mounts
    for target in (0, 1, 2):
        if target != null:
            os.dup2(null, target)
    if null > 2:
        os.close(null)
    return channel


def _stand_in(sync: Sync, stages: "_Stages", process, channel: int, binary: int) -> None:
    """The exec as its caller knows it (pid, exit status, signals) while the anchor's
    child runs it inside PID 1's Landlock domain."""
    from runtime import exec_anchor

    with stages("prctl"):
        # Host root in the container's pid namespace: the workload must not read it.
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
    sync.send("ready")
    sync.expect("start")
    with stages("exec"):
        exec_anchor.stand_in(channel, binary, process, ready=sync.close)


def _exec_process(request: Request, sync: Sync, stages: "_Stages", process) -> None:
    with stages("terminal"):
        _setup_stdio(request, process)
    plan = _prepare_process(request, stages, process)
    _finish_process(request, sync, stages, process, plan, wait_for_fifo=None)


def _prepare_process(request: Request, stages: _Stages, process, own_proc_files: bool = False):
    """rlimits and the security layers' preparation (PID 1's and an exec's).

    own_proc_files: PID 1's only. An exec's pinning mounts would outlive it, on the
    entries of a pid number that is later another process's."""
    with stages("rlimits"):
        _set_rlimits(process.rlimits or ())
    from runtime import security

    anchor_binary = request.anchor_fds[1] if request.anchor_fds else None
    with stages("security"):
        return security.prepare(
            request.spec, request.profile, request.verbose, own_proc_files, anchor_binary
        )


def _finish_process(
    request: Request, sync: Sync, stages: _Stages, process, plan, wait_for_fifo, hook_state=None
):
    """user, cwd, fds; ready; wait; startContainer hooks (PID 1's); security; execve."""
    from runtime import security

    with stages("user"):
        _switch_user(process.user)
    with stages("cwd"):
        os.chdir(process.cwd or "/")
    with stages("exec"):
        env = list(process.env or ())
        path = _find_executable(process.args, env)
    with stages("fds"):
        linux.close_range(3 + request.preserve_fds, 0xFFFFFFFF, linux.CLOSE_RANGE_CLOEXEC)
    with stages("signals"):
        _prepare_signals_for_waiting()
    anchor_uid = None
    if request.anchor_fds is not None:
        from runtime import exec_anchor

        with stages("exec anchor"):
            anchor_uid = exec_anchor.expected_uid()
    sync.send("ready")
    sync.expect("ack" if wait_for_fifo is not None else "start")
    if wait_for_fifo is not None:
        with stages("exec fifo"):
            # Blocks until `zviz start` opens the fifo for reading. /proc/self/fd
            # reaches the fifo even though the state dir is outside our root.
            fd = os.open(f"/proc/self/fd/{wait_for_fifo}", os.O_WRONLY | os.O_CLOEXEC)
            os.write(fd, b"0")
            os.close(fd)
    if hook_state is not None:
        with stages("hooks"):
            hooks.run("startContainer", request.spec.hooks, {**hook_state, "status": "created"})
    with stages("security"):
        security.apply(plan, request.notify_channel)
    if anchor_uid is not None:
        # Here, so that it holds every layer PID 1 has: its execs are in its domain.
        exec_anchor.start(
            *request.anchor_fds, anchor_uid, request.spec.linux.creates_namespace("pid")
        )
    with stages("exec"):
        _restore_default_signals()
        os.execve(path, process.args, dict(entry.split("=", 1) for entry in env if "=" in entry))


_TERMINATING = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def _prepare_signals_for_waiting() -> None:
    """A created container must die of `zviz kill ID TERM` while it waits for start.

    PID 1 of a pid namespace only receives signals it handles (SIGKILL aside), so
    handle the terminating ones by exiting as the default action would have.
    """
    for sig in _TERMINATING:
        signal.signal(sig, _exit_on_signal)


def _exit_on_signal(sig, _frame) -> None:
    os._exit(128 + sig)


_GLIBC_RESERVED_SIGNALS = (32, 33)


def _restore_default_signals() -> None:
    """The workload starts with default dispositions and an empty mask.

    Python ignores SIGPIPE and SIGXFSZ; SIG_IGN survives execve, so undo it.
    """
    for sig in _TERMINATING:
        signal.signal(sig, signal.SIG_DFL)
    # Ignored signals stay ignored across execve: Python's SIGPIPE/SIGXFSZ, and
    # whatever the caller (nohup, a shim) ignored.
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    for sig in _GLIBC_RESERVED_SIGNALS:  # invisible to valid_signals(), inheritable all the same
        linux.reset_signal_disposition(sig)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _setup_stdio(request: Request, process) -> None:
    from runtime import console

    if process.terminal and request.console_fd is not None:
        slave = console.make_pty_and_send(request.console_fd)
        console.become_session_leader_on(slave)
        return
    if request.stdio != (0, 1, 2):
        # dup to high numbers first so overlapping sources aren't clobbered
        high = [os.dup(fd) for fd in request.stdio]
        for target, fd in enumerate(high):
            os.dup2(fd, target)
            os.close(fd)


def joined_netns_sysctls(spec) -> dict[str, str]:
    """The net.* sysctls of a container that joins its network namespace by path.

    Such a namespace (a pod sandbox's, made by the CRI plugin) belongs to the host's user
    namespace, not to the container's: PID 1, root only in its own user namespace, may
    not write its sysctls (containerd 2.x asks net.ipv4.ip_unprivileged_port_start and
    ping_group_range for every pod). spec.py has already refused net.* sysctls for the
    host's own namespace, so what is left here changes only the joined one.
    """
    net = spec.linux.namespace("network")
    if net is None or net.path is None:
        return {}
    return {
        key: value
        for key, value in (spec.linux.sysctl or {}).items()
        if key.replace("/", ".").startswith("net.")
    }


def write_joined_netns_sysctls(spec) -> None:
    """Write joined_netns_sysctls as the runtime (host root), inside that namespace, as runc
    does for a pod: a thread of ours enters it, so /proc/sys/net is that namespace's."""
    sysctls = joined_netns_sysctls(spec)
    if not sysctls:
        return
    import threading

    path = spec.linux.namespace("network").path
    failure: list[BaseException] = []

    def write_inside() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.setns(fd, linux.CLONE_NEWNET)  # this thread only; it ends below
            finally:
                os.close(fd)
            for key, value in sysctls.items():
                _write_sysctl(key, value)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    writer = threading.Thread(target=write_inside, name="zviz-netns-sysctl")
    writer.start()
    writer.join()
    if failure:
        error = failure[0]
        if isinstance(error, OSError):
            raise errors.FailedPrecondition(
                f"sysctl in the joined network namespace {path}: {error.strerror}: "
                f"{error.filename or ''}".rstrip(": ")
            ) from error
        raise error


def _write_sysctl(key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.field_error(f"linux.sysctl.{key}", "no such sysctl in the container") from None
    try:
        try:
            os.write(fd, str(value).encode())
        except OSError as e:
            if e.errno != errno.EINVAL or key != PING_GROUP_RANGE:
                raise
            # The kernel refuses a range with a group the container's user namespace does
            # not map; containerd 2.x's CRI asks "0 2147483647" (every group may ping) for
            # every pod. Every group the container has is the same request, narrowed.
            with open("/proc/self/gid_map") as f:
                narrowed = ping_group_range_within(str(value), f.read())
            if narrowed is None:
                raise
            os.write(fd, narrowed.encode())
    finally:
        os.close(fd)


PING_GROUP_RANGE = "net.ipv4.ping_group_range"


def ping_group_range_within(value: str, gid_map: str) -> str | None:
    """The part of the ping_group_range VALUE ("LOW HIGH") inside one mapped range of
    GID_MAP (/proc/self/gid_map: inside, outside, count per line), the widest such part;
    None when the value is malformed or no mapped group is in it."""
    try:
        low, high = (int(word) for word in value.split())
    except ValueError:
        return None
    best = None
    for line in gid_map.splitlines():
        inside, _, count = (int(word) for word in line.split())
        first, last = max(low, inside), min(high, inside + count - 1)
        if first <= last and (best is None or last - first > best[1] - best[0]):
            best = (first, last)
    return None if best is None else f"{best[0]} {best[1]}"


def _set_rlimits(rlimits) -> None:
    import resource

    for limit in rlimits:
        kind = limit.type if hasattr(limit, "type") else limit["type"]
        soft = limit.soft if hasattr(limit, "soft") else limit["soft"]
        hard = limit.hard if hasattr(limit, "hard") else limit["hard"]
        if kind not in RLIMITS:
            raise errors.field_error("process.rlimits", f"unknown rlimit {kind!r}")
        resource.setrlimit(RLIMITS[kind], (_rlim(soft), _rlim(hard)))


def _rlim(value: int) -> int:
    import resource

    return resource.RLIM_INFINITY if value >= 2**63 - 1 or value < 0 else value


def _switch_user(user) -> None:
    uid, gid = user.uid, user.gid
    extra = list(getattr(user, "additional_gids", None) or ())
    if getattr(user, "umask", None) is not None:
        os.umask(user.umask)
    # Keep the permitted capabilities across setuid; the security layer then drops
    # what the profile and config.json don't grant.
    linux.prctl(linux.PR_SET_KEEPCAPS, 1)
    try:
        os.setgroups(extra)
    except PermissionError:
        if extra:
            raise
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    linux.prctl(linux.PR_SET_KEEPCAPS, 0)
    if uid != 0:
        _raise_effective_to_permitted()


def _raise_effective_to_permitted() -> None:
    """setuid away from 0 clears the effective set; the security layer needs it to drop caps."""
    from runtime.security import capabilities  # imported before pivot_root (runtime.security)

    capabilities.raise_effective_to_permitted()


def _find_executable(args, env: list[str]) -> str:
    if not args:
        raise errors.field_error("process.args", "must not be empty")
    name = args[0]
    if "/" in name:
        if not os.access(name, os.X_OK) or os.path.isdir(name):
            raise errors.NotFound(f"{name}: no such executable in the container")
        return name
    path_value = next((e[5:] for e in env if e.startswith("PATH=")), _DEFAULT_PATH)
    for directory in path_value.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise errors.NotFound(f"{name!r}: executable file not found in $PATH")


# ---------------------------------------------------------------------------
# Parent-side helpers.


def _open_ns(ns_type: str, path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.InvalidArgument(
            f"config.json: linux.namespaces: {ns_type} path {path}: {exc.strerror}"
        ) from None


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


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
