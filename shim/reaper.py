"""Exit reaping for the shim daemon, a child subreaper.

Container inits and exec'd processes are (re)parented to the daemon. On SIGCHLD the
loop collects the exited children of its thread (below) and hands each wait status
to whoever registered that pid. An exit that arrives before its pid is registered
(a process that dies while its Create or Start is still returning) is kept and handed
over at registration, so no exit is ever lost.

Runtime code forks and waits for its own helpers (the namespace child, hooks, a
broker's middle process) by pid, in the worker threads of shim.service. Linux keeps a
child on the list of the thread that forked it, and an orphan reparented to this
subreaper goes to the thread group leader, the loop's thread. So the loop reaps with
`__WNOTHREAD`: its own children and every orphan (container inits, exec'd processes,
brokers, loggers), never a worker's child the core is waiting for. The core's waits
need no lock against this reaper, and an exit of one container is reported while
another container's Create is stuck for seconds in a hook. What a worker's call leaves
unreaped is collected by that same thread when the call ends (`collect_thread_children`).
"""

import asyncio
import collections
import logging
import os
import signal
from collections.abc import Callable

from runtime import linux

log = logging.getLogger("shim.reaper")

# wait4's flag for "children of the calling thread only" (linux/wait.h; not in `os`).
WNOTHREAD = 0x20000000

# Exits of pids nobody registered (intermediate spawn processes, helpers): kept only
# this long a list, oldest dropped first.
UNCLAIMED_LIMIT = 1024


class Reaper:
    def __init__(self) -> None:
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._unclaimed: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._leftovers: dict[int, int] = {}  # pid -> pidfd: a worker's children left alive

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Become the subreaper of everything we spawn, and reap on SIGCHLD in `loop`.
        (Signal handlers need the main thread, which is the thread group's leader: the
        thread orphans are reparented to.)"""
        linux.set_child_subreaper()
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler was installed

    def register(self, pid: int, on_exit: Callable[[int], None]) -> None:
        """Call `on_exit(wait_status)` once `pid` exits (at once, if it already has)."""
        status = self._unclaimed.pop(pid, None)
        if status is not None and not _alive(pid):
            on_exit(status)
            return
        # (An unclaimed status of a pid that is alive again belonged to an earlier
        # process with a reused pid: it is not this process's exit.)
        self._callbacks[pid] = on_exit

    def unregister(self, pid: int) -> None:
        self._callbacks.pop(pid, None)

    def reap(self) -> None:
        """On SIGCHLD, in the loop's thread: every exited child of that thread (orphans)."""
        for pid, status in _exited_children_of_this_thread():
            self._collected(pid, status)

    def collect_thread_children(self) -> None:
        """In a worker thread, once a runtime-core call has returned there: what it forked
        and left (nothing in this thread waits for it any more) goes to the loop, the
        exited reaped now, the live watched by pidfd (the loop's reaping cannot see
        them) and reaped through it when they exit."""
        for pid, status in _exited_children_of_this_thread():
            self._loop.call_soon_threadsafe(self._collected, pid, status)
        for pid in _live_children_of_this_thread():
            try:
                pidfd = linux.pidfd_open(pid)
            except OSError:
                continue  # exited meanwhile: this thread's next call reaps it
            self._loop.call_soon_threadsafe(self._watch_leftover, pid, pidfd)

    def _watch_leftover(self, pid: int, pidfd: int) -> None:
        if pid in self._leftovers:  # seen by an earlier call of its thread already
            os.close(pidfd)
            return
        self._leftovers[pid] = pidfd
        self._loop.add_reader(pidfd, self._leftover_exited, pid)

    def _leftover_exited(self, pid: int) -> None:
        try:
            # By pidfd, not pid: the pid may be another process's by now.
            result = os.waitid(os.P_PIDFD, self._leftovers[pid], os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            result = None  # its thread's next call reaped it and handed it over
        self._forget_leftover(pid)
        if result is not None:
            self._collected(pid, _wait_status(result))

    def _forget_leftover(self, pid: int) -> None:
        pidfd = self._leftovers.pop(pid, None)
        if pidfd is not None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)

    def _collected(self, pid: int, status: int) -> None:
        self._forget_leftover(pid)
        callback = self._callbacks.pop(pid, None)
        if callback is None:
            self._unclaimed[pid] = status
            while len(self._unclaimed) > UNCLAIMED_LIMIT:
                self._unclaimed.popitem(last=False)
            return
        try:
            callback(status)
        except Exception:
            log.exception("exit handler of pid %d failed", pid)


def _exited_children_of_this_thread():
    """(pid, wait status) of each exited child of the calling thread, reaped."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG | WNOTHREAD)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def _live_children_of_this_thread() -> list[int]:
    try:
        with open("/proc/thread-self/children") as f:
            return [int(pid) for pid in f.read().split()]
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN
        log.warning("no /proc/thread-self/children: a worker's leftover children stay zombies")
        return []


def _wait_status(result: os.waitid_result) -> int:
    """waitid's report as the wait status waitpid gives."""
    if result.si_code == os.CLD_EXITED:
        return (result.si_status & 0xFF) << 8
    return result.si_status | (0x80 if result.si_code == os.CLD_DUMPED else 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
