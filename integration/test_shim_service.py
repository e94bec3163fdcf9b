"""The shim daemon's Task service over its real socket, with real containers, without
containerd: the test plays containerd's two parts, the Task client and the Events
server (a real ttrpc server that records what the shim forwards), so it can check
what `ctr` cannot show: the order and content of every event."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from google.protobuf import empty_pb2

from api import typeurl
from api.gen.containerd.services.ttrpc.events.v1 import events_ttrpc
from api.gen.containerd.task.v2 import shim_pb2
from api.ttrpc import Client, Code, Server, TtrpcError
from integration.ids import tagged, unique_id
from shim import denials as shim_denials

TASK = "containerd.task.v2.Task"
# tagged: the shim keeps its state per namespace, and a leftover of ours must be found
NAMESPACE = tagged("zviz-shim-svc")


class RecordedEvents(events_ttrpc.EventsService):
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.changed = asyncio.Event()

    async def Forward(self, request, context):
        envelope = request.envelope
        assert envelope.namespace == NAMESPACE
        self.events.append((envelope.topic, typeurl.unpack(envelope.event)))
        self.changed.set()
        return empty_pb2.Empty()

    async def wait_for(self, topic: str, count: int = 1, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while sum(1 for t, _ in self.events if t == topic) < count:
                self.changed.clear()
                await self.changed.wait()


class Harness:
    """A started shim daemon, its Task client and the recorded events."""

    def __init__(self, root: str, events_address: str) -> None:
        self.root = root
        self.events_address = events_address
        self.address = ""
        self.client: Client | None = None

    def start(self, bundle: str, container_id: str) -> str:
        env = dict(os.environ, ZVIZ_SHIM_ROOT=self.root, TTRPC_ADDRESS=self.events_address)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "shim.main",
                "-namespace",
                NAMESPACE,
                "-address",
                self.events_address,
                "-publish-binary",
                "/bin/true",
                "-id",
                container_id,
                "start",
            ],
            cwd=bundle,
            env=env,
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        self.address = result.stdout.decode()
        return self.address

    async def call(self, method: str, request, response_type=empty_pb2.Empty):
        if self.client is None:
            self.client = await Client.connect(self.address, timeout=10)
        return await self.client.call(TASK, method, request, response_type, timeout=30)

    async def create_and_start(self, bundle: str, container_id: str) -> None:
        """The shim daemon for CONTAINER_ID started, its task created and started."""
        self.start(bundle, container_id)
        await self.call(
            "Create",
            shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
            shim_pb2.CreateTaskResponse,
        )
        await self.call("Start", shim_pb2.StartRequest(id=container_id), shim_pb2.StartResponse)

    async def exec_waited(
        self, container_id: str, exec_id: str, process: dict, **request
    ) -> asyncio.Task:
        """Exec EXEC_ID (PROCESS, an OCI process; REQUEST: more ExecProcessRequest fields)
        and Wait on it before it is started, as containerd does: the pending Wait."""
        await self.call(
            "Exec",
            shim_pb2.ExecProcessRequest(
                id=container_id,
                exec_id=exec_id,
                spec=typeurl.pack_json(typeurl.OCI_PROCESS_URL, process),
                **request,
            ),
        )
        return asyncio.get_running_loop().create_task(
            self.call(
                "Wait",
                shim_pb2.WaitRequest(id=container_id, exec_id=exec_id),
                shim_pb2.WaitResponse,
            )
        )


@pytest.fixture
def short_root():
    # short: the daemon's socket (root/g/<sha256>/sock) must fit in a sun_path
    root = tempfile.mkdtemp(prefix=tagged("zs") + "-", dir="/tmp")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _fifo(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    os.mkfifo(path, 0o600)
    return path


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _scenario(short_root, body, events_dir: str | None = None):
    """body(harness, recorder) against a shim rooted at SHORT_ROOT, its result; the events
    socket is in EVENTS_DIR (default: SHORT_ROOT): a test that breaks the state root's
    filesystem keeps it apart."""

    async def run():
        recorder = RecordedEvents()
        server = Server()
        server.register(recorder)
        events_address = os.path.join(events_dir or short_root, "events.sock")
        await server.start("unix://" + events_address)
        harness = Harness(short_root, events_address)
        try:
            return await body(harness, recorder)
        finally:
            if harness.client is not None:
                try:
                    await harness.call("Shutdown", shim_pb2.ShutdownRequest(now=True))
                except TtrpcError:
                    pass
                await harness.client.close()
            await server.close()

    return asyncio.run(run())


def _wait_gone(pid: int) -> None:
    for _ in range(400):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"shim daemon {pid} did not exit")


def test_run_to_completion_with_events_in_order(short_root, make_bundle, tmp_path):
    bundle = make_bundle(args=["sh", "-c", "echo out-line; echo err-line >&2; exit 3"])
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    stdout, stderr = _fifo(str(tmp_path), "out"), _fifo(str(tmp_path), "err")
    container_id = unique_id("zviz-shim-svc-run")

    async def body(harness: Harness, recorder: RecordedEvents) -> int:
        harness.start(bundle, container_id)
        out_fd = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
        err_fd = os.open(stderr, os.O_RDONLY | os.O_NONBLOCK)
        created = await harness.call(
            "Create",
            shim_pb2.CreateTaskRequest(
                id=container_id, bundle=bundle, stdout=stdout, stderr=stderr
            ),
            shim_pb2.CreateTaskResponse,
        )
        assert created.pid > 0
        state = await harness.call(
            "State", shim_pb2.StateRequest(id=container_id), shim_pb2.StateResponse
        )
        assert state.status == 1 and state.pid == created.pid  # CREATED
        with pytest.raises(TtrpcError) as raised:
            await harness.call(
                "Create",
                shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
                shim_pb2.CreateTaskResponse,
            )
        assert raised.value.code == Code.ALREADY_EXISTS

        started = await harness.call(
            "Start", shim_pb2.StartRequest(id=container_id), shim_pb2.StartResponse
        )
        assert started.pid == created.pid
        waited = await harness.call(
            "Wait", shim_pb2.WaitRequest(id=container_id), shim_pb2.WaitResponse
        )
        assert waited.exit_status == 3
        os.set_blocking(out_fd, True)
        os.set_blocking(err_fd, True)
        assert _read_all(out_fd) == b"out-line\n"  # EOF: the shim holds no write end
        assert _read_all(err_fd) == b"err-line\n"
        os.close(out_fd)
        os.close(err_fd)
        state = await harness.call(
            "State", shim_pb2.StateRequest(id=container_id), shim_pb2.StateResponse
        )
        assert state.status == 3 and state.exit_status == 3  # STOPPED
        deleted = await harness.call(
            "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
        )
        assert (deleted.pid, deleted.exit_status) == (created.pid, 3)
        await recorder.wait_for("/tasks/delete")
        topics = [topic for topic, _ in recorder.events]
        assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        exit_event = recorder.events[2][1]
        assert (exit_event.container_id, exit_event.id, exit_event.pid, exit_event.exit_status) == (
            container_id,
            container_id,
            created.pid,
            3,
        )
        with pytest.raises(TtrpcError) as raised:
            await harness.call(
                "State", shim_pb2.StateRequest(id=container_id), shim_pb2.StateResponse
            )
        assert raised.value.code == Code.NOT_FOUND
        connected = await harness.call(
            "Connect", shim_pb2.ConnectRequest(id=container_id), shim_pb2.ConnectResponse
        )
        return connected.shim_pid

    shim_pid = _scenario(short_root, body)
    _wait_gone(shim_pid)
    assert not os.path.exists(os.path.join(short_root, "g")), "the daemon left its group directory"


def test_exec_kill_pause_and_stats(short_root, make_bundle, tmp_path):
    bundle = make_bundle(args=["sleep", "1000"])
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    container_id = unique_id("zviz-shim-svc-exec")
    exec_out = _fifo(str(tmp_path), "exec-out")

    async def body(harness: Harness, recorder: RecordedEvents) -> int:
        harness.start(bundle, container_id)
        created = await harness.call(
            "Create",
            shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
            shim_pb2.CreateTaskResponse,
        )
        await harness.call("Start", shim_pb2.StartRequest(id=container_id), shim_pb2.StartResponse)

        process = dict(
            config["process"], args=["sh", "-c", "echo from-exec; exit 4"], terminal=False
        )
        spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, process)
        out_fd = os.open(exec_out, os.O_RDONLY | os.O_NONBLOCK)
        await harness.call(
            "Exec",
            shim_pb2.ExecProcessRequest(id=container_id, exec_id="e1", stdout=exec_out, spec=spec),
        )
        with pytest.raises(TtrpcError) as raised:
            await harness.call(
                "Exec", shim_pb2.ExecProcessRequest(id=container_id, exec_id="e1", spec=spec)
            )
        assert raised.value.code == Code.ALREADY_EXISTS
        exec_started = await harness.call(
            "Start", shim_pb2.StartRequest(id=container_id, exec_id="e1"), shim_pb2.StartResponse
        )
        assert exec_started.pid not in (0, created.pid)
        waited = await harness.call(
            "Wait", shim_pb2.WaitRequest(id=container_id, exec_id="e1"), shim_pb2.WaitResponse
        )
        assert waited.exit_status == 4
        os.set_blocking(out_fd, True)
        assert _read_all(out_fd) == b"from-exec\n"
        os.close(out_fd)
        with pytest.raises(TtrpcError) as raised:
            await harness.call(
                "Kill", shim_pb2.KillRequest(id=container_id, exec_id="e1", signal=signal.SIGKILL)
            )
        assert raised.value.code == Code.NOT_FOUND  # CRI relies on this for a finished exec
        await harness.call(
            "Delete", shim_pb2.DeleteRequest(id=container_id, exec_id="e1"), shim_pb2.DeleteResponse
        )

        pids = await harness.call(
            "Pids", shim_pb2.PidsRequest(id=container_id), shim_pb2.PidsResponse
        )
        assert created.pid in [p.pid for p in pids.processes]
        stats = await harness.call(
            "Stats", shim_pb2.StatsRequest(id=container_id), shim_pb2.StatsResponse
        )
        metrics = typeurl.unpack(stats.stats)
        assert metrics.pids.current >= 1 and metrics.memory.usage.usage > 0

        resources = typeurl.pack_json(
            typeurl.OCI_LINUX_RESOURCES_URL, {"memory": {"limit": 96 << 20}}
        )
        await harness.call(
            "Update", shim_pb2.UpdateTaskRequest(id=container_id, resources=resources)
        )
        stats = await harness.call(
            "Stats", shim_pb2.StatsRequest(id=container_id), shim_pb2.StatsResponse
        )
        assert typeurl.unpack(stats.stats).memory.usage.limit == 96 << 20
        # Update is held to config.json's rules (spec.parse_resources), whole: a refused
        # field beside a valid one is INVALID_ARGUMENT naming it, and nothing is written.
        for nonsense, field in (
            ({"memory": {"limit": 32 << 20, "swappiness": -1}}, "memory.swappiness"),
            ({"memory": {"limit": 64 << 20, "swap": 32 << 20}}, "memory.swap"),
            (
                {"memory": {"limit": 32 << 20}, "hugepageLimits": [{"pageSize": "1TB"}]},
                "hugepageLimits[0].pageSize",
            ),
        ):
            with pytest.raises(TtrpcError) as raised:
                await harness.call(
                    "Update",
                    shim_pb2.UpdateTaskRequest(
                        id=container_id,
                        resources=typeurl.pack_json(typeurl.OCI_LINUX_RESOURCES_URL, nonsense),
                    ),
                )
            assert raised.value.code == Code.INVALID_ARGUMENT, raised.value.message
            assert f"linux.resources.{field}" in raised.value.message
            stats = await harness.call(
                "Stats", shim_pb2.StatsRequest(id=container_id), shim_pb2.StatsResponse
            )
            assert typeurl.unpack(stats.stats).memory.usage.limit == 96 << 20

        await harness.call("Pause", shim_pb2.PauseRequest(id=container_id))
        state = await harness.call(
            "State", shim_pb2.StateRequest(id=container_id), shim_pb2.StateResponse
        )
        assert state.status == 4  # PAUSED
        await harness.call("Resume", shim_pb2.ResumeRequest(id=container_id))
        with pytest.raises(TtrpcError) as raised:
            await harness.call(
                "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
            )
        assert raised.value.code == Code.FAILED_PRECONDITION  # still running

        await harness.call("Kill", shim_pb2.KillRequest(id=container_id, signal=signal.SIGKILL))
        waited = await harness.call(
            "Wait", shim_pb2.WaitRequest(id=container_id), shim_pb2.WaitResponse
        )
        assert waited.exit_status == 137
        await harness.call(
            "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
        )
        await recorder.wait_for("/tasks/delete")
        topics = [topic for topic, _ in recorder.events]
        assert topics == [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/tasks/delete",
        ]
        exec_exit = recorder.events[4][1]
        assert (exec_exit.id, exec_exit.exit_status, exec_exit.pid) == ("e1", 4, exec_started.pid)
        connected = await harness.call(
            "Connect", shim_pb2.ConnectRequest(id=container_id), shim_pb2.ConnectResponse
        )
        return connected.shim_pid

    _wait_gone(_scenario(short_root, body))


def _fd_targets(pid: int) -> dict[int, str]:
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return fds


def test_exec_racing_the_task_delete_leaves_no_fds(short_root, make_bundle, tmp_path):
    """An Exec waits for its logger to get ready; a Delete of the (never started) task that
    lands meanwhile frees the task. The Exec must then fail NOT_FOUND and close the stdio it
    opened, not attach it to a task nobody will ever delete again."""
    bundle = make_bundle(args=["sleep", "1000"])
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    container_id = unique_id("zviz-shim-svc-exec-race")
    started, go = tmp_path / "logger-started", tmp_path / "logger-go"
    logger = tmp_path / "slow-logger"
    # Ready (fd 5 closed, by exiting) only once the test says so.
    logger.write_text(f"#!/bin/sh\ntouch {started}\nwhile [ ! -e {go} ]; do sleep 0.02; done\n")
    logger.chmod(0o755)

    async def body(harness: Harness, recorder: RecordedEvents) -> int:
        harness.start(bundle, container_id)
        shim_pid = (
            await harness.call(
                "Connect", shim_pb2.ConnectRequest(id=container_id), shim_pb2.ConnectResponse
            )
        ).shim_pid
        fds_before = _fd_targets(shim_pid)
        await harness.call(
            "Create",
            shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
            shim_pb2.CreateTaskResponse,
        )
        process = dict(config["process"], args=["true"], terminal=False)
        exec_call = asyncio.get_running_loop().create_task(
            harness.call(
                "Exec",
                shim_pb2.ExecProcessRequest(
                    id=container_id,
                    exec_id="late",
                    stdout=f"binary://{logger}",
                    spec=typeurl.pack_json(typeurl.OCI_PROCESS_URL, process),
                ),
            )
        )
        async with asyncio.timeout(30):
            while not started.exists():
                await asyncio.sleep(0.02)
        await harness.call(
            "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
        )
        go.touch()
        with pytest.raises(TtrpcError) as raised:
            await exec_call
        assert raised.value.code == Code.NOT_FOUND
        # The denial records' source lingers a moment after the daemon's last container
        # (shim/denials.py READER_LINGER_SECONDS); the exec's stdio would stay for good.
        deadline = time.monotonic() + shim_denials.READER_LINGER_SECONDS + 5
        while _fd_targets(shim_pid) != fds_before and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert _fd_targets(shim_pid) == fds_before
        topics = [topic for topic, _ in recorder.events]
        assert "/tasks/exec-added" not in topics
        return shim_pid

    _wait_gone(_scenario(short_root, body))


def test_wait_on_an_exec_whose_start_fails_returns(short_root, make_bundle, tmp_path):
    """ctr calls Wait before Start; when Start fails (no such binary) the Wait must return,
    as runc's shim does, or it stays pending in the daemon for good."""
    bundle = make_bundle(args=["sleep", "1000"])
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    container_id = unique_id("zviz-shim-svc-exec-fails")

    async def body(harness: Harness, recorder: RecordedEvents) -> int:
        await harness.create_and_start(bundle, container_id)
        process = dict(config["process"], args=["/no/such/binary"], terminal=False)
        waiting = await harness.exec_waited(container_id, "missing", process)
        with pytest.raises(TtrpcError):
            await harness.call(
                "Start",
                shim_pb2.StartRequest(id=container_id, exec_id="missing"),
                shim_pb2.StartResponse,
            )
        waited = await waiting  # the harness's call timeout bounds a hang
        assert waited.exit_status != 0
        await harness.call(
            "Delete",
            shim_pb2.DeleteRequest(id=container_id, exec_id="missing"),
            shim_pb2.DeleteResponse,
        )
        await harness.call("Kill", shim_pb2.KillRequest(id=container_id, signal=signal.SIGKILL))
        await harness.call("Wait", shim_pb2.WaitRequest(id=container_id), shim_pb2.WaitResponse)
        await harness.call(
            "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
        )
        connected = await harness.call(
            "Connect", shim_pb2.ConnectRequest(id=container_id), shim_pb2.ConnectResponse
        )
        return connected.shim_pid

    _wait_gone(_scenario(short_root, body))
