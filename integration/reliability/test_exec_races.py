"""An exec whose container's init exits between Exec (added) and Start: containerd (ctr,
CRI) Waits on the exec before it Starts it, so the failed Start must end the exec's
Wait too, or `ctr task exec` hangs forever (seen once in six in the soak)."""

import asyncio
import json
import os
import select
import signal

from api.gen.containerd.task.v2 import shim_pb2
from api.ttrpc import Code, TtrpcError
from integration.ids import unique_id
from integration.reliability.harness import Harness, _scenario, _wait_gone, plain_bundle


def test_exec_started_after_the_init_exited_ends_its_wait(short_root, make_bundle, tmp_path):
    """...and closes its stdio: containerd's client waits for end of file on the exec's
    fifos before it gives up on the failed Start (then it Deletes the exec)."""
    stdout = str(tmp_path / "exec-out")
    os.mkfifo(stdout, 0o600)
    bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    container_id = unique_id("zviz-rel-exec-late")

    async def body(harness: Harness, recorder) -> int:
        await harness.create_and_start(bundle, container_id)
        with open(os.path.join(bundle, "config.json")) as f:
            process = dict(json.load(f)["process"], args=["true"], terminal=False)
        reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
        exec_wait = await harness.exec_waited(container_id, "late", process, stdout=stdout)
        await harness.call("Kill", shim_pb2.KillRequest(id=container_id, signal=signal.SIGKILL))
        await harness.call("Wait", shim_pb2.WaitRequest(id=container_id), shim_pb2.WaitResponse)
        try:
            await harness.call(
                "Start",
                shim_pb2.StartRequest(id=container_id, exec_id="late"),
                shim_pb2.StartResponse,
            )
        except TtrpcError as e:
            assert e.code == Code.FAILED_PRECONDITION, e
        else:
            raise AssertionError("an exec started in a container whose init had exited")
        async with asyncio.timeout(5):
            waited = await exec_wait
        assert waited.exit_status != 0
        try:
            readable, _, _ = select.select([reader], [], [], 5)
            assert readable and os.read(reader, 4096) == b"", "the exec's stdout never closed"
        finally:
            os.close(reader)
        await harness.call(
            "Delete",
            shim_pb2.DeleteRequest(id=container_id, exec_id="late"),
            shim_pb2.DeleteResponse,
        )
        await harness.call(
            "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
        )
        return (
            await harness.call(
                "Connect", shim_pb2.ConnectRequest(id=container_id), shim_pb2.ConnectResponse
            )
        ).shim_pid

    _wait_gone(_scenario(short_root, body))


def test_deleting_a_task_ends_the_wait_of_an_exec_never_started(short_root, make_bundle):
    bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    container_id = unique_id("zviz-rel-exec-unstarted")

    async def body(harness: Harness, recorder) -> int:
        await harness.create_and_start(bundle, container_id)
        with open(os.path.join(bundle, "config.json")) as f:
            process = dict(json.load(f)["process"], args=["true"], terminal=False)
        exec_wait = await harness.exec_waited(container_id, "never", process)
        await harness.call("Kill", shim_pb2.KillRequest(id=container_id, signal=signal.SIGKILL))
        await harness.call("Wait", shim_pb2.WaitRequest(id=container_id), shim_pb2.WaitResponse)
        await harness.call(
            "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
        )
        async with asyncio.timeout(5):
            waited = await exec_wait
        assert waited.exit_status != 0
        return (
            await harness.call(
                "Connect", shim_pb2.ConnectRequest(id=container_id), shim_pb2.ConnectResponse
            )
        ).shim_pid

    _wait_gone(_scenario(short_root, body))
