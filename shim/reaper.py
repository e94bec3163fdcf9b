"""Exit reaping for the shim daemon, a child subreaper.

Container inits and exec'd processes are (re)parented to the daemon. On SIGCHLD the
loop collects every exited child with waitpid(-1, WNOHANG) and hands each wait status
to whoever registered that pid. An exit that arrives before its pid is registered
(a process that dies while its Create or Start is still returning) is kept and handed
over at registration, so no exit is ever lost.

Runtime code forks and waits for its own helpers (the namespace child, hooks) by pid.
In the loop thread it is never raced by this reaper (the SIGCHLD handler runs only
when that code has returned to the loop); a container Create runs in a worker thread
(shim.service), and holds the reaper (`held()`) meanwhile: exits that arrive then are
collected when it ends.
"""

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from runtime import linux

log = logging.getLogger("shim.reaper")

# Exits of pids nobody registered (intermediate spawn processes, helpers): kept only
# this long a list, oldest dropped first.
UNCLAIMED_LIMIT = 1024


class Reaper:
    def __init__(self) -> None:
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._unclaimed: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._holders = 0
        self._missed = False

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

    @contextlib.contextmanager
    def held(self):
        """No waitpid(-1) meanwhile (in the loop thread): runtime code in another
        thread waits for its own children by pid, which a reap would steal."""
        self._holders += 1
        try:
            yield
        finally:
            self._holders -= 1
            if self._holders == 0 and self._missed:
                self._missed = False
                self.reap()

    def reap(self) -> None:
        if self._holders:
            self._missed = True
            return
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            callback = self._callbacks.pop(pid, None)
            if callback is None:
                self._unclaimed[pid] = status
                while len(self._unclaimed) > UNCLAIMED_LIMIT:
                    self._unclaimed.popitem(last=False)
                continue
            try:
                callback(status)
            except Exception:
                log.exception("exit handler of pid %d failed", pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
