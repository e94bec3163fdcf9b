"""The shim's Task service over a double of its engine: the ttrpc logic (which call is
legal in which state, which status code a failure answers with, what a failed Create
reports) without root, containers or containerd. The engine double (FakeEngine) keeps
the engine's interface (shim/engine.py) and makes no process; exits are delivered by
the reaper double, as the real reaper delivers them. integration/test_shim_service.py
drives the same service with real containers."""

import asyncio
import itertools
import signal

import pytest
from google.protobuf import empty_pb2

from api import typeurl
from api.gen.containerd.task.v2 import shim_pb2
from api.gen.containerd.types.task import task_pb2
from api.ttrpc import Code, TtrpcError
from runtime import errors
from shim import config as shim_config
from shim.engine import Created
from shim.error_table import CODES, ttrpc_error
from shim.process import REFUSALS, TRANSITIONS, Process, State
from shim.service import TaskService

# Far above any pid_max: pidfd_open and kill find no such process.
FAKE_PIDS = itertools.count(1 << 30)


class FakeEngine:
    """The engine's interface with nothing behind it: records calls; FAIL[name] raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.fail: dict[str, BaseException] = {}

    def off_loop(self, call, *args, **kwargs) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        try:
            future.set_result(call(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
            future.set_exception(e)
        return future

    def _call(self, name: str, *args):
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    async def create(self, container_id, bundle, **options):
        self._call("create", container_id)
        return Created(
            container=container_id,
            pid=next(FAKE_PIDS),
            own_pid_namespace=True,
            init_user={"uid": 0, "gid": 0},
            state_dir="/nonexistent",
            profile=None,
            annotations={},
        )

    async def start(self, container):
        self._call("start", container)

    async def exec(self, container, spec, *, stdio, console_socket):
        self._call("exec", container)
        return next(FAKE_PIDS)

    async def kill(self, container, sig, *, all=False):  # noqa: A002
        self._call("kill", container, sig, all)

    async def delete(self, container, alongside=None):
        self._call("delete", container)
        if alongside is not None:
            alongside()

    async def pause(self, container):
        self._call("pause", container)

    async def resume(self, container):
        self._call("resume", container)

    async def update(self, container, resources):
        self._call("update", container)

    async def stats(self, container):
        self._call("stats", container)
        return {}

    async def pids(self, container):
        self._call("pids", container)
        return []

    def record_exit(self, container, wait_status):
        self._call("record_exit", container, wait_status)

    def cgroup(self, container):
        return None

    def host_ids(self, pid, user):
        return None

    @staticmethod
    def profile_policy(config):
        return None


class FakeReaper:
    def __init__(self) -> None:
        self.watched: dict[int, object] = {}

    def register(self, pid, on_exit):
        self.watched[pid] = on_exit

    def unregister(self, pid):
        self.watched.pop(pid, None)

    def collect_thread_children(self):
        pass

    def exit(self, pid: int, wait_status: int = 0) -> None:
        self.watched.pop(pid)(wait_status)


class Recorder:
    """Whatever the daemon is told (denials, log sink, events): recorded or ignored."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.fail_watch: BaseException | None = None

    def publish(self, topic, event):
        self.events.append((topic, event))

    def watch(self, *args, **kwargs):
        if self.fail_watch is not None:
            raise self.fail_watch

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class FakeDaemon:
    def __init__(self, loop) -> None:
        self.loop = loop
        self.namespace = "s5states-unit"
        self.runtime_root = "/nonexistent"
        self.console_dir = "/nonexistent"
        self.reaper = FakeReaper()
        self.machine_config = shim_config.ShimConfig()
        self.publisher = self.denials = self.log_sink = Recorder()
        self.removed: list[str] = []

    def task_added(self, container_id):
        pass

    def task_failed(self, container_id):
        self.removed.append(container_id)

    def task_removed(self, container_id):
        self.removed.append(container_id)


def _service() -> tuple[TaskService, FakeEngine, FakeDaemon]:
    daemon = FakeDaemon(asyncio.get_running_loop())
    engine = FakeEngine()
    return TaskService(daemon, engine), engine, daemon


async def _answer(call, request):
    """CALL(REQUEST) as the ttrpc server sees it: a response, or the TtrpcError raised."""
    try:
        return await call(request, None)
    except TtrpcError as e:
        return e


PROCESS = {"args": ["/bin/true"], "cwd": "/"}


async def _task_in(service, state: State, task_id: str = "t1") -> None:
    """Task TASK_ID created and brought to STATE through the service's own calls."""
    await service.Create(shim_pb2.CreateTaskRequest(id=task_id, bundle="/nonexistent"), None)
    if state is State.CREATED:
        return
    await service.Start(shim_pb2.StartRequest(id=task_id), None)
    if state is State.PAUSED:
        await service.Pause(shim_pb2.PauseRequest(id=task_id), None)
    elif state is State.STOPPED:
        service.reaper.exit(service.tasks[task_id].init.pid, 0)


async def _exec_in(service, state: State, task_id: str = "t1", exec_id: str = "e1") -> None:
    await _task_in(service, State.RUNNING, task_id)
    spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, PROCESS)
    await service.Exec(shim_pb2.ExecProcessRequest(id=task_id, exec_id=exec_id, spec=spec), None)
    if state is State.CREATED:
        return
    await service.Start(shim_pb2.StartRequest(id=task_id, exec_id=exec_id), None)
    if state is State.STOPPED:
        service.reaper.exit(service.tasks[task_id].execs[exec_id].pid, 0)


def _requests(task_id: str, exec_id: str = "") -> dict:
    spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, PROCESS)
    resources = typeurl.pack_json(
        "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources", {}
    )
    return {
        "Start": ("Start", shim_pb2.StartRequest(id=task_id, exec_id=exec_id)),
        "Delete": ("Delete", shim_pb2.DeleteRequest(id=task_id, exec_id=exec_id)),
        "Kill": ("Kill", shim_pb2.KillRequest(id=task_id, exec_id=exec_id, signal=15)),
        "Kill all": ("Kill", shim_pb2.KillRequest(id=task_id, signal=9, all=True)),
        "Pause": ("Pause", shim_pb2.PauseRequest(id=task_id)),
        "Resume": ("Resume", shim_pb2.ResumeRequest(id=task_id)),
        "Update": ("Update", shim_pb2.UpdateTaskRequest(id=task_id, resources=resources)),
        "Exec": ("Exec", shim_pb2.ExecProcessRequest(id=task_id, exec_id="new", spec=spec)),
    }


# What containerd's runc shim answers (pkg/process/init_state.go, exec_state.go,
# deleted_state.go; a kill of a finished process: errdefs.ErrNotFound), written out
# here from those files rather than read from shim/process.py's table. OK: the call goes
# through. Kinds: containerd's plain errors are FAILED_PRECONDITION in zviz.
OK = None
INIT_TABLE = {
    State.CREATED: {
        "Start": OK,
        "Delete": OK,
        "Kill": OK,
        "Kill all": OK,
        "Pause": (Code.FAILED_PRECONDITION, "cannot pause task in created state"),
        "Resume": (Code.FAILED_PRECONDITION, "cannot resume task in created state"),
        "Update": OK,
        "Exec": OK,
    },
    State.RUNNING: {
        "Start": (Code.FAILED_PRECONDITION, "cannot start a running process"),
        "Delete": (Code.FAILED_PRECONDITION, "cannot delete a running process"),
        "Kill": OK,
        "Kill all": OK,
        "Pause": OK,
        "Resume": (Code.FAILED_PRECONDITION, "cannot resume a running process"),
        "Update": OK,
        "Exec": OK,
    },
    State.PAUSED: {
        "Start": (Code.FAILED_PRECONDITION, "cannot start a paused process"),
        "Delete": (Code.FAILED_PRECONDITION, "cannot delete a paused process"),
        "Kill": OK,
        "Kill all": OK,
        "Pause": (Code.FAILED_PRECONDITION, "cannot pause a paused container"),
        "Resume": OK,
        "Update": OK,
        "Exec": (Code.FAILED_PRECONDITION, "cannot exec in a paused state"),
    },
    State.STOPPED: {
        "Start": (Code.FAILED_PRECONDITION, "cannot start a stopped process"),
        "Delete": OK,
        "Kill": (Code.NOT_FOUND, "process already finished"),
        "Kill all": OK,  # zviz: the orphans of an init that shared its pid namespace
        "Pause": (Code.FAILED_PRECONDITION, "cannot pause a stopped container"),
        "Resume": (Code.FAILED_PRECONDITION, "cannot resume a stopped container"),
        "Update": (Code.FAILED_PRECONDITION, "cannot update a stopped container"),
        "Exec": (Code.FAILED_PRECONDITION, "cannot exec in a stopped state"),
    },
}
EXEC_TABLE = {
    State.CREATED: {
        "Start": OK,
        "Delete": OK,
        # zviz: nothing to signal yet, and not NOT_FOUND (CRI: "already exited").
        "Kill": (Code.FAILED_PRECONDITION, "process not started"),
    },
    State.RUNNING: {
        "Start": (Code.FAILED_PRECONDITION, "cannot start a running process"),
        "Delete": (Code.FAILED_PRECONDITION, "cannot delete a running process"),
        "Kill": OK,
    },
    State.STOPPED: {
        "Start": (Code.FAILED_PRECONDITION, "cannot start a stopped process"),
        "Delete": OK,
        "Kill": (Code.NOT_FOUND, "process already finished"),
    },
}


def _check(answer, expected, where: str) -> None:
    if expected is OK:
        assert not isinstance(answer, TtrpcError), f"{where}: {answer}"
        return
    code, words = expected
    assert isinstance(answer, TtrpcError), f"{where}: answered {answer!r}"
    assert (answer.code, words in answer.message) == (code, True), f"{where}: {answer}"


@pytest.mark.parametrize("state", list(INIT_TABLE), ids=lambda s: s.value)
@pytest.mark.parametrize("call", list(INIT_TABLE[State.CREATED]))
def test_each_call_on_the_init_in_each_state_answers_as_containerds_runc_shim(state, call):
    async def main():
        service, engine, _ = _service()
        await _task_in(service, state)
        method, request = _requests("t1")[call]
        calls_before = len(engine.calls)
        answer = await _answer(getattr(service, method), request)
        _check(answer, INIT_TABLE[state][call], f"{call} in {state.value}")
        if INIT_TABLE[state][call] is not OK:
            # Refused before the engine was asked anything.
            assert len(engine.calls) == calls_before

    asyncio.run(main())


@pytest.mark.parametrize("state", list(EXEC_TABLE), ids=lambda s: s.value)
@pytest.mark.parametrize("call", list(EXEC_TABLE[State.CREATED]))
def test_each_call_on_an_exec_in_each_state_answers_as_containerds_runc_shim(state, call):
    async def main():
        service, _, _ = _service()
        await _exec_in(service, state)
        method, request = _requests("t1", "e1")[call]
        answer = await _answer(getattr(service, method), request)
        if call == "Kill" and state is State.RUNNING:
            # The double's pids belong to no process: the kill finds it gone, as a
            # real kill would after the process ended, and answers so.
            _check(answer, (Code.NOT_FOUND, "process already finished"), "Kill of e1")
            return
        _check(answer, EXEC_TABLE[state][call], f"{call} of exec in {state.value}")

    asyncio.run(main())


def test_the_tables_cover_every_kind_and_state():
    for kind in ("init", "exec"):
        for state in State:
            if kind == "exec" and state is State.PAUSED:
                continue  # a task pauses as a whole: its init is the one paused
            assert (kind, state) in REFUSALS and (kind, state) in TRANSITIONS


@pytest.mark.parametrize("exec_id", ["", "e1"], ids=["init", "exec"])
def test_a_deleted_process_refuses_every_call_kill_and_delete_as_not_found(exec_id):
    """What an in-flight call finds on a process deleted while it waited
    (containerd's deleted_state.go)."""
    import types

    proc = Process(types.SimpleNamespace(id="t1"), exec_id, None)
    proc.to(State.DELETED)
    assert proc.status() == task_pb2.STOPPED
    calls = ["Start", "Delete", "Kill"] + (
        ["Pause", "Resume", "Update", "Exec"] if not exec_id else []
    )
    for call in calls:
        with pytest.raises(errors.ZvizError) as refused:
            proc.check(call)
        expected = errors.NotFound if call in ("Delete", "Kill") else errors.FailedPrecondition
        assert type(refused.value) is expected, call
        assert "deleted" in str(refused.value)
    with pytest.raises(errors.ZvizError, match="invalid state transition"):
        proc.to(State.RUNNING)


def test_states_move_with_the_calls_and_the_exit():
    async def main():
        service, _, daemon = _service()
        await _task_in(service, State.CREATED)
        init = service.tasks["t1"].init
        seen = [init.state]
        for method, request in [
            ("Start", shim_pb2.StartRequest(id="t1")),
            ("Pause", shim_pb2.PauseRequest(id="t1")),
            ("Resume", shim_pb2.ResumeRequest(id="t1")),
        ]:
            await getattr(service, method)(request, None)
            seen.append(init.state)
        service.reaper.exit(init.pid, signal.SIGKILL)  # killed by a signal: 128 + 9
        seen.append(init.state)
        state = await service.State(shim_pb2.StateRequest(id="t1"), None)
        assert (state.status, state.exit_status) == (task_pb2.STOPPED, 137)
        await service.Delete(shim_pb2.DeleteRequest(id="t1"), None)
        seen.append(init.state)
        assert seen == [
            State.CREATED,
            State.RUNNING,
            State.PAUSED,
            State.RUNNING,
            State.STOPPED,
            State.DELETED,
        ]
        topics = [topic for topic, _ in daemon.publisher.events]
        assert topics == [
            "/tasks/create",
            "/tasks/start",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/tasks/delete",
        ]

    asyncio.run(main())


def test_delete_of_an_unknown_task_is_not_found():
    async def main():
        service, _, _ = _service()
        answer = await _answer(service.Delete, shim_pb2.DeleteRequest(id="nobody"))
        assert answer.code == Code.NOT_FOUND and "nobody" in answer.message

    asyncio.run(main())


def test_kill_of_an_exited_init_is_not_found_and_asks_the_engine_nothing():
    async def main():
        service, engine, _ = _service()
        await _task_in(service, State.STOPPED)
        engine.calls.clear()
        answer = await _answer(service.Kill, shim_pb2.KillRequest(id="t1", signal=15))
        assert answer.code == Code.NOT_FOUND
        assert "process already finished" in answer.message
        assert engine.calls == []

    asyncio.run(main())


def test_exec_after_delete_is_not_found():
    async def main():
        service, _, _ = _service()
        await _task_in(service, State.STOPPED)
        await service.Delete(shim_pb2.DeleteRequest(id="t1"), None)
        spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, PROCESS)
        answer = await _answer(
            service.Exec, shim_pb2.ExecProcessRequest(id="t1", exec_id="late", spec=spec)
        )
        assert answer.code == Code.NOT_FOUND

    asyncio.run(main())


def test_a_deleted_exec_is_gone_and_its_id_free_again():
    async def main():
        service, _, _ = _service()
        await _exec_in(service, State.STOPPED)
        proc = service.tasks["t1"].execs["e1"]
        answer = await service.Delete(shim_pb2.DeleteRequest(id="t1", exec_id="e1"), None)
        assert isinstance(answer, shim_pb2.DeleteResponse)
        assert proc.state is State.DELETED
        again = await _answer(service.Delete, shim_pb2.DeleteRequest(id="t1", exec_id="e1"))
        assert again.code == Code.NOT_FOUND
        spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, PROCESS)
        reused = await service.Exec(
            shim_pb2.ExecProcessRequest(id="t1", exec_id="e1", spec=spec), None
        )
        assert isinstance(reused, empty_pb2.Empty)

    asyncio.run(main())


# ---- the error table at the service's edge (tests/test_shim_errors.py: the table) ----


def _kinds(base=errors.ZvizError):
    yield base
    for sub in base.__subclasses__():
        yield from _kinds(sub)


@pytest.mark.parametrize("kind", sorted(set(_kinds()), key=lambda k: k.__name__))
def test_each_error_kind_answers_its_code_and_its_own_words(kind):
    """Through the service's edge: Update's engine call fails with KIND."""

    async def main():
        service, engine, _ = _service()
        await _task_in(service, State.RUNNING)
        engine.fail["update"] = kind("the words of the failure")
        method, request = _requests("t1")["Update"]
        answer = await _answer(getattr(service, method), request)
        assert isinstance(answer, TtrpcError)
        assert answer.code == CODES[kind] == ttrpc_error(kind("x")).code
        assert answer.message == "the words of the failure"

    asyncio.run(main())


def test_a_failed_create_whose_cleanup_fails_reports_both_the_first_as_the_cause():
    async def main():
        service, engine, daemon = _service()
        daemon.denials.fail_watch = errors.InvalidArgument("watching denials failed")
        engine.fail["delete"] = errors.FailedPrecondition("removing the cgroup failed")
        answer = await _answer(
            service.Create, shim_pb2.CreateTaskRequest(id="t1", bundle="/nonexistent")
        )
        assert answer.code == Code.INVALID_ARGUMENT  # the cause's kind
        assert answer.message == (
            "watching denials failed; cleanup also failed: removing the cgroup failed"
        )
        # The undoing went on past the step that failed: the id is free again.
        assert "t1" not in service.tasks and daemon.removed == ["t1"]

    asyncio.run(main())
