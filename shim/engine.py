"""The shim's one door into the runtime library: containers, not ttrpc.

The TaskService (shim/service.py) speaks containerd's Task API: requests, events,
process states, the error table. The engine speaks containers: create, start, exec,
kill, delete, pause, resume, update, stats, pids, and what the shim reads of a
container (its PID 1, its user, its cgroup). Nothing else in the daemon calls
`runtime.container` (runwasi's `Engine` draws the same line), so a double of this class
(tests/test_shim_engine_double.py) drives the service's ttrpc logic without root.

Every call that can block runs in a worker thread (shim/workers.py, at most
CORE_THREADS at once) and is awaited: the daemon's loop serves every container of the
pod, and a Create stuck in a hook or a Delete waiting for a process to die must delay
no other container's calls. `off_loop` runs the shim's own blocking work (the
operator's config file, the rootfs mounts) on the same threads.
"""

import asyncio
import contextlib
import functools
from dataclasses import dataclass

from runtime import idmap
from runtime.container import Container
from shim.workers import Workers

# Runtime-core calls running at once (threads are made as needed): each thread mostly
# waits (on a hook, a child's report, a dying process), so the bound is about memory
# and fork storms, not cores. Further calls queue for a free thread.
CORE_THREADS = 16


@dataclass(slots=True)
class Created:
    """What the library made and what the shim reads of it (config.json is not read
    again by the shim: Container.create returns it)."""

    container: object  # the engine's handle; the service passes it back, never opens it
    pid: int
    own_pid_namespace: bool
    init_user: dict | None  # config.json's process.user {"uid", "gid"}
    state_dir: str
    profile: object  # the resolved runtime.security Profile
    annotations: dict


class Engine:
    """The runtime library, for the shim daemon: containers under one state root."""

    def __init__(self, root: str, reaper, threads: int = CORE_THREADS) -> None:
        self.root = root
        self.reaper = reaper
        self._workers = Workers(threads)

    def off_loop(self, call, *args, **kwargs) -> asyncio.Future:
        """CALL(*ARGS, **KWARGS) in a worker thread: await the future for its result.
        (Cancelling the future does not stop the thread.)"""
        return self._workers.submit(
            asyncio.get_running_loop(), functools.partial(self._in_worker, call, args, kwargs)
        )

    def _in_worker(self, call, args, kwargs):
        try:
            return call(*args, **kwargs)
        finally:
            # Nothing of this call waits any more for a child this thread forked.
            self.reaper.collect_thread_children()

    # ---- a container's life ----------------------------------------------------------

    async def create(self, container_id: str, bundle: str, **options) -> Created:
        """Container.create with the shim's OPTIONS (profile policy, host ids, stdio...)."""
        container = await self.off_loop(
            Container.create, self.root, container_id, bundle, detach=True, **options
        )
        pid = container.pid or int(container.state()["pid"])
        return Created(
            container=container,
            pid=pid,
            own_pid_namespace=bool(container.own_pid_namespace),
            init_user=container.init_user,
            state_dir=container.dir,
            profile=container.profile,
            annotations=container.annotations,
        )

    async def start(self, container) -> None:
        await self.off_loop(container.start)

    async def exec(self, container, spec: dict, *, stdio, console_socket) -> int:
        return await self.off_loop(container.exec, spec, stdio=stdio, console_socket=console_socket)

    async def kill(self, container, sig: int, *, all: bool = False) -> None:  # noqa: A002
        await self.off_loop(container.kill, sig, all=all)

    async def delete(self, container, alongside=None) -> None:
        """Kill what is left of the container and remove it (cgroup, state directory).

        ALONGSIDE (the shim's unmount of the rootfs) runs in another worker meanwhile:
        both mostly wait in the kernel (cgroup rmdirs; an RCU grace period for the
        unmount, 2-5 ms here), which the Delete paid one after the other, the unmount on
        the loop. Not when a poststop hook may still read the bundle: the caller then
        does it after. Its failure is the caller's to find (it does it again)."""
        beside = None
        if alongside is not None and not container.data.get("hooks", {}).get("poststop"):
            beside = self.off_loop(alongside)
        try:
            await self.off_loop(container.delete, force=True)
        finally:
            if beside is not None:
                with contextlib.suppress(Exception):
                    await beside

    async def pause(self, container) -> None:
        await self.off_loop(container.pause)

    async def resume(self, container) -> None:
        await self.off_loop(container.resume)

    async def update(self, container, resources: dict) -> None:
        await self.off_loop(container.update, resources)

    async def stats(self, container) -> dict:
        return await self.off_loop(container.stats)

    async def pids(self, container) -> list[int]:
        return await self.off_loop(container.pids)

    # ---- quick reads and records, on the loop ---------------------------------------

    def record_exit(self, container, wait_status: int) -> None:
        """PID 1's exit into state.json (a small file write: well under a millisecond)."""
        container.record_exit(wait_status)

    def cgroup(self, container):
        """The container's cgroup (OOM counts and notifications), or None."""
        return container.cgroup()

    def host_ids(self, pid: int, user: dict | None) -> tuple[int, int] | None:
        """The host (uid, gid) that USER (config.json's process.user) is in the user
        namespace of PID, or None when either is unmapped."""
        user = user or {}
        uid = idmap.host_id(pid, "uid_map", int(user.get("uid", 0)))
        gid = idmap.host_id(pid, "gid_map", int(user.get("gid", 0)))
        return None if uid is None or gid is None else (uid, gid)

    @staticmethod
    def profile_policy(config):
        """The operator's profile policy (shim config CONFIG): Container.create resolves
        it against config.json's annotation io.zviz.profile (security/selection.py)."""
        from runtime.security import selection

        return selection.ProfilePolicy(
            default=config.profile or selection.DEFAULT_PROFILE,
            allowed=config.allowed_annotation_profiles,
            profile_dirs=config.profile_dirs or (),
            mode=config.mode,
            allowed_modes=config.allowed_annotation_modes or (),
        )


def delete_leftover(root: str, container_id: str) -> int:
    """`containerd-shim-zviz-v2 delete`'s slow path: kill and remove a container a dead
    daemon left behind. The pid it had (0: none left)."""
    from runtime import errors

    try:
        container = Container.load(root, container_id)
    except errors.NotFound:
        return 0
    pid = container.pid
    container.delete(force=True)
    return pid
