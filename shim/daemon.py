"""The serving daemon: one asyncio loop serving `containerd.task.v2.Task` for every container
of its group, reaping their processes and publishing their events.

It inherits its listening socket from `start` (fd 3) and its stderr is the first
container's `log` fifo. When no container is left it waits `idle_exit_seconds` for
the next one (a warm daemon makes the next container's start cost a fork, not an
interpreter), then exits; it exits at once when idle and containerd has gone away.
Exiting takes the group lock, so no `start` hands out its address meanwhile.
"""

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import socket

from api.ttrpc import Server
from shim import config as shim_config
from shim import log as shim_log
from shim.manager import DAEMON_FD, GroupLock, pending_reservations, release, tidy_state_root
from shim.reaper import Reaper

log = logging.getLogger("shim.daemon")

PUBLISH_DRAIN_SECONDS = 5.0
RESERVATION_RECHECK_SECONDS = 1.0


class Daemon:
    def __init__(self, flags) -> None:
        self.flags = flags
        self.namespace = flags.namespace
        # Daemon settings (idle time) come from the config `start` was given; the profile
        # keys only from the machine-wide file (or the container's own runtime options): a config path in one container's runtime
        # options must not become the profile of every other container in the group.
        self.config = shim_config.load_config(os.environ.get(shim_config.CONFIG_ENV))
        self.machine_config = shim_config.load_config(None)
        self.runtime_root = shim_config.runtime_root(flags.address, flags.namespace)
        path = (
            flags.socket[len("unix://") :] if flags.socket.startswith("unix://") else flags.socket
        )
        self.socket_path = path
        self.group_dir = os.path.dirname(path)
        # Console sockets need short paths (108 bytes), shorter than the group's.
        self.console_dir = os.path.join(shim_config.STATE_ROOT, "c")
        self.reaper = Reaper()
        self.log_sink: shim_log.FifoSink | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.publisher = None
        self.server: Server | None = None
        self.service = None
        self._done: asyncio.Future | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # ---- lifetime ------------------------------------------------------------------

    async def run(self) -> int:
        # The runtime core imports these at a container's first Create: pay now, once.
        import runtime.cgroups  # noqa: F401
        import runtime.security  # noqa: F401
        import runtime.spec  # noqa: F401
        from runtime.security.broker import process as broker_process
        from shim.denials import DenialFeed
        from shim.events import Publisher
        from shim.service import TaskService

        self.loop = asyncio.get_running_loop()
        self._done = self.loop.create_future()
        # Everything imported so far lives as long as the daemon: keep the collector off
        # those pages, so the processes we fork (container setup, brokers) share them
        # instead of copying them on the collector's first pass.
        gc.freeze()
        # The brokers of mediating profiles are forked by a still fork of this daemon,
        # not by the daemon itself, whose busy pages each broker would keep a copy of.
        broker_process.fork_brokers_from_a_forker()
        self.reaper.install(self.loop)
        self.publisher = Publisher(self.flags.ttrpc_address, self.namespace)
        self.publisher.on_disconnect(self._containerd_disconnected)
        self.denials = DenialFeed(self.loop, self.publisher.publish)
        self.service = TaskService(self)
        self.server = Server(stall_timeout=self.config.stall_timeout_seconds)
        self.server.register(self.service)
        listener = socket.socket(fileno=DAEMON_FD)
        await self.server.start(sock=listener)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._terminate, sig)
        log.info("serving %s for namespace %s", self.flags.socket, self.namespace)
        self._arm_idle_timer()  # a start whose Create never comes must not leave us forever
        # Connected now, not at the first event: a containerd that goes away before any
        # container got created must still take this daemon with it.
        self.loop.create_task(self.publisher.connect())
        code = await self._done
        await self._shutdown()
        return code

    def _terminate(self, sig: int) -> None:
        log.info("received %s: exiting", signal.Signals(sig).name)
        self._exit(0)

    def _exit(self, code: int) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(code)

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.shutdown(timeout=2.0)
        await self.publisher.drain(PUBLISH_DRAIN_SECONDS)
        await self.publisher.close()
        # Containers still running (SIGTERM) are left as they are, mounts included:
        # containerd cleans each of them up through `delete` once our socket is gone.

    # ---- containers coming and going -----------------------------------------------

    def task_added(self, container_id: str) -> None:
        self._cancel_idle_timer()

    def task_failed(self, container_id: str) -> None:
        """A Create that failed: containerd will not come back for this start's promise."""
        release(self.group_dir, container_id)
        if not self.service.tasks:
            self._arm_idle_timer()

    def task_removed(self, container_id: str) -> None:
        release(self.group_dir, container_id)
        if not self.service.tasks:
            self._arm_idle_timer()

    def shutdown_requested(self, now: bool) -> None:
        """containerd's Shutdown: a no-op while containers remain."""
        if self.service.tasks:
            return
        if now:
            self.loop.call_soon(self._try_exit, True)
        elif self.config.idle_exit_seconds == 0:
            self.loop.call_soon(self._try_exit)
        else:
            self._arm_idle_timer()

    def _containerd_disconnected(self) -> None:
        if not self.service.tasks:
            log.info("containerd went away and no container is left: exiting")
            self._try_exit(force=True)

    def _arm_idle_timer(self, delay: float | None = None) -> None:
        self._cancel_idle_timer()
        delay = self.config.idle_exit_seconds if delay is None else delay
        self._idle_timer = self.loop.call_later(delay, self._try_exit)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _try_exit(self, force: bool = False) -> None:
        """Exit if idle and no start has promised this daemon to a container still coming."""
        if self.service.tasks or (self._done is not None and self._done.done()):
            return
        with GroupLock(self.group_dir):
            if not force and pending_reservations(self.group_dir, self.service.tasks):
                self._arm_idle_timer(RESERVATION_RECHECK_SECONDS)
                return
            # Under the lock: from here no start can connect to us and get our address.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            shutil.rmtree(self.group_dir, ignore_errors=True)
        # (The runtime core's root stays: the core creates it without retrying, so another
        # daemon's Create could lose a race with its removal. It holds no files.)
        tidy_state_root(self.console_dir, os.path.dirname(self.group_dir))
        self._exit(0)


def serve(flags) -> int:
    if not flags.socket:
        raise ValueError("serve: -socket is required (the daemon is started by `start`)")
    sink = shim_log.setup(flags.namespace, flags.debug)
    # The daemon must not keep the bundle it was started in busy.
    os.chdir("/")
    daemon = Daemon(flags)
    daemon.log_sink = sink
    try:
        return asyncio.run(daemon.run())
    except Exception:
        log.exception("shim daemon failed")
        return 1
