"""/proc/PID/stat, by the field numbers of proc(5).

The command (field 2) is whatever the process named itself, up to 15 bytes, spaces and
")" included: the fields after it start past its *last* ")". Splitting the whole line
on spaces reads the wrong fields for a process named "a b" or "x) R 1", and a workload
names its processes. Every reader of the file parses it here: state's liveness and
exit checks, the fork server, the exec anchor's supervisor, tests and benchmarks. No
imports but os: the fork server's client reads its own stat before anything else is
loaded.
"""

import os

COMMAND = 2
STATE = 3  # R, S, D, T, Z, X, ...
PARENT = 4
PROCESS_GROUP = 5
SESSION = 6
USER_TIME = 14  # clock ticks
SYSTEM_TIME = 15
NICE = 19
START_TIME = 22  # clock ticks after boot: with the pid, names one process for good
ARG_START = 48  # where the argv area is in the process's memory
ARG_END = 49
EXIT_CODE = 52  # of a zombie, as waitpid would report it (Linux 3.5)


def parse(text: str) -> list[str]:
    """The fields of a /proc/PID/stat line, indexed by proc(5)'s numbers: [1] the pid,
    [2] the command (without its parentheses), [3] the state and on; [0] is empty."""
    head, closing, tail = text.rpartition(")")
    if not closing:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    pid, _, command = head.partition(" (")
    return ["", pid, command, *tail.split()]


def read(pid: int | str = "self") -> list[str]:
    """parse() of /proc/PID/stat. A process that is gone raises OSError: ENOENT before
    the open, ESRCH (ProcessLookupError) when it went between the open and the read.
    A zombie still has its line (state Z)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return parse(f.read().decode(errors="replace"))


def state(pid: int | str) -> str:
    return read(pid)[STATE]


def parent(pid: int | str) -> int:
    return int(read(pid)[PARENT])


def children() -> dict[int, list[int]]:
    """Every process's children, by the parent field of each /proc/PID/stat: the tree as
    it is now (a process that goes while it is read is left out). For tests, benchmarks
    and diagnostics; the runtime knows its own processes."""
    tree: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            tree.setdefault(parent(entry), []).append(int(entry))
        except (OSError, ValueError):
            continue
    return tree


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, depth) of PID and every process below it, depth first, PID first."""
    below = children()
    found: list[tuple[int, int]] = []
    pending = [(pid, 0)]
    while pending:
        current, depth = pending.pop()
        found.append((current, depth))
        pending += [(child, depth + 1) for child in sorted(below.get(current, ()), reverse=True)]
    return found
