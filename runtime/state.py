"""Persisted container state: `--root/<id>/state.json`, one directory per container.

The file holds what cannot be recomputed (PID 1's pid and start time, bundle,
cgroup paths, the recorded exit). The status is derived on every read, like runc:
PID 1 alive with the exec fifo present is `created`, alive without it `running`
(`paused` when frozen), gone or a zombie `stopped`. The start time guards against
pid reuse: a recycled pid never makes a dead container look alive.
"""

import json
import os
import time

from runtime import errors, procstat

STATE_FILE = "state.json"
EXEC_FIFO = "exec.fifo"
DEFAULT_ROOT = "/run/zviz"

# Container ids as runc accepts them: they become directory and cgroup names.
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-.")


def validate_id(container_id: str) -> None:
    if not container_id or len(container_id) > 1024:
        raise errors.InvalidArgument(f"invalid container id {container_id!r}: empty or too long")
    if not set(container_id) <= _ID_CHARS or container_id in (".", ".."):
        raise errors.InvalidArgument(
            f"invalid container id {container_id!r}: use letters, digits and _ + - ."
        )


def container_dir(root: str, container_id: str) -> str:
    validate_id(container_id)
    return os.path.join(root, container_id)


# A learning run's profile (`zviz profile learn`, runtime/security/learn_run.py) sits
# beside the container's state directory, named after it with a character no id has (so
# no container's directory can be it): deleting the container removes it, also after
# the learner was SIGKILLed (`zviz delete --force ID`).
LEARNING_PROFILE_SUFFIX = "~learning.toml"


def learning_profile(root: str, container_id: str) -> str:
    return container_dir(root, container_id) + LEARNING_PROFILE_SUFFIX


def remove_learning_profile(root: str, container_id: str) -> None:
    try:
        os.unlink(learning_profile(root, container_id))
    except FileNotFoundError:
        pass


def write(directory: str, state: dict) -> None:
    """Atomically replace state.json (write a temp file, fsync-free rename).

    A full or read-only filesystem raises a ZvizError naming the file, and leaves the
    previous state.json (if any) as it was: never a truncated one, nor the temp file.
    """
    path = os.path.join(directory, STATE_FILE)
    tmp = path + ".tmp"
    data = memoryview(json.dumps(state).encode())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            while data:  # a nearly full filesystem takes part of a write
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created, or the filesystem refuses even that
        raise errors.state_error(f"writing {path}", exc) from exc


def read(root: str, container_id: str) -> dict:
    path = os.path.join(container_dir(root, container_id), STATE_FILE)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise errors.NotFound(f"container {container_id!r} does not exist (no {path})") from None
    except ValueError as exc:
        raise errors.FailedPrecondition(
            f"container {container_id!r}: corrupt {path}: {exc}"
        ) from None


def list_ids(root: str) -> list[str]:
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [n for n in names if os.path.exists(os.path.join(root, n, STATE_FILE))]


def now_rfc3339() -> str:
    """UTC time with nanoseconds, as Go's time.Time marshals it (go-runc parses this)."""
    ns = time.time_ns()
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000))
        + f".{ns % 1_000_000_000:09d}Z"
    )


class ProcStat:
    """The fields of /proc/<pid>/stat zviz uses."""

    __slots__ = ("state", "start_time", "exit_code")

    def __init__(self, state: str, start_time: int, exit_code: int | None):
        self.state = state
        self.start_time = start_time
        self.exit_code = exit_code


def proc_stat(pid: int) -> ProcStat | None:
    """None when the process does not exist."""
    try:
        fields = procstat.read(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    exit_code = int(fields[procstat.EXIT_CODE]) if len(fields) > procstat.EXIT_CODE else None
    return ProcStat(fields[procstat.STATE], int(fields[procstat.START_TIME]), exit_code)


def process_alive(pid: int, start_time: int | None) -> bool:
    """True when `pid` runs (not a zombie) and is the process we started."""
    if pid <= 0:
        return False
    stat = proc_stat(pid)
    if stat is None or stat.state in ("Z", "X"):
        return False
    return start_time is None or stat.start_time == start_time


def exit_code_from_wait_status(status: int) -> int:
    """A shell's exit code for a wait status: the code, or 128+signal when killed."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255
