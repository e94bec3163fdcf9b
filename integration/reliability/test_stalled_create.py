"""A Create stuck for seconds must not hold up the daemon's other containers (issue 13 item
4, issue 11 item 5): "a Create stalled for 10 s delays another container's State/Create
on the same daemon by less than 50 ms".

Container A's createRuntime hook sleeps HOOK_SECONDS; the runtime core runs it in the
parent, inside A's Create. Meanwhile, on the same daemon: container B is created,
started, waited for, looked at and deleted; container C (running) is killed and its exit
must be reported (Wait returns, /tasks/exit is published); State of a running container
P is polled all along. Before the fix, Creates ran one at a time (B's waited for A's)
and the reaper was held across A's Create (C's exit was reported only after it).

The latencies are printed, not asserted in milliseconds (2 cores shared with other
suites): what is asserted is that B and C were done while A was still in its hook.
"""

import asyncio
import contextlib
import json
import os
import time

from api.gen.containerd.task.v2 import shim_pb2
from api.gen.containerd.types.task import task_pb2 as task_types
from api.ttrpc import TtrpcError
from integration.ids import unique_id
from integration.reliability.harness import (
    Harness,
    _scenario,
    _wait_gone,
    alive,
    cgroup_pids,
    plain_bundle,
)

HOOK_SECONDS = 10


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _stalled_bundle(make_bundle, flag: str) -> str:
    bundle = plain_bundle(make_bundle, ["true"])
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        config = json.load(f)
    # Runs in the runtime core (the shim's worker), while A's Create waits for it. The
    # flag says the hook has begun: from then on A's Create is stuck.
    config["hooks"] = {
        "createRuntime": [
            {
                "path": "/bin/sh",
                "args": ["sh", "-c", f": > {flag}; exec /bin/sleep {HOOK_SECONDS}"],
            }
        ]
    }
    with open(path, "w") as f:
        json.dump(config, f)
    return bundle


async def _exit_published(recorder, container_id: str, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not any(
            topic == "/tasks/exit" and event.container_id == container_id
            for topic, event in recorder.events
        ):
            recorder.changed.clear()
            await recorder.changed.wait()


async def _until_exists(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared: A's hook did not run"
        await asyncio.sleep(0.01)


def test_a_stalled_create_delays_no_other_container(short_root, make_bundle, tmp_path):
    flag = str(tmp_path / "hook-began")
    stalled_bundle = _stalled_bundle(make_bundle, flag)
    b_bundle = plain_bundle(make_bundle, ["true"])
    p_bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    c_bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    a_id, b_id, p_id, c_id = (unique_id(f"zviz-stall-{n}") for n in "abpc")
    figures: dict[str, float] = {}
    latencies: list[float] = []

    async def create(harness: Harness, container_id: str, bundle: str):
        return await harness.call(
            "Create",
            shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
            shim_pb2.CreateTaskResponse,
        )

    async def body(harness: Harness, recorder) -> int:
        for container_id, bundle in [
            (p_id, p_bundle),
            (c_id, c_bundle),
            (a_id, stalled_bundle),
            (b_id, b_bundle),
        ]:
            harness.start(bundle, container_id)  # one daemon: the same group
        unstalled_creates = []
        for container_id, bundle in [(p_id, p_bundle), (c_id, c_bundle)]:
            began = time.monotonic()
            await create(harness, container_id, bundle)
            unstalled_creates.append(time.monotonic() - began)
            await harness.call(
                "Start", shim_pb2.StartRequest(id=container_id), shim_pb2.StartResponse
            )
        figures["unstalled_create"] = min(unstalled_creates)  # the reference: nothing stalled
        shim_pid = (
            await harness.call(
                "Connect", shim_pb2.ConnectRequest(id=p_id), shim_pb2.ConnectResponse
            )
        ).shim_pid
        c_wait = asyncio.ensure_future(
            harness.call("Wait", shim_pb2.WaitRequest(id=c_id), shim_pb2.WaitResponse)
        )
        stalled = asyncio.ensure_future(create(harness, a_id, stalled_bundle))
        polling = True

        async def poll_state():
            while polling:
                began = time.monotonic()
                await harness.call("State", shim_pb2.StateRequest(id=p_id), shim_pb2.StateResponse)
                latencies.append(time.monotonic() - began)
                await asyncio.sleep(0.01)

        poller = None
        try:
            await _until_exists(flag, 30)
            stuck_since = time.monotonic()
            poller = asyncio.ensure_future(poll_state())

            began = time.monotonic()
            await create(harness, b_id, b_bundle)
            figures["b_create"] = time.monotonic() - began
            b_wait = asyncio.ensure_future(
                harness.call("Wait", shim_pb2.WaitRequest(id=b_id), shim_pb2.WaitResponse)
            )
            await harness.call("Start", shim_pb2.StartRequest(id=b_id), shim_pb2.StartResponse)
            assert (await b_wait).exit_status == 0
            b_state = await harness.call(
                "State", shim_pb2.StateRequest(id=b_id), shim_pb2.StateResponse
            )
            await harness.call("Delete", shim_pb2.DeleteRequest(id=b_id), shim_pb2.DeleteResponse)
            figures["b_whole"] = time.monotonic() - began
            b_done_while_stalled = not stalled.done()

            began = time.monotonic()
            await harness.call("Kill", shim_pb2.KillRequest(id=c_id, signal=9))
            c_status = (await c_wait).exit_status
            await _exit_published(recorder, c_id, HOOK_SECONDS * 3)
            figures["c_exit"] = time.monotonic() - began
            c_done_while_stalled = not stalled.done()
            figures["stalled_for_so_far"] = time.monotonic() - stuck_since

            created = await stalled  # State of P is polled until then
            figures["a_create_total"] = time.monotonic() - stuck_since
            polling = False
            await poller
        finally:
            polling = False
            if poller is not None:
                with contextlib.suppress(Exception):
                    await poller
            with contextlib.suppress(TtrpcError, asyncio.CancelledError):
                await stalled
            for container_id in (a_id, b_id, c_id, p_id):
                with contextlib.suppress(TtrpcError):
                    await harness.call("Kill", shim_pb2.KillRequest(id=container_id, signal=9))
                with contextlib.suppress(TtrpcError):
                    await harness.call(
                        "Wait", shim_pb2.WaitRequest(id=container_id), shim_pb2.WaitResponse
                    )
                with contextlib.suppress(TtrpcError):
                    await harness.call(
                        "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
                    )
        assert created.pid > 0
        assert (b_state.status, b_state.exit_status) == (task_types.STOPPED, 0)
        assert b_done_while_stalled, (
            f"B (Create {figures['b_create']:.2f} s, all {figures['b_whole']:.2f} s) "
            "finished only after A's stalled Create"
        )
        assert c_status == 128 + 9
        exits = [e for topic, e in recorder.events if topic == "/tasks/exit"]
        assert any(e.container_id == c_id and e.exit_status == 128 + 9 for e in exits), exits
        assert c_done_while_stalled, (
            f"C's exit was reported {figures['c_exit']:.2f} s after its Kill: after A's Create"
        )
        return shim_pid

    _wait_gone(_scenario(short_root, body))
    p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
    print(
        f"\nCreate with nothing stalled {figures['unstalled_create'] * 1000:.0f} ms. "
        f"A's Create stalled {figures['a_create_total']:.1f} s in its hook; meanwhile: "
        f"B's Create {figures['b_create'] * 1000:.0f} ms, B's Create+Start+Wait+State+Delete "
        f"{figures['b_whole'] * 1000:.0f} ms; C's Kill to Wait and /tasks/exit "
        f"{figures['c_exit'] * 1000:.0f} ms; State of P: {len(latencies)} calls, "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )
    assert latencies, "no State call was made while A's Create was stalled"
    # Not a millisecond bound (shared cores): a State never waited for A's hook.
    assert max(latencies) < HOOK_SECONDS / 2, "a State call waited behind A's stalled Create"


def test_orphans_of_an_init_sharing_a_pid_namespace_die_before_its_exit_is_reported(
    short_root, make_bundle
):
    """Joined to another container's pid namespace (a pod's shareProcessNamespace), an
    init's orphans are not killed by the kernel when it exits: the shim kills them (off
    the loop, since freezing the group takes time) as its exit is reported, before the
    Delete that would kill them anyway."""
    sandbox_bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    bundle = plain_bundle(make_bundle, ["sh", "-c", "sleep 1000 & sleep 1"])
    sandbox_id, container_id = unique_id("zviz-stall-sandbox"), unique_id("zviz-stall-orphans")
    seen: dict = {}

    async def body(harness: Harness, recorder) -> int:
        harness.start(sandbox_bundle, sandbox_id)
        harness.start(bundle, container_id)
        sandbox = await harness.call(
            "Create",
            shim_pb2.CreateTaskRequest(id=sandbox_id, bundle=sandbox_bundle),
            shim_pb2.CreateTaskResponse,
        )
        path = os.path.join(bundle, "config.json")
        with open(path) as f:
            config = json.load(f)
        for ns in config["linux"]["namespaces"]:
            if ns["type"] in ("pid", "user", "ipc", "uts", "network"):
                ns["path"] = (
                    f"/proc/{sandbox.pid}/ns/{'net' if ns['type'] == 'network' else ns['type']}"
                )
        config["linux"].pop("uidMappings", None)
        config["linux"].pop("gidMappings", None)
        with open(path, "w") as f:
            json.dump(config, f)
        shim_pid = (
            await harness.call(
                "Connect", shim_pb2.ConnectRequest(id=sandbox_id), shim_pb2.ConnectResponse
            )
        ).shim_pid
        try:
            await harness.call(
                "Start", shim_pb2.StartRequest(id=sandbox_id), shim_pb2.StartResponse
            )
            await harness.call(
                "Create",
                shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
                shim_pb2.CreateTaskResponse,
            )
            await harness.call(
                "Start", shim_pb2.StartRequest(id=container_id), shim_pb2.StartResponse
            )
            await asyncio.sleep(0.5)
            seen["running"] = cgroup_pids(container_id)
            await _exit_published(recorder, container_id, 30)
            # Signalled before the exit went out; SIGKILL takes effect a moment later.
            deadline = time.monotonic() + 5
            while (left := [p for p in cgroup_pids(container_id) if alive(p)]) and (
                time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            seen["after_exit"] = left
        finally:
            for cid in (container_id, sandbox_id):
                with contextlib.suppress(TtrpcError):
                    await harness.call("Kill", shim_pb2.KillRequest(id=cid, signal=9, all=True))
                with contextlib.suppress(TtrpcError):
                    await harness.call("Wait", shim_pb2.WaitRequest(id=cid), shim_pb2.WaitResponse)
                with contextlib.suppress(TtrpcError):
                    await harness.call(
                        "Delete", shim_pb2.DeleteRequest(id=cid), shim_pb2.DeleteResponse
                    )
        return shim_pid

    _wait_gone(_scenario(short_root, body))
    assert len(seen["running"]) >= 2, seen  # the init and its background sleep
    assert seen["after_exit"] == [], seen
