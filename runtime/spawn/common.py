"""What every stage of a spawn shares: the Request, and how a child reports and leaves.

Each child always leaves through os._exit (`run_child`); a failure becomes one
structured error on the sync socket (runtime/spawn/messages.py: "error"), which the
parent raises as a ZvizError. `Stages` names the step a failure happened in.
"""

import os
import signal

from runtime import linux
from runtime.sync import Sync


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


def run_child(sync: Sync, body) -> None:
    code = 1
    try:
        body()
        code = 0
    except StageError as exc:
        if not sync.send_error(exc.stage, exc.cause):
            _tell_stderr(exc.stage, exc.cause)
    except BaseException as exc:  # noqa: BLE001 - a child must never unwind into the parent's code
        if not sync.send_error("setup", exc):
            _tell_stderr("setup", exc)
    finally:
        os._exit(code)


class StageError(Exception):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(stage)
        self.stage = stage
        self.cause = cause


class Stages:
    """Names the stage a failure happened in: `with stages("mount"): ...`."""

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and not isinstance(exc, StageError) and kind is not SystemExit:
            raise StageError(self.name, exc) from exc
        return False


def _tell_stderr(stage: str, cause: BaseException) -> None:
    """After `zviz create` returned nobody reads the sync socket: say it on stderr."""
    try:
        os.write(2, f"zviz: {stage}: {cause}\n".encode())
    except OSError:
        pass


def import_child_modules() -> None:
    """The modules every child needs after pivot_root or setns(mnt), imported by the
    parent before it forks (parent._fork_child). A child importing them pays for it per
    container (~1.5 ms of CPU here: the import machinery's writes copy the parent's
    pages); a long-lived parent (the shim's daemon, the fork server) pays once."""
    import resource  # noqa: F401

    from runtime import console, rootfs  # noqa: F401


def preload(request: Request, stages: "Stages") -> None:
    """Import now what the child needs later: after pivot_root or setns(mnt) the
    runtime's source tree and the standard library are out of reach."""
    with stages("setup"):
        # The caller's wakeup fd (asyncio in the shim) is closed below and its number
        # reused: a signal must never write into whatever file gets it.
        signal.set_wakeup_fd(-1)
        import_child_modules()  # already done by the parent: then only a lookup
        if request.spec.process is not None and request.spec.process.terminal:
            import socket  # noqa: F401
        if request.notify_channel is not None:
            request.notify_channel.close_supervisor_end()
        if request.anchor_fds is not None or request.anchor_connection is not None:
            from runtime import exec_anchor  # noqa: F401


def close_inherited_fds(request: Request, sync: Sync, extra=()) -> None:
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
    linux.close_all_except(keep)


def close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
