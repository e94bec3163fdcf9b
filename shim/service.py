"""The `containerd.task.v2.Task` service: containerd's calls, answered with the runtime core.

This module speaks ttrpc; the engine (shim/engine.py) speaks containers and is the
only caller of the runtime library. Calls are answered in the daemon's one loop thread,
which serves every container of the pod: nothing that can block runs there. Each
runtime-core call (create, start, exec, kill, delete, pause, resume, update, stats,
pids) and the setup before a create (operator config, rootfs mount) runs in one of the
engine's worker threads: a Create stuck for seconds in a hook, or a Delete waiting up
to 10 s for a process to die, delays no other container's calls, and the reaper
reports exits meanwhile (shim/reaper.py: it never takes a worker's child). Calls that
change one container run one at a time, in arrival order (`_serialized`, the task's
lock), so a Delete never overtakes the Start before it; State, Wait and Connect answer
from the shim's own records at once. Whether a call is legal in a process's state is
decided by the state tables (shim/process.py `check`); a failed call's status code by
the error table (shim/error_table.py), once, around every handler.
"""

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import time

from google.protobuf import empty_pb2

from api import typeurl
from api.gen.containerd.events import task_pb2 as events
from api.gen.containerd.task.v2 import shim_pb2, shim_ttrpc
from api.gen.containerd.types.task import task_pb2 as task_types
from runtime import errors
from shim import config as shim_config
from shim import error_table, mounts
from shim import learn as shim_learn
from shim.engine import Created, Engine
from shim.events import timestamp
from shim.log import CoreLog
from shim.process import Process, State
from shim.stats import metrics_any
from shim.stdio import Stdio

log = logging.getLogger("shim.service")

SHIM_VERSION = "zviz-shim 0.1.0"
OOM_RECHECKS = 20
OOM_RECHECK_SECONDS = 0.05


def _serialized(handler):
    """HANDLER runs once the calls of the same container that came before it have ended
    (the task's lock), and finds the task as they left it: a Delete never overtakes the
    Start before it, a Kill never lands between a Start's checks and its spawn."""

    @functools.wraps(handler)
    async def serialized(self, request, context):
        while True:
            task = self.tasks.get(request.id)
            if task is None:
                return await handler(self, request, context)  # answers NOT_FOUND
            async with task.serial:
                if self.tasks.get(request.id) is task:
                    return await handler(self, request, context)
            # Deleted (and maybe created again) while this call waited: look again.

    return serialized


class Task:
    """One container: its init process, its exec'd processes, what was mounted for it."""

    def __init__(self, service: "TaskService", request: shim_pb2.CreateTaskRequest) -> None:
        self.service = service
        self.id = request.id
        self.bundle = request.bundle
        self.request = request
        self.created: Created | None = None  # what the engine made: set once Create ends
        self.init: Process | None = None
        self.execs: dict[str, Process] = {}
        self.rootfs_mounted = False
        self.oom_watcher = None
        self.cgroup = None
        self.ooms_reported = 0
        self.own_pid_namespace = True
        self.id_range: tuple[int, str] | None = None  # (first host id, holder): shim/idpool.py
        self.learning = None  # a shim.learn.Learning while the container is learnt
        self.learned: asyncio.Task | None = None  # writing its profile once it exited
        self.serial = asyncio.Lock()  # held by each call that changes the container
        self.ending: asyncio.Task | None = None  # orphans killed, then the exit reported

    @property
    def container(self):
        """The engine's handle of this task's container."""
        return self.created.container

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise errors.NotFound(f"exec {exec_id!r} of task {self.id} not found")
        return proc

    def process_exited(self, proc: Process) -> None:
        if proc is self.init:
            # An OOM kill of the init is reported before its exit, as containerd expects.
            self._report_ooms(self.service.daemon.loop)
            try:
                self.service.engine.record_exit(self.container, proc.wait_status)
            except Exception:  # noqa: BLE001 - the exit event below must go out regardless
                log.exception("recording the exit of %s", self.id, extra={"container": self.id})
            if not self.own_pid_namespace:
                # Without its own pid namespace nothing kills the init's orphans for us:
                # they die with it, as under runc, before its exit is reported. Off the
                # loop (signalling the group freezes it), ahead of this task's next call.
                # (Kept: the loop holds only a weak reference to a task.)
                self.ending = self.service.daemon.loop.create_task(
                    self._end_orphans_then_report(proc)
                )
                self._learn_after_exit()  # queued behind the orphans' end (a FIFO lock)
                return
            self._report_exit(proc)
            self._learn_after_exit()
            return
        self._report_exit(proc)

    def _learn_after_exit(self) -> None:
        """A learnt container's profile is written once its init has exited (nothing of it
        runs any more), ahead of its next call: a Delete finds the file written."""
        if self.learning is not None:
            self.learned = self.service.daemon.loop.create_task(self._write_learned())

    async def _write_learned(self) -> None:
        async with self.serial:
            await self.service.write_learned(self)

    async def _end_orphans_then_report(self, proc: Process) -> None:
        async with self.serial:
            with contextlib.suppress(Exception):
                await self.service.engine.kill(self.container, signal.SIGKILL, all=True)
            self._report_exit(proc)

    def _report_exit(self, proc: Process) -> None:
        self.service.publish(
            "/tasks/exit",
            events.TaskExit(
                container_id=self.id,
                id=proc.exec_id or self.id,
                pid=proc.pid,
                exit_status=proc.exit_status,
                exited_at=timestamp(proc.exited_at),
            ),
        )

    def watch_oom(self, loop) -> None:
        try:
            self.cgroup = self.service.engine.cgroup(self.container)
            self.oom_watcher = self.cgroup.oom_watcher() if self.cgroup is not None else None
            self.ooms_reported = self.cgroup.oom_kill_count() if self.cgroup is not None else 0
        except Exception as e:  # noqa: BLE001 - a task without OOM events still runs
            log.warning("no OOM events for %s: %s", self.id, e, extra={"container": self.id})
            return
        if self.oom_watcher is None:
            return
        loop.add_reader(self.oom_watcher.fileno(), self._oom_readable, loop)

    def _oom_readable(self, loop) -> None:
        try:
            self.oom_watcher.read()  # drains the notification; counting is done below
        except OSError:
            self.stop_oom_watch(loop)
            return
        self._report_ooms(loop, OOM_RECHECKS)

    def _report_ooms(self, loop, rechecks: int = 0) -> bool:
        """Publish /tasks/oom for OOM kills not reported yet. The kernel notifies as the OOM
        starts and counts the kill a moment later, so a notification with nothing counted
        yet is looked at again shortly."""
        if self.cgroup is None:
            return False
        try:
            kills = self.cgroup.oom_kill_count()
        except (OSError, errors.ZvizError):
            return False
        if kills > self.ooms_reported:
            new, self.ooms_reported = kills - self.ooms_reported, kills
            log.info("OOM kill in task %s", self.id, extra={"container": self.id})
            self.service.publish("/tasks/oom", events.TaskOOM(container_id=self.id))
            self.service.daemon.denials.limit_hit(self.id, "memory", new, self.cgroup)
            return True
        if rechecks > 0:
            loop.call_later(OOM_RECHECK_SECONDS, self._report_ooms, loop, rechecks - 1)
        return False

    def stop_oom_watch(self, loop) -> None:
        if self.oom_watcher is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.oom_watcher.fileno())
            with contextlib.suppress(Exception):
                self.oom_watcher.close()
            self.oom_watcher = None

    def unmount_rootfs(self) -> None:
        """The rootfs mounted at Create, detached (a blocking call: the kernel waits for an
        RCU grace period, 2-5 ms here)."""
        if self.rootfs_mounted:
            mounts.unmount_all(mounts.rootfs_path(self.bundle))
            self.rootfs_mounted = False

    def release(self, loop) -> None:
        """Free what the shim holds for this task (not the container itself)."""
        self.stop_oom_watch(loop)
        for proc in [self.init, *self.execs.values()]:
            if proc is not None:
                proc.close()
        self.unmount_rootfs()
        if self.id_range is not None:
            from shim import idpool

            idpool.release(*self.id_range)
            self.id_range = None


class TaskService(shim_ttrpc.TaskService):
    def __init__(self, daemon, engine: Engine | None = None) -> None:
        self.daemon = daemon
        self.namespace = daemon.namespace
        self.reaper = daemon.reaper
        self.engine = engine or Engine(daemon.runtime_root, daemon.reaper)
        self.tasks: dict[str, Task] = {}
        debug = log.isEnabledFor(logging.DEBUG)
        for name in self.METHODS:
            handler = _answered(getattr(self, name))
            setattr(self, name, _timed(name, handler) if debug else handler)

    # ---- helpers -------------------------------------------------------------------

    def publish(self, topic: str, event) -> None:
        self.daemon.publisher.publish(topic, event)

    def _task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None or task.init is None or task.created is None:  # or still creating
            raise errors.NotFound(f"task {task_id} not found")
        return task

    def _operator_config(self, options) -> shim_config.ShimConfig:
        """The operator's profile and id keys for one container: the runtime options'
        config, each key it leaves unset from the machine-wide file."""
        config = self.daemon.machine_config
        if options is not None and options.type_url:
            path = shim_config.decode_runtime_options(options.SerializeToString())
            if path:
                try:
                    config = shim_config.load_config(path).over(config)
                except shim_config.ConfigError as e:
                    raise errors.InvalidArgument(str(e)) from e
        return config

    def _own_id_range(self, task: Task, config: shim_config.ShimConfig):
        """Container.create's host_ids when the operator asks for per-container ranges
        (shim/idpool.py), else None (the profile's shared range). The core calls it only
        when the container's ids would be the profile's range (its own user namespace, no
        mapping in config.json: security.maps_profile_ids); it reserves a range and
        returns the profile with that range's host ids."""
        if (config.id_ranges or "shared") == "shared":
            return None
        return functools.partial(self._reserve_id_range, task, config)

    def _reserve_id_range(self, task: Task, config: shim_config.ShimConfig, profile):
        from dataclasses import replace

        from shim import idpool

        if profile.id_count > idpool.RANGE_SIZE:
            raise errors.InvalidArgument(
                f"profile {profile.name}: id_count {profile.id_count} is more than a pool range "
                f"({idpool.RANGE_SIZE})"
            )
        holder = f"{self.namespace}/{task.id}"
        start = idpool.reserve(
            config.id_pool_first or shim_config.DEFAULT_ID_POOL_FIRST,
            config.id_pool_ranges or shim_config.DEFAULT_ID_POOL_RANGES,
            holder,
        )
        task.id_range = (start, holder)
        return replace(profile, host_uid=start, host_gid=start)

    def _give_stdio(self, stdio: Stdio, pid: int, user: dict | None, label: str) -> None:
        """Hand the process's stdio pipes and fifos to the host ids its user (config.json's
        process.user) has in the user namespace of `pid`, the container's PID 1."""
        try:
            ids = self.engine.host_ids(pid, user)
            if ids is not None:
                stdio.give_to(*ids)
        except OSError as e:
            # The process still has its fds; only reopening them (/dev/stdout) fails.
            log.warning("%s: stdio not handed to the process's user: %s", label, e)

    # ---- task lifecycle ------------------------------------------------------------

    def _prepare_create(self, task: Task):
        """What the shim decides before the core creates, off the loop (it reads the
        operator's config file, mounts the rootfs): (profile policy, config)."""
        request = task.request
        config = self._operator_config(request.options if request.HasField("options") else None)
        profile = self.engine.profile_policy(config)
        # The bundle keeps containerd's mode (0700, or 0710 to the mapped root's group):
        # PID 1 never walks it (the core chdirs into the rootfs as host root and
        # clones it with open_tree), and other host users must not reach the rootfs.
        if request.rootfs:
            mounts.mount_all(
                request.rootfs,
                mounts.rootfs_path(request.bundle),
                functools.partial(_spec_linux, request.bundle),
            )
            task.rootfs_mounted = True
        if shim_learn.may_learn(config):
            task.learning = shim_learn.prepare(
                task.id,
                self.namespace,
                request.bundle,
                request.rootfs,
                profile,
                config.learn_dir,
            )
            if task.learning is not None:
                profile = task.learning.profile_file
        return profile, config

    async def Create(self, request, context):
        if request.id in self.tasks:
            raise errors.AlreadyExists(f"task {request.id} already exists")
        if request.checkpoint:
            raise errors.NotImplementedByZviz("checkpoint/restore is not supported by zviz")
        task = Task(self, request)
        self.tasks[request.id] = task  # claims the id while we await below
        loop = self.daemon.loop
        creating = None
        try:
            # config.json is read by the core alone (Container.create): profile, ids,
            # and what the shim needs of it come back from the engine.
            profile, config = await self.engine.off_loop(self._prepare_create, task)
            self.daemon.log_sink.add_bundle(request.id, request.bundle)
            stdio = await Stdio.open(
                request.stdin,
                request.stdout,
                request.stderr,
                terminal=request.terminal,
                container_id=request.id,
                namespace=self.namespace,
                console_dir=self.daemon.console_dir,
                reaper=self.reaper,
            )
            task.init = Process(task, "", stdio)
            creating = asyncio.ensure_future(
                self.engine.create(
                    request.id,
                    request.bundle,
                    profile=profile,
                    host_ids=self._own_id_range(task, config),
                    allow_host_network=bool(config.allow_host_network),
                    host_network_switch=shim_config.HOST_NETWORK_SWITCH,
                    cluster_network=config.cluster_network(),
                    stdio=tuple(stdio.child),
                    console_socket=stdio.console_socket,
                    **({"log": CoreLog(request.id)} if log.isEnabledFor(logging.DEBUG) else {}),
                )
            )
            # Shielded: a Create cancelled meanwhile (containerd gone) must still learn
            # what the core made, to undo it below.
            task.created = await asyncio.shield(creating)
            pid = task.created.pid
            task.own_pid_namespace = task.created.own_pid_namespace
            if request.terminal:
                stdio.receive_console()
            self._give_stdio(stdio, pid, task.created.init_user, task.id)
            stdio.spawned()
            task.watch_oom(loop)
            self.daemon.denials.watch(
                task.id,
                task.created.state_dir,
                pid,
                task.created.profile,
                task.created.annotations,
                cgroup=task.cgroup,
            )
            if task.learning is not None:
                await self.engine.off_loop(task.learning.created)
        except BaseException as failure:
            await self._undo_create(task, creating, failure)
            raise
        self.daemon.task_added(request.id)
        self.publish(
            "/tasks/create",
            events.TaskCreate(
                container_id=request.id,
                bundle=request.bundle,
                rootfs=request.rootfs,
                io=events.TaskIO(
                    stdin=request.stdin,
                    stdout=request.stdout,
                    stderr=request.stderr,
                    terminal=request.terminal,
                ),
                checkpoint=request.checkpoint,
                pid=pid,
            ),
        )
        # Watched only now: an init that died while the core created it (its exit kept
        # by the reaper meanwhile) is reported after /tasks/create, not before.
        task.init.spawned(pid, self.reaper)
        log.info("created task %s (pid %d)", request.id, pid, extra={"container": request.id})
        return shim_pb2.CreateTaskResponse(pid=pid)

    async def _undo_create(self, task: Task, creating, failure: BaseException) -> None:
        """Remove what a failed Create made. FAILURE stays the error Create answers with;
        a step of the undoing that fails too is carried beside it (the error table names
        both), and the steps after it still run."""
        self.tasks.pop(task.id, None)
        self.daemon.denials.unwatch(task.id)
        if task.created is None and creating is not None:
            with contextlib.suppress(BaseException):  # its failure is FAILURE itself
                task.created = await creating
        if task.created is not None:
            try:
                await self.engine.delete(task.container)
            except BaseException as e:  # noqa: BLE001 - carried beside the failure
                log.warning("%s: undoing the create: %s", task.id, e, extra={"container": task.id})
                errors.carry_cleanup_error(failure, e)
        try:
            task.release(self.daemon.loop)
        except Exception as e:  # noqa: BLE001 - carried beside the failure
            log.warning(
                "%s: releasing after the create: %s", task.id, e, extra={"container": task.id}
            )
            errors.carry_cleanup_error(failure, e)
        self.daemon.log_sink.remove(task.id)
        self.daemon.task_failed(task.id)

    @_serialized
    async def Start(self, request, context):
        task = self._task(request.id)
        proc = task.process(request.exec_id)
        proc.check("Start")
        if proc is task.init:
            # A workload that exits at once is reaped while the core still starts it:
            # its exit goes out after /tasks/start.
            with proc.exit_deferred():
                await self.engine.start(task.container)
                proc.to(State.RUNNING)
                self.publish("/tasks/start", events.TaskStart(container_id=task.id, pid=proc.pid))
            return shim_pb2.StartResponse(pid=proc.pid)
        if task.init.state in (State.STOPPED, State.DELETED):
            # The init exited after this exec was added: it will never run, and the Wait
            # containerd made before this Start must end with it (see below).
            proc.never_ran()
            raise errors.FailedPrecondition(
                f"task {task.id} has exited: cannot start exec {proc.exec_id}"
            )
        stdio = proc.stdio
        if stdio is None:
            raise errors.FailedPrecondition(f"exec {proc.label} is still being added")
        try:
            self._give_stdio(stdio, task.init.pid, proc.spec.get("user"), proc.label)
            pid = await self.engine.exec(
                task.container,
                proc.spec,
                stdio=tuple(stdio.child),
                console_socket=stdio.console_socket,
            )
            self.daemon.denials.exec_started(task.id, pid)
            if stdio.terminal:
                stdio.receive_console()
        except BaseException:
            # ctr Waits before it Starts: a start that failed is this process's end, or
            # that Wait would stay pending for good (runc's shim ends it the same way).
            proc.never_ran()
            raise
        stdio.spawned()
        proc.to(State.RUNNING)
        self.publish(
            "/tasks/exec-started",
            events.TaskExecStarted(container_id=task.id, exec_id=proc.exec_id, pid=pid),
        )
        # Watched only now: an exit the reaper kept while the core spawned the process
        # goes out after /tasks/exec-started.
        proc.spawned(pid, self.reaper)
        return shim_pb2.StartResponse(pid=pid)

    @_serialized
    async def Delete(self, request, context):
        task = self._task(request.id)
        proc = task.process(request.exec_id)
        proc.check("Delete")
        if proc.stdio is not None and proc.state is State.STOPPED:
            # No other Delete of this container runs meanwhile (_serialized): the task
            # and the process are still as found above.
            await proc.stdio.hand_over_output()
        if proc is not task.init:
            proc.close()
            proc.to(State.DELETED)
            del task.execs[proc.exec_id]
            return _delete_response(proc)
        for exec_proc in task.execs.values():
            if exec_proc.state is State.RUNNING:
                with contextlib.suppress(errors.ZvizError):
                    exec_proc.signal(signal.SIGKILL)
            elif exec_proc.state is State.CREATED:
                exec_proc.never_ran()  # added, never started: its Waits end with the task
        # Learnt and never exited (never started): its profile is written now.
        await self.write_learned(task)
        # Its last records go out before the state dir (and its denials.jsonl) does.
        self.daemon.denials.unwatch(task.id)
        never_started = proc.state is State.CREATED
        if never_started:
            # The core kills and reaps it itself (or the reaper keeps its exit unclaimed):
            # no exit event for a process that never ran, and a later process may get
            # the pid.
            self.reaper.unregister(proc.pid)
        try:
            # The rootfs's unmount beside the core's delete (see Engine.delete); one that
            # failed or did not run leaves rootfs_mounted set, and release() does it.
            await self.engine.delete(
                task.container, alongside=task.unmount_rootfs if task.rootfs_mounted else None
            )
        finally:
            task.release(self.daemon.loop)
            self.daemon.log_sink.remove(task.id)
            del self.tasks[task.id]
            self.daemon.task_removed(task.id)
        if never_started:
            proc.never_ran(128 + signal.SIGKILL)  # wakes any Wait
        proc.to(State.DELETED)
        self.publish(
            "/tasks/delete",
            events.TaskDelete(
                container_id=task.id,
                pid=proc.pid,
                exit_status=proc.exit_status,
                exited_at=timestamp(proc.exited_at),
                id=task.id,
            ),
        )
        log.info("deleted task %s", task.id, extra={"container": task.id})
        return _delete_response(proc)

    async def write_learned(self, task: Task) -> None:
        """A learnt container's profile into learn_dir (shim/learn.py), once, named in one
        log line; its denial records end here (nothing of it runs any more). A failure is
        logged, never the caller's. Called holding the task's lock."""
        learning, task.learning = task.learning, None
        if learning is None:
            return
        await asyncio.sleep(shim_learn.DRAIN_SECONDS)  # its last calls' records
        self.daemon.denials.unwatch(task.id)
        try:
            path = await self.engine.off_loop(
                learning.finish, task.created.state_dir, self.daemon.denials.kernel_unavailable
            )
        except Exception:  # noqa: BLE001 - the container lives on (or is deleted) regardless
            log.exception("learning the profile of %s", task.id, extra={"container": task.id})
            return
        log.info("learned profile of %s written to %s", task.id, path, extra={"container": task.id})

    async def Exec(self, request, context):
        task = self._task(request.id)
        if not request.exec_id:
            raise errors.InvalidArgument("exec: exec_id is required")
        if request.exec_id in task.execs:
            raise errors.AlreadyExists(f"exec {request.exec_id} of task {task.id} already exists")
        task.init.check("Exec")
        try:
            spec = typeurl.unpack_json(request.spec)
        except Exception as e:
            raise errors.InvalidArgument(f"exec {request.exec_id}: spec: {e}") from e
        if not isinstance(spec, dict) or not spec.get("args"):
            raise errors.InvalidArgument(f"exec {request.exec_id}: spec: process.args is empty")
        placeholder = Process(task, request.exec_id, None, spec)
        task.execs[request.exec_id] = placeholder  # claims the exec id while we await
        try:
            stdio = await Stdio.open(
                request.stdin,
                request.stdout,
                request.stderr,
                terminal=request.terminal,
                container_id=task.id,
                namespace=self.namespace,
                console_dir=self.daemon.console_dir,
                reaper=self.reaper,
                copy_output=True,
            )
        except BaseException:
            if task.execs.get(request.exec_id) is placeholder:
                del task.execs[request.exec_id]
            raise
        if (
            self.tasks.get(task.id) is not task
            or task.execs.get(request.exec_id) is not placeholder
        ):
            # The task (or this exec) was deleted while its stdio opened: nobody would
            # ever close what was opened for it.
            stdio.close()
            raise errors.NotFound(
                f"task {task.id} was deleted while exec {request.exec_id} was added"
            )
        placeholder.stdio = stdio
        self.publish(
            "/tasks/exec-added",
            events.TaskExecAdded(container_id=task.id, exec_id=request.exec_id),
        )
        return empty_pb2.Empty()

    # ---- queries -------------------------------------------------------------------

    async def State(self, request, context):
        task = self._task(request.id)
        proc = task.process(request.exec_id)
        stdio = proc.stdio
        response = shim_pb2.StateResponse(
            id=task.id,
            bundle=task.bundle,
            pid=proc.pid,
            status=proc.status(),
            stdin=stdio.stdin if stdio else "",
            stdout=stdio.stdout if stdio else "",
            stderr=stdio.stderr if stdio else "",
            terminal=stdio.terminal if stdio else False,
            exit_status=proc.exit_status,
            exec_id=proc.exec_id,
        )
        if proc.exited_at is not None:
            response.exited_at.CopyFrom(timestamp(proc.exited_at))
        return response

    async def Wait(self, request, context):
        task = self._task(request.id)
        proc = task.process(request.exec_id)
        await proc.exited.wait()
        return shim_pb2.WaitResponse(
            exit_status=proc.exit_status, exited_at=timestamp(proc.exited_at)
        )

    @_serialized
    async def Pids(self, request, context):
        task = self._task(request.id)
        by_pid = {p.pid: p.exec_id for p in task.execs.values() if p.pid}
        processes = []
        for pid in await self.engine.pids(task.container):
            info = task_types.ProcessInfo(pid=pid)
            if pid in by_pid:
                # containerd shows the exec id of an exec'd process from this detail.
                info.info.CopyFrom(_process_details(by_pid[pid]))
            processes.append(info)
        return shim_pb2.PidsResponse(processes=processes)

    @_serialized
    async def Stats(self, request, context):
        task = self._task(request.id)
        stats = await self.engine.stats(task.container)
        return shim_pb2.StatsResponse(stats=metrics_any(stats))

    async def Connect(self, request, context):
        task = self.tasks.get(request.id)
        task_pid = task.init.pid if task is not None and task.init is not None else 0
        return shim_pb2.ConnectResponse(
            shim_pid=os.getpid(), task_pid=task_pid, version=SHIM_VERSION
        )

    # ---- control -------------------------------------------------------------------

    @_serialized
    async def Kill(self, request, context):
        task = self._task(request.id)
        proc = task.process(request.exec_id)
        if proc is not task.init:
            proc.signal(request.signal)
            return empty_pb2.Empty()
        call = "Kill all" if request.all else "Kill"
        proc.check(call)
        try:
            await self.engine.kill(task.container, request.signal, all=request.all)
        except errors.FailedPrecondition:
            # The core found PID 1 gone: only this loop reaps it, so its exit is
            # recorded by now; answered as for an init known to have exited.
            proc.check(call)
            raise
        return empty_pb2.Empty()

    @_serialized
    async def Pause(self, request, context):
        task = self._task(request.id)
        task.init.check("Pause")
        await self.engine.pause(task.container)
        task.init.to(State.PAUSED)
        self.publish("/tasks/paused", events.TaskPaused(container_id=task.id))
        return empty_pb2.Empty()

    @_serialized
    async def Resume(self, request, context):
        task = self._task(request.id)
        task.init.check("Resume")
        await self.engine.resume(task.container)
        task.init.to(State.RUNNING)
        self.publish("/tasks/resumed", events.TaskResumed(container_id=task.id))
        return empty_pb2.Empty()

    async def Checkpoint(self, request, context):
        raise errors.NotImplementedByZviz(
            "checkpoint is not supported by zviz: it would need CRIU inside the sandbox"
        )

    async def ResizePty(self, request, context):
        task = self._task(request.id)
        proc = task.process(request.exec_id)
        if proc.stdio is None:
            raise errors.FailedPrecondition(f"process {proc.label} has no stdio yet")
        proc.stdio.resize(request.width, request.height)
        return empty_pb2.Empty()

    async def CloseIO(self, request, context):
        task = self._task(request.id)
        proc = task.process(request.exec_id)
        if request.stdin and proc.stdio is not None:
            proc.stdio.close_stdin()
        return empty_pb2.Empty()

    @_serialized
    async def Update(self, request, context):
        task = self._task(request.id)
        task.init.check("Update")
        try:
            resources = typeurl.unpack_json(request.resources)
        except Exception as e:
            raise errors.InvalidArgument(f"update: resources: {e}") from e
        await self.engine.update(task.container, resources)
        return empty_pb2.Empty()

    async def Shutdown(self, request, context):
        self.daemon.shutdown_requested(now=request.now)
        return empty_pb2.Empty()


def _answered(handler):
    """HANDLER, its failures answered through the error table (shim/error_table.py)."""

    @functools.wraps(handler)
    async def answered(request, context):
        try:
            return await handler(request, context)
        except errors.ZvizError as e:
            raise error_table.ttrpc_error(e) from e
        except Exception as e:
            if not errors.cleanup_errors(e):
                raise  # the ttrpc server's own mapping (FileNotFoundError, timeouts...)
            raise error_table.ttrpc_error(e) from e

    return answered


def _timed(name: str, handler):
    """With -debug: log how long each call took (where a container's start time goes)."""

    async def timed(request, context):
        started = time.monotonic()
        try:
            return await handler(request, context)
        finally:
            log.debug(
                "%s %s: %.1f ms",
                name,
                getattr(request, "id", ""),
                (time.monotonic() - started) * 1000,
            )

    return timed


def _delete_response(proc: Process) -> shim_pb2.DeleteResponse:
    return shim_pb2.DeleteResponse(
        pid=proc.pid,
        exit_status=proc.exit_status,
        exited_at=timestamp(proc.exited_at),
    )


def _process_details(exec_id: str):
    """containerd.runc.v1.ProcessDetails{exec_id=1}: the type `ctr task ps` shows exec ids from."""
    from google.protobuf import any_pb2

    from shim import wire

    return any_pb2.Any(
        type_url="containerd.runc.v1.ProcessDetails", value=wire.field_bytes(1, exec_id.encode())
    )


def _spec_linux(bundle: str) -> dict:
    """config.json's linux section, for the rootfs mounts' id-mapping options alone."""
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise errors.InvalidArgument(f"{bundle}/config.json: {e}") from e
    linux = spec.get("linux") if isinstance(spec, dict) else None
    return linux if isinstance(linux, dict) else {}
