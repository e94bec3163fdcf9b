"""An exec's output reaches its client however late the client's reader opens (issue 16:
in the soak, `ctr task exec ... echo up` once answered 0 with an empty stdout).

containerd's client (containerd/fifo, used by ctr, CRI and nerdctl) opens its reader of
an exec's stdout in a goroutine, a blocking open started before it calls Exec. A starved
client may reach that open only after the process has written and exited; the shim used
to let every writer go by then, so the open waited for a writer that never came, the
client cancelled it after the exit and printed nothing. The shim now opens an output
fifo only once the client's reader is there, as containerd's runc shim does.
"""

import asyncio
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from api.gen.containerd.task.v2 import shim_pb2
from integration.ids import unique_id
from integration.reliability.harness import Harness, _scenario, _wait_gone, plain_bundle

# The stress: execs printing a line, EXEC_WORKERS `ctr task exec` at a time over
# EXEC_CONTAINERS running containers (a few seconds per containerd version).
EXECS = 200
EXEC_WORKERS = 8
EXEC_CONTAINERS = 4
# How long the late reader of the first test waits for the exec to exit before it opens
# anyway (with the fix the exec cannot run before the reader is there).
LATE_READER_GRACE = 2.0


class LateReader:
    """A client's reader of a fifo, opened the way containerd/fifo opens it (a blocking
    open in its own thread) but only once `go` is set or GRACE seconds have passed.
    `cancel()` is containerd/fifo's Close of a reader still opening: it opens the other
    end for a moment, which ends the pending open, and the reader gets nothing."""

    def __init__(self, path: str, grace: float) -> None:
        self.path = path
        self.grace = grace
        self.go = threading.Event()
        self.cancelled = threading.Event()
        self.data = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        self.go.wait(self.grace)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if self.cancelled.is_set():
                return
            while chunk := os.read(fd, 4096):
                self.data += chunk
        finally:
            os.close(fd)

    def cancel(self) -> None:
        self.cancelled.set()
        if self.thread.is_alive():
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader at all (ENXIO): the thread is not in its open

    def result(self, timeout: float = 10) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the reader never finished"
        return self.data


def test_exec_output_reaches_a_reader_that_opens_after_the_exec_exited(
    short_root, make_bundle, tmp_path
):
    """The exec is started as soon as Exec returns; the reader opens once it has exited
    (or after LATE_READER_GRACE, if Exec waits for the reader): the exec's line must
    reach it. Unfixed, the reader's open waited for a writer until it was cancelled."""
    bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    container_id = unique_id("zviz-rel-exec-out")
    stdout = str(tmp_path / "exec-out")
    os.mkfifo(stdout, 0o600)
    reader = LateReader(stdout, LATE_READER_GRACE)

    async def body(harness: Harness, recorder) -> int:
        await harness.create_and_start(bundle, container_id)
        with open(os.path.join(bundle, "config.json")) as f:
            process = dict(json.load(f)["process"], args=["echo", "up"], terminal=False)
        exec_wait = await harness.exec_waited(container_id, "late", process, stdout=stdout)
        await harness.call(
            "Start",
            shim_pb2.StartRequest(id=container_id, exec_id="late"),
            shim_pb2.StartResponse,
        )
        waited = await exec_wait
        assert waited.exit_status == 0
        reader.go.set()
        # Give the reader the time it may need to open and read, then do what ctr does
        # once the exit is reported: delete the exec, cancel a reader still opening.
        await asyncio.sleep(0.5)
        await harness.call(
            "Delete",
            shim_pb2.DeleteRequest(id=container_id, exec_id="late"),
            shim_pb2.DeleteResponse,
        )
        reader.cancel()
        await harness.call("Kill", shim_pb2.KillRequest(id=container_id, signal=signal.SIGKILL))
        await harness.call("Wait", shim_pb2.WaitRequest(id=container_id), shim_pb2.WaitResponse)
        await harness.call(
            "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
        )
        return (
            await harness.call(
                "Connect", shim_pb2.ConnectRequest(id=container_id), shim_pb2.ConnectResponse
            )
        ).shim_pid

    try:
        _wait_gone(_scenario(short_root, body))
    finally:
        reader.cancel()
    assert reader.result() == b"up\n", "the exec's output was lost"


@pytest.mark.containerd
@pytest.mark.every_containerd
@pytest.mark.timeout(120)
def test_many_concurrent_execs_each_deliver_their_output(containerd, busybox_image):
    ids = [unique_id("zviz-rel-exec-many") for _ in range(EXEC_CONTAINERS)]
    for container_id in ids:
        containerd.ctr(
            "run",
            "-d",
            "--runtime",
            "io.containerd.zviz.v2",
            busybox_image,
            container_id,
            "sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 1; done",
        )

    def exec_echo(number: int) -> tuple[int, int, str, str]:
        executed = containerd.ctr(
            "task",
            "exec",
            "--exec-id",
            f"e{number}",
            ids[number % len(ids)],
            "echo",
            f"up {number}",
            check=False,
        )
        return number, executed.returncode, executed.stdout, executed.stderr

    try:
        with ThreadPoolExecutor(EXEC_WORKERS) as pool:
            results = list(pool.map(exec_echo, range(EXECS)))
    finally:
        for container_id in ids:
            containerd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=False)
        for container_id in ids:
            deadline = time.monotonic() + 30
            while containerd.ctr("task", "delete", container_id, check=False).returncode:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            containerd.ctr("container", "delete", container_id, check=False)
    wrong = [r for r in results if (r[1], r[2]) != (0, f"up {r[0]}\n")]
    assert not wrong, f"{len(wrong)} of {EXECS} execs lost or garbled their output: {wrong[:5]}"
