"""OCI hooks (config.json `hooks`), run where and when the runtime spec says.

    prestart, createRuntime  the zviz parent (runtime namespaces) once PID 1's namespaces
                             exist, before pivot_root
    createContainer          PID 1 (container namespaces) before pivot_root; the path
                             resolves in the runtime's mount view, as runc does
    startContainer           PID 1 after start, before the security layers and execve;
                             the path resolves inside the container
    poststart                whoever starts the container (zviz start/run, the shim),
                             after execve
    poststop                 delete, after everything is removed

Each hook gets the container's state JSON on stdin, exactly its `args` (args[0] is
argv[0]; the path when absent) and `env`, and is killed at its `timeout` (seconds). A
failing hook of the first four fails the create or start, which then tears the
container down; the error names the hook, how it ended and the tail of its output. A
failing poststart or poststop hook is a warning and the rest still run (runtime spec:
"the remaining hooks and lifecycle continue").

Hooks run with the runtime's privileges: config.json comes from whoever runs zviz
(containerd, Docker, an operator), never from the workload.
"""

import json
import os
import select
import signal
import time

from runtime import errors, linux

# Before pivot_root: run by the parent, then by PID 1.
RUNTIME_HOOKS = ("prestart", "createRuntime")
CONTAINER_HOOKS = ("createContainer",)
_OUTPUT_TAIL = 2000


def state(template: dict, status: str, pid: int) -> dict:
    """The state JSON a hook reads: the template's id, bundle, annotations, ociVersion."""
    return {**template, "status": status, "pid": pid}


def run(kind: str, hooks: dict | None, container_state: dict) -> None:
    """Run every `kind` hook in order; the first failure raises FailedPrecondition."""
    for index, hook in enumerate((hooks or {}).get(kind) or ()):
        _run_one(f"hooks.{kind}[{index}] ({hook['path']})", hook, container_state)


def run_warning_only(kind: str, hooks: dict | None, container_state: dict, log) -> None:
    """poststart/poststop: a failure is logged and the remaining hooks still run."""
    for index, hook in enumerate((hooks or {}).get(kind) or ()):
        try:
            _run_one(f"hooks.{kind}[{index}] ({hook['path']})", hook, container_state)
        except errors.ZvizError as exc:
            log.warning(str(exc))


def _run_one(name: str, hook: dict, container_state: dict) -> None:
    path = hook["path"]
    args = hook.get("args") or [path]
    env = dict(entry.split("=", 1) for entry in hook.get("env") or () if "=" in entry)
    timeout = hook.get("timeout")
    stdin_read, stdin_write = os.pipe()
    output_read, output_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(stdin_read, 0)
            os.dup2(output_write, 1)
            os.dup2(output_write, 2)
            linux.close_range(3, 0xFFFFFFFF, linux.CLOSE_RANGE_CLOEXEC)
            # Python ignores these; SIG_IGN would survive execve.
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            os.execve(path, args, env)
        except OSError as exc:
            os.write(2, f"exec {path}: {exc.strerror}\n".encode())
        finally:
            os._exit(127)
    os.close(stdin_read)
    os.close(output_write)
    status, output = _feed_and_wait(pid, json.dumps(container_state).encode(), stdin_write,
                                    output_read, timeout)  # fmt: skip
    tail = output.decode(errors="replace").strip()[-_OUTPUT_TAIL:]
    said = f": {tail}" if tail else ""
    if status is None:
        raise errors.FailedPrecondition(f"{name}: killed after its timeout of {timeout}s{said}")
    if os.WIFSIGNALED(status):
        how = f"killed by signal {os.WTERMSIG(status)}"
        raise errors.FailedPrecondition(f"{name}: {how}{said}")
    if os.WEXITSTATUS(status) != 0:
        raise errors.FailedPrecondition(
            f"{name}: exited with status {os.WEXITSTATUS(status)}{said}"
        )


def _feed_and_wait(pid: int, data: bytes, stdin_fd: int, output_fd: int, timeout):
    """Write `data` to the hook's stdin, keep the tail of its output, reap it.

    Takes over (and closes) both fds. Returns (wait status, output); the status is None
    when the hook was killed at its timeout. Poll-driven, so a hook that never reads its
    stdin or writes a lot cannot block us.
    """
    os.set_blocking(stdin_fd, False)
    deadline = time.monotonic() + timeout if timeout else None
    pidfd = linux.pidfd_open(pid)
    output = b""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(output_fd, select.POLLIN)
    poller.register(stdin_fd, select.POLLOUT)
    try:
        while True:
            wait_ms = (
                None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            )
            events = dict(poller.poll(wait_ms))
            if not events and deadline is not None and time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None, output
            if stdin_fd >= 0 and stdin_fd in events:
                try:
                    data = data[os.write(stdin_fd, data) :]
                except BlockingIOError:
                    pass
                except BrokenPipeError:  # it did not read it all: its choice
                    data = b""
                if not data:  # all written: EOF tells the hook the state is complete
                    poller.unregister(stdin_fd)
                    os.close(stdin_fd)
                    stdin_fd = -1
            if output_fd in events:
                chunk = os.read(output_fd, 65536)
                output = (output + chunk)[-_OUTPUT_TAIL * 2 :]
                if not chunk:
                    poller.unregister(output_fd)
            if pidfd in events:
                break
        # What it wrote before exiting is in the pipe already.
        while chunk := _read_nonblocking(output_fd):
            output = (output + chunk)[-_OUTPUT_TAIL * 2 :]
        _, status = os.waitpid(pid, 0)
        return status, output
    finally:
        for fd in (pidfd, stdin_fd, output_fd):
            if fd >= 0:
                os.close(fd)


def _read_nonblocking(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536)
    except (BlockingIOError, OSError):
        return b""
