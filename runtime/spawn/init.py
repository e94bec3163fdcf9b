"""PID 1: from the namespace child's fork to the workload's execve.

Builds the filesystem, terminal, sysctls, hostname, rlimits, prepares the security
layers, switches user, reports "ready" and waits: for "start" on the sync socket (`zviz
run`, no fifo round trip), or for `zviz start` to open the exec fifo (`zviz create`).
Then the startContainer hooks, the security layers, the exec anchor's start (vfork or fork)
(runtime/exec_anchor.py), then execve. The process attributes (`prepare_process`,
`finish_process`) are an exec's too (runtime/spawn/exec.py).

Everything here runs after fork and leaves only through os._exit.
"""

import os
import signal

from runtime import errors, hooks, linux
from runtime.rootfs import RootfsBuilder
from runtime.spawn.common import Request, Stages
from runtime.spawn.sysctl import joined_netns_sysctls, write_sysctl
from runtime.sync import Sync

_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


def run_init(request: Request, sync: Sync, stages: Stages, in_userns: bool) -> None:
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
        setup_stdio(request, process)
    with stages("sysctl"):
        written_by_parent = joined_netns_sysctls(spec)  # write_joined_netns_sysctls
        for key, value in (spec.linux.sysctl or {}).items():
            if key not in written_by_parent:
                write_sysctl(key, value)
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
    plan = prepare_process(request, stages, process, own_proc_files=True)
    with stages("cgroup"):
        if joined is None:
            joined = sync.expect("joined")
        if "cgroup" in new_ns:
            # Now, so the namespace's root is the container's own cgroup.
            linux.unshare(linux.CLONE_NEWCGROUP)
    finish_process(
        request, sync, stages, process, plan, wait_for_fifo=request.wait_for_fifo_fd,
        hook_state=joined.get("state"),
    )  # fmt: skip


def prepare_process(request: Request, stages: Stages, process, own_proc_files: bool = False):
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


def finish_process(
    request: Request, sync: Sync, stages: Stages, process, plan, wait_for_fifo, hook_state=None
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
            anchor_vfork = exec_anchor.may_vfork(request.profile, request.spec.linux.seccomp)
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
            *request.anchor_fds,
            anchor_uid,
            request.spec.linux.creates_namespace("pid"),
            vfork=anchor_vfork,
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


def setup_stdio(request: Request, process) -> None:
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


# What the runtime's children make (the rootfs's mount points, /dev, the cgroup mount
# points) and a workload without process.user.umask get: runc's (libcontainer
# finalizeRootfs), never the umask of whoever ran zviz or the shim.
DEFAULT_UMASK = 0o022


def workload_umask(user) -> int:
    """The umask a container's process runs with: its `process.user.umask`, else 0022.

    runc's rule (libcontainer finalizeRootfs): the workload never inherits the umask of
    its caller (an operator's 0027 or 0077 shell, a containerd service with UMask=),
    which the runtime's children do not run with either: each starts at DEFAULT_UMASK
    (runtime/spawn/parent.py _fork_child). An exec without a umask of its own gets the
    container's (Container.exec fills it in, as runc's exec takes the container's);
    where neither has one, 0022, where runc's exec would inherit its caller's
    (docs/cli.md "Process model", Umask). An exec the anchor forks gets the same: the
    anchor, forked by PID 1 once this is set, runs with PID 1's, and takes only an
    exec whose user (umask included) is PID 1's (runtime/exec_anchor.py ineligible).
    """
    umask = getattr(user, "umask", None)
    return DEFAULT_UMASK if umask is None else umask


def _switch_user(user) -> None:
    uid, gid = user.uid, user.gid
    extra = list(getattr(user, "additional_gids", None) or ())
    os.umask(workload_umask(user))
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
