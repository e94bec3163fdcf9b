"""Where a process that should have ended is stuck: for the message of a test that timed out.

A hang seen once in a full run (and not again in hundreds of tries alone) must say
where it was the first time. `describe_tree` names every process below a pid (the
subreaper's adopted ones too: a `zviz run`'s PID 1 and broker) with its state, the
kernel function it sleeps in and its kernel stack. `python_tracebacks_on_abort` asks
the Python processes of the tree for their own stacks: with PYTHONFAULTHANDLER set,
SIGABRT makes each write every thread's traceback to its stderr before it dies. The
container's PID 1 and its broker are forks of the zviz process: they keep its
faulthandler, and PID 1 writes to the same stderr.
"""

import contextlib
import os
import signal
import subprocess
import sys

from runtime import procstat

_STACK_FRAMES = 8


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"({exc.strerror})"


def _describe(pid: int, depth: int) -> list[str]:
    try:
        state = procstat.state(pid)
    except (OSError, ValueError):
        state = "?"
    argv = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()[:200]
    wchan = _read(f"/proc/{pid}/wchan")
    indent = "  " * depth
    lines = [f"{indent}{pid} [{state}] wchan={wchan} {argv}"]
    stack = _read(f"/proc/{pid}/stack").splitlines()[:_STACK_FRAMES]
    lines += [f"{indent}    {frame}" for frame in stack]
    return lines


def describe_tree(pid: int) -> str:
    """PID and every process below it, each with its state, wchan and kernel stack."""
    return "\n".join(
        line for current, depth in procstat.descendants(pid) for line in _describe(current, depth)
    )


def _runs_python(pid: int) -> bool:
    try:
        return os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(sys.executable)
    except OSError:
        return False


def python_tracebacks_on_abort(process: subprocess.Popen, wait: float = 5) -> None:
    """SIGABRT to PROCESS (started with PYTHONFAULTHANDLER=1) and to every Python process
    below it (this interpreter's binary: the forks that kept its faulthandler): each
    writes its threads' tracebacks to its stderr and dies of it. The ones below first,
    so that PROCESS, a subreaper, is still there to be their parent. SIGKILL to PROCESS
    if it is still there after WAIT s."""
    for pid, _ in reversed(procstat.descendants(process.pid)[1:]):
        if _runs_python(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
    process.send_signal(signal.SIGABRT)
    try:
        process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
