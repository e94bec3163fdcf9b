"""The shim daemon SIGKILLed in the middle of Create, Start and an exec: what containerd
does next is run `<shim> delete` for each of its containers, and that alone must leave
nothing behind: no process in the container's cgroup, no runtime state, no group dir.

The test plays containerd (integration/test_shim_service.py's harness): it kills the
daemon at a point a hook marks, then runs `delete` exactly as containerd runs it.
"""

import json
import os
import signal
import subprocess
import sys
import time

from api import typeurl
from api.gen.containerd.task.v2 import shim_pb2
from api.ttrpc import TtrpcError
from integration.ids import unique_id
from integration.reliability.harness import (
    NAMESPACE,
    Harness,
    _scenario,
    _wait_gone,
    alive,
    cgroup_pids,
    plain_bundle,
)
from shim import config as shim_config


def _hook(directory, name: str, marker, go) -> dict:
    """A hook that says it runs (MARKER) and waits until the test lets it go (GO)."""
    path = directory / name
    path.write_text(f"#!/bin/sh\ntouch {marker}\nwhile [ ! -e {go} ]; do sleep 0.02; done\n")
    path.chmod(0o755)
    return {"path": str(path)}


def _with_hooks(bundle: str, hooks: dict) -> None:
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["hooks"] = hooks
    with open(path, "w") as f:
        json.dump(config, f)


async def _wait_for(path, timeout: float = 20) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.02)


def _shim_delete(harness: Harness, bundle: str, container_id: str) -> subprocess.CompletedProcess:
    """What containerd runs after a shim's connection drops."""
    env = dict(os.environ, ZVIZ_SHIM_ROOT=harness.root)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "shim.main",
            "-namespace",
            NAMESPACE,
            "-address",
            harness.events_address,
            "-id",
            container_id,
            "-bundle",
            bundle,
            "delete",
        ],
        cwd=bundle,
        env=env,
        capture_output=True,
        timeout=60,
    )


def _assert_nothing_left(harness: Harness, bundle: str, container_id: str) -> None:
    deleted = _shim_delete(harness, bundle, container_id)
    assert deleted.returncode == 0, deleted.stderr
    response = shim_pb2.DeleteResponse.FromString(deleted.stdout)
    assert response.exit_status == 128 + signal.SIGKILL
    deadline = time.monotonic() + 10
    while cgroup_pids(container_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cgroup_pids(container_id) == [], "processes kept running unaccounted"
    assert not [d for d, _, _ in os.walk("/sys/fs/cgroup") if container_id in d], "cgroup left"
    runtime_root = shim_config.runtime_root(harness.events_address, NAMESPACE)
    with_env_root = runtime_root.replace(shim_config.STATE_ROOT, harness.root, 1)
    assert not os.path.exists(os.path.join(with_env_root, container_id)), "runtime state left"


def _assert_group_gone(short_root: str) -> None:
    """The dead daemon's group directory goes with its last container's delete."""
    groups = os.path.join(short_root, "g")
    assert not os.path.exists(groups) or not os.listdir(groups), "group directory left"


async def _shim_pid(harness: Harness, container_id: str) -> int:
    connected = await harness.call(
        "Connect", shim_pb2.ConnectRequest(id=container_id), shim_pb2.ConnectResponse
    )
    return connected.shim_pid


def _kill_daemon(harness: Harness, shim_pid: int) -> None:
    os.kill(shim_pid, signal.SIGKILL)
    _wait_gone(shim_pid)
    harness.client = None  # its connection died with the daemon: nothing to shut down


def test_killed_during_create(short_root, make_bundle, tmp_path):
    marker, go = tmp_path / "creating", tmp_path / "go"
    bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    _with_hooks(bundle, {"createRuntime": [_hook(tmp_path, "hook", marker, go)]})
    container_id = unique_id("zviz-rel-kill-create")

    async def body(harness: Harness, recorder) -> int:
        import asyncio

        harness.start(bundle, container_id)
        shim_pid = await _shim_pid(harness, container_id)
        create = asyncio.get_running_loop().create_task(
            harness.call(
                "Create",
                shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
                shim_pb2.CreateTaskResponse,
            )
        )
        await _wait_for(marker)
        assert cgroup_pids(container_id), "the hook runs before the container's PID 1 exists"
        _kill_daemon(harness, shim_pid)
        go.touch()
        try:
            await create
        except (TtrpcError, ConnectionError):
            pass
        else:
            raise AssertionError("Create answered although its daemon was killed")
        return shim_pid

    _scenario(short_root, body)
    _assert_nothing_left(_harness(short_root), bundle, container_id)
    _assert_group_gone(short_root)


def _harness(short_root: str) -> Harness:
    """The harness's addresses again, after its scenario ended (for `delete`)."""
    return Harness(short_root, os.path.join(short_root, "events.sock"))


def test_killed_during_start(short_root, make_bundle, tmp_path):
    marker, go = tmp_path / "starting", tmp_path / "go"
    bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    _with_hooks(bundle, {"poststart": [_hook(tmp_path, "hook", marker, go)]})
    container_id = unique_id("zviz-rel-kill-start")
    init_pid = 0

    async def body(harness: Harness, recorder) -> int:
        import asyncio

        nonlocal init_pid
        harness.start(bundle, container_id)
        shim_pid = await _shim_pid(harness, container_id)
        created = await harness.call(
            "Create",
            shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
            shim_pb2.CreateTaskResponse,
        )
        init_pid = created.pid
        start = asyncio.get_running_loop().create_task(
            harness.call("Start", shim_pb2.StartRequest(id=container_id), shim_pb2.StartResponse)
        )
        await _wait_for(marker)
        _kill_daemon(harness, shim_pid)
        go.touch()
        try:
            await start
        except (TtrpcError, ConnectionError):
            pass
        else:
            raise AssertionError("Start answered although its daemon was killed")
        assert init_pid in cgroup_pids(container_id)  # running, and now nobody's
        return shim_pid

    _scenario(short_root, body)
    _assert_nothing_left(_harness(short_root), bundle, container_id)
    _assert_group_gone(short_root)
    assert not alive(init_pid)


def test_killed_during_an_exec_with_two_containers_running(short_root, make_bundle, tmp_path):
    bundles = [plain_bundle(make_bundle, ["sleep", "1000"]) for _ in range(2)]
    ids = [unique_id("zviz-rel-kill-exec") for _ in bundles]
    pids: list[int] = []

    async def body(harness: Harness, recorder) -> int:
        for bundle, container_id in zip(bundles, ids, strict=True):
            harness.start(bundle, container_id)
            created = await harness.call(
                "Create",
                shim_pb2.CreateTaskRequest(id=container_id, bundle=bundle),
                shim_pb2.CreateTaskResponse,
            )
            await harness.call(
                "Start", shim_pb2.StartRequest(id=container_id), shim_pb2.StartResponse
            )
            pids.append(created.pid)
        shim_pid = await _shim_pid(harness, ids[0])
        with open(os.path.join(bundles[0], "config.json")) as f:
            process = dict(json.load(f)["process"], args=["sleep", "1000"], terminal=False)
        await harness.call(
            "Exec",
            shim_pb2.ExecProcessRequest(
                id=ids[0], exec_id="x", spec=typeurl.pack_json(typeurl.OCI_PROCESS_URL, process)
            ),
        )
        started = await harness.call(
            "Start", shim_pb2.StartRequest(id=ids[0], exec_id="x"), shim_pb2.StartResponse
        )
        pids.append(started.pid)
        assert started.pid in cgroup_pids(ids[0])
        _kill_daemon(harness, shim_pid)
        return shim_pid

    _scenario(short_root, body)
    for bundle, container_id in zip(bundles, ids, strict=True):
        _assert_nothing_left(_harness(short_root), bundle, container_id)
    _assert_group_gone(short_root)
    assert not [pid for pid in pids if alive(pid)]
