"""An exec's output reaches its client however late the client's reader opens (issue 16:
in the soak, `ctr task exec ... echo up` once answered 0 with an empty stdout).

containerd's client (containerd/fifo, used by ctr, CRI and nerdctl) opens its reader of
an exec's stdout in a goroutine, a blocking open started before it calls Exec. Right after
it deleted the process, it cancels that reader if the goroutine has not reported it open,
and prints nothing. A starved client lost its output two ways: its open started only
after the process had written and exited (the shim had let every writer go, so the open
waited for a writer that never came), or the open returned but the goroutine had not run
again by the Delete. The shim now opens an output fifo only once the client's reader is
there (as containerd's runc shim does), and its Delete waits until the client has taken
the output left in the fifo (runc's shim does not: it lost 4 of 400 such execs here).
"""

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
    """A client's reader of a fifo as containerd/fifo makes one: a blocking open in its
    own thread, then the reader counts as open. Here the open starts only once `go` is
    set (or after `open_grace` seconds), and the reader counts as open only `mark_after`
    seconds after the open returned: a goroutine not run for that long.

    `cancel()` is containerd/fifo's Close of a reader not open yet, as ctr does right
    after it deleted the process: a reader still in its open is ended by opening the
    other end for a moment, and one not counted open yet drops its fd. Either way it
    reads nothing.
    """

    def __init__(
        self,
        path: str,
        open_grace: float = 0.0,
        mark_after: float = 0.0,
        read_pause: float = 0.0,
    ) -> None:
        self.path = path
        self.open_grace = open_grace
        self.mark_after = mark_after
        self.read_pause = read_pause  # between two reads: a slow client
        self.go = threading.Event()
        if not open_grace:
            self.go.set()
        self.lock = threading.Lock()
        self.opened = False
        self.cancelled = False
        self.data = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        self.go.wait(self.open_grace)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            time.sleep(self.mark_after)
            with self.lock:
                if self.cancelled:
                    return
                self.opened = True
            while chunk := os.read(fd, 4096):
                self.data += chunk
                time.sleep(self.read_pause)
        finally:
            os.close(fd)

    def cancel(self) -> None:
        with self.lock:
            if self.opened:
                return
            self.cancelled = True
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader at all (ENXIO): the thread is past its open

    def result(self, timeout: float = 10) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the reader never finished"
        return self.data


def _exec_output_read_by(
    short_root, make_bundle, tmp_path, make_reader, args=("echo", "up"), terminal=False
) -> bytes:
    """What a client reader (make_reader(fifo path)) got of an exec of ARGS, the client
    doing what ctr does: Exec, Wait, Start, the exit, Delete, cancel the reader."""
    bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    container_id = unique_id("zviz-rel-exec-out")
    stdout = str(tmp_path / "exec-out")
    os.mkfifo(stdout, 0o600)
    reader = make_reader(stdout)

    async def body(harness: Harness, recorder) -> int:
        await harness.create_and_start(bundle, container_id)
        with open(os.path.join(bundle, "config.json")) as f:
            process = dict(json.load(f)["process"], args=list(args), terminal=terminal)
        exec_wait = await harness.exec_waited(
            container_id, "e", process, stdout=stdout, terminal=terminal
        )
        await harness.call(
            "Start",
            shim_pb2.StartRequest(id=container_id, exec_id="e"),
            shim_pb2.StartResponse,
        )
        waited = await exec_wait
        assert waited.exit_status == 0
        reader.go.set()
        await harness.call(
            "Delete",
            shim_pb2.DeleteRequest(id=container_id, exec_id="e"),
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
    return reader.result()


def test_exec_output_reaches_a_reader_that_opens_after_the_exec_exited(
    short_root, make_bundle, tmp_path
):
    """The reader's open starts once the exec has exited (or after LATE_READER_GRACE, as
    Exec waits for it now). Unfixed, the open waited for a writer until cancelled."""
    output = _exec_output_read_by(
        short_root, make_bundle, tmp_path, lambda path: LateReader(path, LATE_READER_GRACE)
    )
    assert output == b"up\n", "the exec's output was lost"


def test_exec_output_reaches_a_reader_seen_open_only_after_the_exit(
    short_root, make_bundle, tmp_path
):
    """The reader's open returns at once but the client sees it open only a second later,
    after the exec exited. Unfixed, Delete answered at once and ctr's cancel dropped it."""
    output = _exec_output_read_by(
        short_root, make_bundle, tmp_path, lambda path: LateReader(path, mark_after=1.0)
    )
    assert output == b"up\n", "the exec's output was lost"


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


def test_terminal_exec_output_is_all_copied_before_its_delete_answers(
    short_root, make_bundle, tmp_path
):
    """With a terminal the shim copies the pty's output into the fifo. More than the fifo
    holds, read slowly, must all arrive: Delete comes while the end of it is still in
    the fifo and the pty. Unfixed, the Delete stopped the copy and the rest was lost."""
    lines = 30000  # about 170 KiB: more than a fifo and a pty buffer hold
    output = _exec_output_read_by(
        short_root,
        make_bundle,
        tmp_path,
        lambda path: LateReader(path, read_pause=0.005),
        args=("seq", "1", str(lines)),
        terminal=True,
    )
    arrived = output.count(b"\n")
    assert arrived == lines and output.endswith(f"{lines}\r\n".encode()), (
        f"{arrived} of {lines} lines arrived"
    )
