"""One slow Create must not stop the shim from serving its other calls (issue 10, item 10).

The shim serves every container of a pod from one event loop. Create ran the runtime
core synchronously on it: while one container's setup took long (a large image, a
slow createContainer hook, a stuck child) no other call of any container was answered.
"""

import asyncio
import contextlib
import json
import os
import time

from api.gen.containerd.task.v2 import shim_pb2
from api.ttrpc import TtrpcError
from integration.ids import unique_id
from integration.test_shim_service import Harness, _scenario, _wait_gone, short_root  # noqa: F401

HOOK_SECONDS = 3


def test_other_calls_are_answered_while_a_create_is_slow(short_root, make_bundle):  # noqa: F811
    bundle = make_bundle(args=["true"])
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    # PID 1 runs this hook during its setup, while the shim waits for "ready".
    config["hooks"] = {
        "createContainer": [{"path": "/bin/sleep", "args": ["sleep", str(HOOK_SECONDS)]}]
    }
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    container_id = unique_id("zviz-shim-slow-create")

    async def body(harness: Harness, recorder) -> int:
        harness.start(bundle, container_id)
        await harness.call(  # connects the client before the clock starts
            "Connect", shim_pb2.ConnectRequest(id="none"), shim_pb2.ConnectResponse
        )
        create = asyncio.ensure_future(
            harness.call(
                "Create",
                shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
                shim_pb2.CreateTaskResponse,
            )
        )
        try:
            await asyncio.sleep(0.5)  # the Create is in PID 1's hook now
            started = time.monotonic()
            connected = await harness.call(
                "Connect", shim_pb2.ConnectRequest(id="none"), shim_pb2.ConnectResponse
            )
            answered_in = time.monotonic() - started
            create_was_pending = not create.done()
            created = await create
        finally:
            with contextlib.suppress(TtrpcError, asyncio.CancelledError):
                await create
            with contextlib.suppress(TtrpcError):
                await harness.call("Kill", shim_pb2.KillRequest(id=container_id, signal=9))
            with contextlib.suppress(TtrpcError):
                await harness.call(
                    "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
                )
        assert created.pid > 0
        assert answered_in < 1.0, f"Connect waited {answered_in:.2f} s behind the slow Create"
        assert create_was_pending, "the Create finished too soon to tell"
        return connected.shim_pid

    # The daemon exits after Shutdown: gone before the session's leak check looks.
    _wait_gone(_scenario(short_root, body))
