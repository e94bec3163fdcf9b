"""The processes of one task as the shim sees them: the init (the container's PID 1) and
its exec'd processes, each with its stdio, its state and its exit.

Each process is in one state (containerd's runc shim: pkg/process/init_state.go,
exec_state.go, deleted_state.go), and two tables decide everything about states:
TRANSITIONS, which state may follow which, and REFUSALS, which Task call each state
refuses and with which error. The TaskService asks `check(call)` before it acts, so a
call's legality is decided here and nowhere else. The words are containerd's; the
kinds are ours: containerd's runc shim answers these as plain errors (UNKNOWN), zviz as
FAILED_PRECONDITION, or NOT_FOUND where containerd's errdefs says so (a process that
has finished or been deleted), which CRI reads as "already gone".
"""

import asyncio
import contextlib
import enum
import os
import time

from api.gen.containerd.types.task import task_pb2
from runtime import linux
from runtime.errors import FailedPrecondition, NotFound, ZvizError
from runtime.state import exit_code_from_wait_status


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"  # the init alone: a task is paused as a whole
    STOPPED = "stopped"
    DELETED = "deleted"


INIT, EXEC = "init", "exec"

# The status State answers with; a deleted process reads as stopped (as in containerd).
STATUS = {
    State.CREATED: task_pb2.CREATED,
    State.RUNNING: task_pb2.RUNNING,
    State.PAUSED: task_pb2.PAUSED,
    State.STOPPED: task_pb2.STOPPED,
    State.DELETED: task_pb2.STOPPED,
}

# Which state may follow which, per kind of process (containerd's transition()).
TRANSITIONS: dict[tuple[str, State], frozenset[State]] = {
    (INIT, State.CREATED): frozenset({State.RUNNING, State.STOPPED, State.DELETED}),
    (INIT, State.RUNNING): frozenset({State.PAUSED, State.STOPPED}),
    (INIT, State.PAUSED): frozenset({State.RUNNING, State.STOPPED}),
    (INIT, State.STOPPED): frozenset({State.DELETED}),
    (INIT, State.DELETED): frozenset(),
    (EXEC, State.CREATED): frozenset({State.RUNNING, State.STOPPED, State.DELETED}),
    (EXEC, State.RUNNING): frozenset({State.STOPPED}),
    (EXEC, State.STOPPED): frozenset({State.DELETED}),
    (EXEC, State.DELETED): frozenset(),
}

_GONE = "process already finished"  # containerd's words for a kill that found no process
_DELETED_CALLS = ("Start", "Pause", "Resume", "Update")

# The Task calls each state refuses: (kind, state) -> {call: (error kind, words)}. A call
# not listed is allowed. "Kill" is a Kill of the process alone; "Kill all" reaches the
# container's every process (an init that exited may leave orphans behind it).
REFUSALS: dict[tuple[str, State], dict[str, tuple[type[ZvizError], str]]] = {
    (INIT, State.CREATED): {
        "Pause": (FailedPrecondition, "cannot pause task in created state"),
        "Resume": (FailedPrecondition, "cannot resume task in created state"),
    },
    (INIT, State.RUNNING): {
        "Start": (FailedPrecondition, "cannot start a running process"),
        "Delete": (FailedPrecondition, "cannot delete a running process"),
        "Resume": (FailedPrecondition, "cannot resume a running process"),
    },
    (INIT, State.PAUSED): {
        "Start": (FailedPrecondition, "cannot start a paused process"),
        "Delete": (FailedPrecondition, "cannot delete a paused process"),
        "Pause": (FailedPrecondition, "cannot pause a paused container"),
        "Exec": (FailedPrecondition, "cannot exec in a paused state"),
    },
    (INIT, State.STOPPED): {
        "Start": (FailedPrecondition, "cannot start a stopped process"),
        "Pause": (FailedPrecondition, "cannot pause a stopped container"),
        "Resume": (FailedPrecondition, "cannot resume a stopped container"),
        "Update": (FailedPrecondition, "cannot update a stopped container"),
        "Exec": (FailedPrecondition, "cannot exec in a stopped state"),
        "Kill": (NotFound, _GONE),
    },
    (INIT, State.DELETED): {
        **{
            call: (FailedPrecondition, f"cannot {call.lower()} a deleted process")
            for call in _DELETED_CALLS
        },
        "Exec": (FailedPrecondition, "cannot exec in a deleted state"),
        "Delete": (NotFound, "cannot delete a deleted process"),
        "Kill": (NotFound, "cannot kill a deleted process"),
        "Kill all": (NotFound, "cannot kill a deleted process"),
    },
    (EXEC, State.CREATED): {
        # Not NOT_FOUND: CRI reads that as "already exited", which this process is not.
        "Kill": (FailedPrecondition, "process not started: nothing to signal"),
    },
    (EXEC, State.RUNNING): {
        "Start": (FailedPrecondition, "cannot start a running process"),
        "Delete": (FailedPrecondition, "cannot delete a running process"),
    },
    (EXEC, State.STOPPED): {
        "Start": (FailedPrecondition, "cannot start a stopped process"),
        "Kill": (NotFound, _GONE),
    },
    (EXEC, State.DELETED): {
        "Start": (FailedPrecondition, "cannot start a deleted process"),
        "Delete": (NotFound, "cannot delete a deleted process"),
        "Kill": (NotFound, "cannot kill a deleted process"),
    },
}


def refusal(kind: str, state: State, call: str, label: str) -> ZvizError | None:
    """The error CALL gets from a process of KIND in STATE (None: the call may go on)."""
    refused = REFUSALS[(kind, state)].get(call)
    if refused is None:
        return None
    error_kind, words = refused
    return error_kind(f"{words}: {label}")


class Process:
    """One process: its state, its pid once spawned, its exit once reaped."""

    def __init__(self, task, exec_id: str, stdio, spec: dict | None = None) -> None:
        self.task = task
        self.exec_id = exec_id
        self.kind = EXEC if exec_id else INIT
        self.stdio = stdio
        self.spec = spec
        self.state = State.CREATED
        self.pid = 0
        self.exit_status = 0
        self.wait_status = 0
        self.exited_at: float | None = None
        self.exited = asyncio.Event()  # set with STOPPED: what Wait waits for
        self._pidfd = -1
        self._exit_deferred = False
        self._deferred_status: int | None = None

    @property
    def label(self) -> str:
        return f"{self.task.id}/{self.exec_id}" if self.exec_id else self.task.id

    def check(self, call: str) -> None:
        """Raise the error CALL gets in this process's state (REFUSALS), if any."""
        error = refusal(self.kind, self.state, call, self.label)
        if error is not None:
            raise error

    def to(self, state: State) -> None:
        """Move to STATE, which must follow the present one (TRANSITIONS)."""
        if state not in TRANSITIONS[(self.kind, self.state)]:
            # A shim bug, not the caller's: the tables above and the service disagree.
            raise ZvizError(
                f"{self.label}: invalid state transition {self.state.value!r} to {state.value!r}"
            )
        self.state = state

    def status(self) -> int:
        return STATUS[self.state]

    def spawned(self, pid: int, reaper) -> None:
        """Track `pid` (alive, or a zombie we have not reaped yet) until it exits."""
        self.pid = pid
        with contextlib.suppress(OSError):
            # A pidfd pins the process: a signal can never reach a recycled pid.
            self._pidfd = linux.pidfd_open(pid)
        reaper.register(pid, self._on_exit)

    @contextlib.contextmanager
    def exit_deferred(self):
        """Hold this process's exit back until the block ends: its Start runs the core
        off the loop, and the reaper must not publish the exit of a process whose start
        event has not gone out yet (containerd expects /tasks/start before /tasks/exit)."""
        self._exit_deferred = True
        try:
            yield
        finally:
            self._exit_deferred = False
            status, self._deferred_status = self._deferred_status, None
            if status is not None:
                self._on_exit(status)

    def _on_exit(self, wait_status: int) -> None:
        if self._exit_deferred:
            self._deferred_status = wait_status
            return
        if not self._stop():
            return  # already stopped or deleted: nothing more to report (containerd: a no-op)
        self.wait_status = wait_status
        # The one reading of a wait status, the runtime's (state.json, `zviz run`) too.
        self.exit_status = exit_code_from_wait_status(wait_status)
        self.exited_at = time.time()
        self._close_pidfd()
        self.exited.set()
        self.task.process_exited(self)

    def never_ran(self, exit_status: int = 255) -> None:
        """End a process that will never run (its start failed, or it was deleted before):
        its Waits return `exit_status`, and its stdio closes: containerd's client waits for
        end of file on an exec's fifos before it gives up on a Start that failed."""
        self._stop()
        self.exit_status = exit_status
        self.exited_at = time.time()
        self._close_pidfd()
        if self.stdio is not None:
            self.stdio.close()  # idempotent: Delete closes it again
        self.exited.set()

    def _stop(self) -> bool:
        """Into STOPPED from any live state (False: it had stopped or been deleted)."""
        if self.state in (State.STOPPED, State.DELETED):
            return False
        self.to(State.STOPPED)
        return True

    def signal(self, sig: int) -> None:
        self.check("Kill")
        try:
            if self._pidfd >= 0:
                linux.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            raise NotFound(f"{_GONE}: {self.label}") from None

    def close(self) -> None:
        self._close_pidfd()
        if self.stdio is not None:
            self.stdio.close()

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
