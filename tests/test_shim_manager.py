"""The shim binary's `start` and `delete` actions, with the real binary and a real daemon,
but no containerd: a ttrpc client plays containerd's part."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from google.protobuf import empty_pb2

from api import typeurl
from api.gen.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from api.gen.containerd.runtimeoptions.v1 import api_pb2 as runtimeoptions
from api.gen.containerd.task.v2 import shim_pb2
from api.ttrpc import Client, Code, TtrpcError
from shim import config as shim_config
from shim import wire
from shim.main import RUNTIME_NAME, VERSION

CONTAINERD_ADDRESS = "/run/zviz-shim-unit/containerd.sock"


@pytest.fixture
def shim_root():
    # Short on purpose: the socket path must stay under 106 bytes.
    root = tempfile.mkdtemp(prefix="zs-", dir="/tmp")
    yield root
    for pid in _daemon_pids(root):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def _daemon_pids(root: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"ZVIZ_SHIM_ROOT={root}".encode() not in f.read().split(b"\0"):
                    continue
            found.append(int(pid))
        except OSError:
            continue
    return [p for p in found if p != os.getpid()]


def _bundle(root: str, annotations=None) -> str:
    bundle = tempfile.mkdtemp(prefix="bundle-", dir=root)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump({"ociVersion": "1.2.0", "annotations": annotations or {}}, f)
    return bundle


def _shim(root: str, bundle: str, container_id: str, action: str, config: str | None = None, **kw):
    env = dict(os.environ, ZVIZ_SHIM_ROOT=root)
    env.pop("TTRPC_ADDRESS", None)
    if config:
        env["ZVIZ_SHIM_CONFIG"] = config
    args = [
        sys.executable,
        "-m",
        "shim.main",
        "-namespace",
        "zviz-shim-unit",
        "-address",
        CONTAINERD_ADDRESS,
    ]
    args += ["-publish-binary", "/bin/true", "-id", container_id, *kw.get("extra", []), action]
    # capture_output waits for EOF on stdout and stderr: it would hang (and time out)
    # if the daemon `start` leaves behind kept them open.
    return subprocess.run(
        args, cwd=bundle, env=env, capture_output=True, timeout=30, input=kw.get("stdin", b"")
    )


async def _call(address: str, method: str, request, response_type):
    client = await Client.connect(address, timeout=10)
    try:
        return await client.call(
            "containerd.task.v2.Task", method, request, response_type, timeout=10
        )
    finally:
        await client.close()


def _wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_start_launches_one_daemon_per_group_and_reuses_it(shim_root):
    first_bundle, second_bundle = _bundle(shim_root), _bundle(shim_root)
    first = _shim(shim_root, first_bundle, "zviz-shim-a", "start")
    assert first.returncode == 0, first.stderr
    address = first.stdout.decode()
    assert address.startswith(f"unix://{shim_root}/g/") and address.endswith("/sock")
    assert open(os.path.join(first_bundle, "address")).read() == address
    second = _shim(shim_root, second_bundle, "zviz-shim-b", "start")
    assert second.returncode == 0, second.stderr
    assert second.stdout.decode() == address
    path = address[len("unix://") :]
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(os.path.join(os.path.dirname(path), "tasks"))) == [
        "zviz-shim-a",
        "zviz-shim-b",
    ]

    connected = asyncio.run(
        _call(
            address, "Connect", shim_pb2.ConnectRequest(id="zviz-shim-a"), shim_pb2.ConnectResponse
        )
    )
    daemon_pid = connected.shim_pid
    assert daemon_pid > 0 and connected.task_pid == 0
    assert os.getsid(daemon_pid) == daemon_pid  # detached: its own session

    with pytest.raises(TtrpcError) as raised:
        asyncio.run(
            _call(address, "State", shim_pb2.StateRequest(id="nope"), shim_pb2.StateResponse)
        )
    assert raised.value.code == Code.NOT_FOUND
    with pytest.raises(TtrpcError) as raised:
        asyncio.run(
            _call(
                address,
                "Checkpoint",
                shim_pb2.CheckpointTaskRequest(id="x"),
                shim_pb2.StateResponse,
            )
        )
    assert raised.value.code == Code.UNIMPLEMENTED and "checkpoint" in raised.value.message

    asyncio.run(_call(address, "Shutdown", shim_pb2.ShutdownRequest(now=True), empty_pb2.Empty))
    assert _wait_gone(daemon_pid), "daemon did not exit after Shutdown(now)"
    assert not os.path.exists(os.path.dirname(path)), "daemon left its group directory"


def test_grouping_per_container_gives_each_its_own_daemon(shim_root):
    config = os.path.join(shim_root, "shim.toml")
    with open(config, "w") as f:
        f.write('grouping = "container"\nidle_exit_seconds = 0\n')
    a = _shim(shim_root, _bundle(shim_root), "zviz-shim-a", "start", config=config)
    b = _shim(shim_root, _bundle(shim_root), "zviz-shim-b", "start", config=config)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    assert a.stdout != b.stdout


def test_start_replaces_a_dead_daemons_socket(shim_root):
    bundle = _bundle(shim_root)
    first = _shim(shim_root, bundle, "zviz-shim-a", "start").stdout.decode()
    pid = asyncio.run(
        _call(first, "Connect", shim_pb2.ConnectRequest(id="zviz-shim-a"), shim_pb2.ConnectResponse)
    ).shim_pid
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid)
    path = first[len("unix://") :]
    assert os.path.exists(path)  # a SIGKILLed daemon leaves its socket behind
    with pytest.raises(ConnectionRefusedError):
        socket.socket(socket.AF_UNIX).connect(path)
    again = _shim(shim_root, bundle, "zviz-shim-a", "start")
    assert again.returncode == 0, again.stderr
    assert again.stdout.decode() == first
    new_pid = asyncio.run(
        _call(first, "Connect", shim_pb2.ConnectRequest(id="zviz-shim-a"), shim_pb2.ConnectResponse)
    ).shim_pid
    assert new_pid != pid


def test_start_refuses_a_bundle_without_config(shim_root):
    bundle = tempfile.mkdtemp(dir=shim_root)
    result = _shim(shim_root, bundle, "zviz-shim-a", "start")
    assert result.returncode != 0
    assert b"config.json" in result.stderr
    assert not os.path.exists(os.path.join(shim_root, "g"))


def test_delete_after_a_dead_daemon_answers_a_delete_response(shim_root):
    bundle = _bundle(shim_root)
    address = _shim(shim_root, bundle, "zviz-shim-a", "start").stdout.decode()
    pid = asyncio.run(
        _call(
            address, "Connect", shim_pb2.ConnectRequest(id="zviz-shim-a"), shim_pb2.ConnectResponse
        )
    ).shim_pid
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid)
    result = _shim(shim_root, bundle, "zviz-shim-a", "delete", extra=["-bundle", bundle])
    assert result.returncode == 0, result.stderr
    response = shim_pb2.DeleteResponse.FromString(result.stdout)
    assert response.exit_status == 128 + signal.SIGKILL
    assert response.exited_at.seconds > 0
    # The last container of a dead daemon takes its directory (socket, lock) with it.
    assert not os.path.exists(os.path.dirname(address[len("unix://") :]))


def test_missing_namespace_is_refused(shim_root):
    result = subprocess.run(
        [sys.executable, "-m", "shim.main", "-id", "x", "start"], capture_output=True, timeout=30
    )
    assert result.returncode != 0
    assert b"namespace" in result.stderr


def _options_any(config_path: str):
    return typeurl.pack(runtimeoptions.Options(config_path=config_path))


def _config_path_used(bundle: str) -> str:
    state = os.path.join(bundle, shim_config.BUNDLE_STATE_FILE)
    return shim_config.read_bundle_state(state).get("config_path", "")


def _shim_config(root: str) -> str:
    path = os.path.join(root, "shim.toml")
    with open(path, "w") as f:
        f.write("idle_exit_seconds = 0\n")
    return path


def test_start_takes_the_config_path_from_runtime_options_and_answers_the_address(shim_root):
    """containerd before 2.3: a bare Any on stdin, the bare address on stdout."""
    config, bundle = _shim_config(shim_root), _bundle(shim_root)
    stdin = _options_any(config).SerializeToString()
    result = _shim(shim_root, bundle, "zviz-shim-a", "start", stdin=stdin)
    assert result.returncode == 0, result.stderr
    address = result.stdout.decode()
    assert address.startswith(f"unix://{shim_root}/g/") and address.endswith("/sock")
    assert _config_path_used(bundle) == config
    asyncio.run(_call(address, "Shutdown", shim_pb2.ShutdownRequest(now=True), empty_pb2.Empty))


def test_start_takes_the_config_path_from_bootstrap_params_and_answers_a_result(shim_root):
    """containerd 2.3 and later: BootstrapParams on stdin, a BootstrapResult on stdout."""
    config, bundle = _shim_config(shim_root), _bundle(shim_root)
    params = bootstrap_pb2.BootstrapParams(
        instance_id="zviz-shim-a",
        namespace="zviz-shim-unit",
        log_level=bootstrap_pb2.LOG_LEVEL_DEBUG,  # negative: a ten-byte varint on the wire
        containerd_version="v2.4.2",
        containerd_ttrpc_address=CONTAINERD_ADDRESS + ".ttrpc",
        containerd_grpc_address=CONTAINERD_ADDRESS,
        containerd_binary="/usr/bin/containerd",
        socket_dir="/run/containerd/s",
        extensions=[bootstrap_pb2.Extension(value=_options_any(config))],
    )
    result = _shim(shim_root, bundle, "zviz-shim-a", "start", stdin=params.SerializeToString())
    assert result.returncode == 0, result.stderr
    reply = bootstrap_pb2.BootstrapResult.FromString(result.stdout)
    assert (reply.version, reply.protocol) == (2, "ttrpc")
    assert reply.address.startswith(f"unix://{shim_root}/g/") and reply.address.endswith("/sock")
    assert _config_path_used(bundle) == config
    connected = asyncio.run(
        _call(
            reply.address,
            "Connect",
            shim_pb2.ConnectRequest(id="zviz-shim-a"),
            shim_pb2.ConnectResponse,
        )
    )
    assert connected.shim_pid > 0
    asyncio.run(
        _call(reply.address, "Shutdown", shim_pb2.ShutdownRequest(now=True), empty_pb2.Empty)
    )


def test_start_without_runtime_options_in_bootstrap_params_uses_no_config(shim_root):
    bundle = _bundle(shim_root)
    params = bootstrap_pb2.BootstrapParams(instance_id="zviz-shim-a", namespace="zviz-shim-unit")
    result = _shim(shim_root, bundle, "zviz-shim-a", "start", stdin=params.SerializeToString())
    assert result.returncode == 0, result.stderr
    reply = bootstrap_pb2.BootstrapResult.FromString(result.stdout)
    assert reply.version == 2 and reply.address
    assert _config_path_used(bundle) == ""
    asyncio.run(
        _call(reply.address, "Shutdown", shim_pb2.ShutdownRequest(now=True), empty_pb2.Empty)
    )


def test_info_answers_a_runtime_info_without_a_namespace():
    """containerd 2.x runs `SHIM -info` alone, and parses stdout as containerd.types.RuntimeInfo."""
    result = subprocess.run(
        [sys.executable, "-m", "shim.main", "-info"], capture_output=True, timeout=30, input=b""
    )
    assert result.returncode == 0, result.stderr
    fields = wire.length_delimited_fields(result.stdout)
    assert fields[1] == RUNTIME_NAME.encode()
    assert wire.length_delimited_fields(fields[2])[1] == VERSION.encode()
    # The features containerd 2.x checks before it asks for id-mapped mounts.
    features = wire.length_delimited_fields(fields[4])
    assert features[1] == b"types.containerd.io/opencontainers/runtime-spec/1/features/Features"
    assert json.loads(features[2])["linux"]["mountExtensions"]["idmap"] == {"enabled": True}
