"""Many calls at once against one shim daemon, over its real socket (the test plays
containerd): 20 Creates and Deletes in parallel, Kill racing Delete, Exec racing
Delete, Pause racing Kill. No deadlock (every call answers within its deadline), no
process left in any container's cgroup, and the latency of State calls made while the
daemon is busy is measured (its p99 is printed and bounded)."""

import asyncio
import os
import time

from api import typeurl
from api.gen.containerd.task.v2 import shim_pb2
from api.ttrpc import Code, TtrpcError
from integration.ids import unique_id
from integration.reliability.harness import (
    Harness,
    _scenario,
    _wait_gone,
    cgroup_pids,
    plain_bundle,
)

PARALLEL = 20
CALL_TIMEOUT = 30  # harness.call's deadline: a call that takes longer is a deadlock
# Expected outcomes of a call that lost a race, by the state it found.
RACE_CODES = {Code.NOT_FOUND, Code.FAILED_PRECONDITION}


async def _call_or_race(harness: Harness, method: str, request, response_type=None):
    """The call's answer, or the TtrpcError of a call that lost a race (a legal outcome)."""
    try:
        if response_type is None:
            return await harness.call(method, request)
        return await harness.call(method, request, response_type)
    except TtrpcError as e:
        assert e.code in RACE_CODES, f"{method}: {e}"
        return e


async def _delete_for_sure(harness: Harness, container_id: str) -> None:
    """Kill, wait and delete whatever is left of CONTAINER_ID (NOT_FOUND: already gone)."""
    await _call_or_race(harness, "Kill", shim_pb2.KillRequest(id=container_id, signal=9, all=True))
    await _call_or_race(harness, "Resume", shim_pb2.ResumeRequest(id=container_id))
    await _call_or_race(
        harness, "Wait", shim_pb2.WaitRequest(id=container_id), shim_pb2.WaitResponse
    )
    result = await _call_or_race(
        harness, "Delete", shim_pb2.DeleteRequest(id=container_id), shim_pb2.DeleteResponse
    )
    if isinstance(result, TtrpcError):
        assert result.code == Code.NOT_FOUND, result


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def test_parallel_creates_and_racing_calls(short_root, make_bundle):
    bundles = [plain_bundle(make_bundle, ["sleep", "1000"]) for _ in range(PARALLEL + 1)]
    ids = [unique_id("zviz-rel-par") for _ in bundles]
    probe_id, ids, probe_bundle, bundles = ids[0], ids[1:], bundles[0], bundles[1:]
    latencies: list[float] = []

    async def body(harness: Harness, recorder) -> int:
        for bundle, container_id in zip([probe_bundle, *bundles], [probe_id, *ids], strict=True):
            harness.start(bundle, container_id)
        await harness.call(
            "Create",
            shim_pb2.CreateTaskRequest(id=probe_id, bundle=probe_bundle),
            shim_pb2.CreateTaskResponse,
        )
        shim_pid = (
            await harness.call(
                "Connect", shim_pb2.ConnectRequest(id=probe_id), shim_pb2.ConnectResponse
            )
        ).shim_pid
        busy = True

        async def watch_state():
            while busy:
                began = time.monotonic()
                await harness.call(
                    "State", shim_pb2.StateRequest(id=probe_id), shim_pb2.StateResponse
                )
                latencies.append(time.monotonic() - began)
                await asyncio.sleep(0.01)

        watcher = asyncio.get_running_loop().create_task(watch_state())
        try:
            created = await asyncio.gather(
                *(
                    harness.call(
                        "Create",
                        shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
                        shim_pb2.CreateTaskResponse,
                    )
                    for bundle, container_id in zip(bundles, ids, strict=True)
                )
            )
            assert len({c.pid for c in created}) == PARALLEL
            await asyncio.gather(
                *(
                    harness.call("Start", shim_pb2.StartRequest(id=i), shim_pb2.StartResponse)
                    for i in ids
                )
            )
            with open(os.path.join(bundles[0], "config.json")) as f:
                import json

                process = dict(json.load(f)["process"], args=["sleep", "1000"], terminal=False)
            spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, process)
            kill_delete, exec_delete, pause_kill, plain = ids[0:5], ids[5:10], ids[10:15], ids[15:]
            races = []
            for i in kill_delete:
                races += [
                    _call_or_race(harness, "Kill", shim_pb2.KillRequest(id=i, signal=9)),
                    _call_or_race(
                        harness, "Delete", shim_pb2.DeleteRequest(id=i), shim_pb2.DeleteResponse
                    ),
                ]
            for i in exec_delete:
                races += [
                    _call_or_race(
                        harness, "Exec", shim_pb2.ExecProcessRequest(id=i, exec_id="x", spec=spec)
                    ),
                    _call_or_race(
                        harness,
                        "Start",
                        shim_pb2.StartRequest(id=i, exec_id="x"),
                        shim_pb2.StartResponse,
                    ),
                    _call_or_race(harness, "Kill", shim_pb2.KillRequest(id=i, signal=9, all=True)),
                    _call_or_race(
                        harness, "Delete", shim_pb2.DeleteRequest(id=i), shim_pb2.DeleteResponse
                    ),
                ]
            for i in pause_kill:
                races += [
                    _call_or_race(harness, "Pause", shim_pb2.PauseRequest(id=i)),
                    _call_or_race(harness, "Kill", shim_pb2.KillRequest(id=i, signal=9)),
                ]
            for i in plain:
                races.append(_call_or_race(harness, "Kill", shim_pb2.KillRequest(id=i, signal=15)))
            await asyncio.gather(*races)
            # Whatever each race left, it can be ended and deleted, in parallel too.
            await asyncio.gather(*(_delete_for_sure(harness, i) for i in ids))
        finally:
            busy = False
            await watcher
        await _delete_for_sure(harness, probe_id)
        for container_id in [*ids, probe_id]:
            with_error = await _call_or_race(
                harness, "State", shim_pb2.StateRequest(id=container_id), shim_pb2.StateResponse
            )
            assert isinstance(with_error, TtrpcError) and with_error.code == Code.NOT_FOUND
        return shim_pid

    began = time.monotonic()
    _wait_gone(_scenario(short_root, body))
    leaked = {i: cgroup_pids(i) for i in [probe_id, *ids] if cgroup_pids(i)}
    assert not leaked, f"processes left: {leaked}"
    p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
    print(
        f"\nState while busy: {len(latencies)} calls, p50 {p50 * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; "
        f"whole run {time.monotonic() - began:.1f} s"
    )
    assert p99 < 5.0, "State waited on the busy daemon"
