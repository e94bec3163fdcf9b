"""The processes of one task as the shim sees them: the init (the container's PID 1) and
its exec'd processes, each with its stdio, its state and its exit."""

import asyncio
import contextlib
import os
import time

from api.gen.containerd.types.task import task_pb2
from runtime import linux
from runtime.errors import FailedPrecondition, NotFound
from runtime.state import exit_code_from_wait_status

CREATED = task_pb2.CREATED
RUNNING = task_pb2.RUNNING
STOPPED = task_pb2.STOPPED
PAUSED = task_pb2.PAUSED


class Process:
    """One process: its pid once spawned, its exit once reaped."""

    def __init__(self, task, exec_id: str, stdio, spec: dict | None = None) -> None:
        self.task = task
        self.exec_id = exec_id
        self.stdio = stdio
        self.spec = spec
        self.pid = 0
        self.started = False
        self.exit_status = 0
        self.wait_status = 0
        self.exited_at: float | None = None
        self.exited = asyncio.Event()
        self._pidfd = -1
        self._exit_deferred = False
        self._deferred_status: int | None = None

    @property
    def label(self) -> str:
        return f"{self.task.id}/{self.exec_id}" if self.exec_id else self.task.id

    def status(self) -> int:
        if self.exited.is_set():
            return STOPPED
        if not self.started and self.exec_id:
            return CREATED
        if not self.exec_id:
            if self.task.paused:
                return PAUSED
            if not self.started:
                return CREATED
        return RUNNING

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
        self.exit_status = exit_status
        self.exited_at = time.time()
        self._close_pidfd()
        if self.stdio is not None:
            self.stdio.close()  # idempotent: Delete closes it again
        self.exited.set()

    def signal(self, sig: int) -> None:
        if self.exited.is_set():
            raise NotFound(f"process {self.label} not found: it has already exited")
        if self.pid == 0:
            # Not NOT_FOUND: CRI reads that as "already exited", which this process is not.
            raise FailedPrecondition(f"process {self.label} is not started: nothing to signal")
        try:
            if self._pidfd >= 0:
                linux.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            raise NotFound(f"process {self.label} not found: it has already exited") from None

    def check_deletable(self) -> None:
        if self.started and not self.exited.is_set():
            raise FailedPrecondition(
                f"process {self.label} is still running: kill it before delete"
            )

    def close(self) -> None:
        self._close_pidfd()
        if self.stdio is not None:
            self.stdio.close()

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
