"""Where a process that should have ended is stuck: for the message of a test that timed out.

A hang seen once in a full run (and not again in hundreds of tries alone) must say
where it was the first time. `describe_tree` names every process below a pid (the
subreaper's adopted ones too: a `zviz run`'s PID 1 and broker) with its state, the
kernel function it sleeps in and its kernel stack. `python_traceback_on_abort` asks a
Python process for its own stack: with PYTHONFAULTHANDLER set, SIGABRT makes it write
every thread's traceback to its stderr before it dies.
"""

import os
import signal
import subprocess

_STACK_FRAMES = 8


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                # comm may hold spaces and parentheses: the fields follow its last ")"
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"({exc.strerror})"


def _describe(pid: int, depth: int) -> list[str]:
    stat = _read(f"/proc/{pid}/stat")
    state = stat.rsplit(")", 1)[1].split()[0] if ")" in stat else "?"
    argv = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()[:200]
    wchan = _read(f"/proc/{pid}/wchan")
    indent = "  " * depth
    lines = [f"{indent}{pid} [{state}] wchan={wchan} {argv}"]
    stack = _read(f"/proc/{pid}/stack").splitlines()[:_STACK_FRAMES]
    lines += [f"{indent}    {frame}" for frame in stack]
    return lines


def describe_tree(pid: int) -> str:
    """PID and every process below it, each with its state, wchan and kernel stack."""
    children = _children()
    lines: list[str] = []
    pending = [(pid, 0)]
    while pending:
        current, depth = pending.pop()
        lines += _describe(current, depth)
        pending += [(child, depth + 1) for child in sorted(children.get(current, ()), reverse=True)]
    return "\n".join(lines)


def python_traceback_on_abort(process: subprocess.Popen, wait: float = 5) -> None:
    """SIGABRT to PROCESS (started with PYTHONFAULTHANDLER=1: it writes its threads'
    tracebacks to its stderr and dies of it); SIGKILL if it is still there after WAIT s."""
    process.send_signal(signal.SIGABRT)
    try:
        process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
