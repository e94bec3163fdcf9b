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


def exit_code(wait_status: int) -> int:
    """The shell's view of a wait status: the exit code, or 128 + the killing signal."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return 255


class Reaper:
    def __init__(self) -> None:
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._unclaimed: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Become the subreaper of everything we spawn, and reap on SIGCHLD in `loop`."""
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
        """In a worker thread, once a runtime-core call has returned there: whatever it
        forked and left unreaped (no waiter is left in this thread), handed to the loop."""
        for pid, status in _exited_children_of_this_thread():
            self._loop.call_soon_threadsafe(self._collected, pid, status)

    def _collected(self, pid: int, status: int) -> None:
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
