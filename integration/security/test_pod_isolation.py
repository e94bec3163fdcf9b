"""One pod cannot hurt another through the shim daemon they would share (issue 11, item 5).

Under CRI every pod is in containerd namespace k8s.io, and the shim's default grouping
was "namespace": every pod of a node shared one daemon. Killing it (OOM, a bug) took
every pod down, and Create runs one at a time per daemon, so a pod whose Create hung
held every other pod's containers back. A pod could also pick its daemon with the
annotation io.zviz.shim.group (when the operator's pod_annotations let io.zviz.*
through). Now, without a configured grouping, a container with a CRI sandbox id gets
its pod's own daemon, and the group annotation is ignored under CRI.

Through containerd's CRI plugin on the CNI node of integration/test_cri.py, handler
zviz with no shim config (the defaults are what is tested).
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from api.gen.containerd.task.v2 import shim_pb2
from api.ttrpc import Client
from integration.ids import tagged, unique_id
from integration.test_cri import cri_node, pod, run
from shim import config as shim_config
from tools.containerd import CRI_NAMESPACE
from tools.mkbundle import build_bundle

ZVIZ = "io.containerd.zviz.v2"
HOOK_SECONDS = 12


@pytest.fixture(scope="module")
def cri(tmp_path_factory):
    # io.zviz.* passes pod annotations through: the broadest lock an operator may choose.
    with cri_node(tmp_path_factory, cri_pod_annotations=("io.zviz.*",)) as harness:
        yield harness


def _bundle(cri, container_id: str) -> str:
    return os.path.join(
        cri.node.containerd.state, "io.containerd.runtime.v2.task", CRI_NAMESPACE, container_id
    )


async def shim_pid(cri, container_id: str) -> int:
    """The pid of the daemon serving CONTAINER_ID, asked over its own socket (Connect)."""
    with open(os.path.join(_bundle(cri, container_id), "address")) as f:
        address = f.read().strip()

    client = await Client.connect(address, timeout=10)
    try:
        connected = await client.call(
            "containerd.task.v2.Task",
            "Connect",
            shim_pb2.ConnectRequest(id=container_id),
            shim_pb2.ConnectResponse,
            timeout=10,
        )
    finally:
        await client.close()
    return connected.shim_pid


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


async def _running_pod(cri, stack, log_dir, annotations=None):
    the_pod = await stack.enter_async_context(pod(cri, "zviz", log_dir, annotations=annotations))
    container = await the_pod.start_container("app", "exec sleep 300")
    return the_pod, container


def test_two_pods_get_two_daemons_and_one_killed_leaves_the_other_running(cri, tmp_path):
    pb = cri.pb

    async def scenario() -> dict:
        seen: dict = {}
        async with contextlib.AsyncExitStack() as stack:
            a, a_app = await _running_pod(cri, stack, tmp_path / "a")
            b, b_app = await _running_pod(cri, stack, tmp_path / "b")
            daemons = {"a": await shim_pid(cri, a_app), "b": await shim_pid(cri, b_app)}
            seen["daemons"] = daemons
            if daemons["a"] == daemons["b"]:
                return seen  # one daemon for both: killing it would take b down too
            # The daemon a's sandbox container started: its -id is the sandbox's.
            seen["a_cmdline"] = cmdline(daemons["a"])
            seen["a_sandbox"] = a.id
            os.kill(daemons["a"], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = await a.runtime.ContainerStatus(
                    pb.ContainerStatusRequest(container_id=a_app)
                )
                if status.status.state == pb.CONTAINER_EXITED:
                    break
                await asyncio.sleep(0.1)
            seen["a_state"] = status.status.state
            status = await b.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=b_app))
            seen["b_state"] = status.status.state
            seen["b_exec"] = await b.exec(b_app, "echo still here")
            seen["b_daemon_alive"] = os.path.exists(f"/proc/{daemons['b']}")
        return seen

    seen = run(scenario())
    daemons = seen["daemons"]
    assert daemons["a"] != daemons["b"], f"two pods share one shim daemon (pid {daemons['a']})"
    assert seen["a_sandbox"] in seen["a_cmdline"], seen["a_cmdline"]
    assert seen["a_state"] == cri.pb.CONTAINER_EXITED, "the killed daemon's pod kept running"
    assert seen["b_daemon_alive"]
    assert seen["b_state"] == cri.pb.CONTAINER_RUNNING
    assert seen["b_exec"][:2] == (0, "still here\n"), seen["b_exec"]


def test_a_pod_cannot_choose_its_daemon_with_the_group_annotation(cri, tmp_path):
    # Two pods name the same group: before, they shared one daemon (a pod could join one
    # another pod chose, and hang or crash it for both).
    annotations = {shim_config.GROUP_ANNOTATION: tagged("zviz-shared")}

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a, a_app = await _running_pod(cri, stack, tmp_path / "a", annotations)
            b, b_app = await _running_pod(cri, stack, tmp_path / "b", annotations)
            spec_annotations = _spec_annotations(cri, a_app)
            return spec_annotations, await shim_pid(cri, a_app), await shim_pid(cri, b_app)

    spec_annotations, a_daemon, b_daemon = run(scenario())
    # The annotation did reach the OCI spec: the shim is what ignores it.
    assert (
        spec_annotations.get(shim_config.GROUP_ANNOTATION)
        == annotations[shim_config.GROUP_ANNOTATION]
    )
    assert a_daemon != b_daemon, "two pods joined one daemon through io.zviz.shim.group"


def _spec_annotations(cri, container_id: str) -> dict:
    with open(os.path.join(_bundle(cri, container_id), "config.json")) as f:
        return json.load(f).get("annotations") or {}


def test_a_pod_whose_create_hangs_does_not_delay_another_pods_start(cri, tmp_path):
    # CRI offers no way to make a Create slow (no hooks), so the hung pod's container
    # is run with ctr in the CRI namespace with a CRI sandbox id annotation, as the
    # shim sees a pod's container: its createContainer hook sleeps HOOK_SECONDS while
    # the shim's Create waits. Pod b's container must start meanwhile.
    hung_id = unique_id("zviz-hung")
    hook_arg = f"{HOOK_SECONDS}.{uuid.uuid4().int % 1000:03d}"  # finds the hook process
    bundle = build_bundle(str(tmp_path / "hung"), args=["sleep", "300"])
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    spec["root"]["path"] = os.path.join(bundle, "rootfs")
    spec["hooks"] = {"createContainer": [{"path": "/bin/sleep", "args": ["sleep", hook_arg]}]}
    spec.setdefault("annotations", {})[shim_config.SANDBOX_ID_ANNOTATION] = tagged("zviz-hung-pod")
    spec_path = os.path.join(bundle, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    containerd = cri.node.containerd
    launched: list[subprocess.Popen] = []

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            b = await stack.enter_async_context(pod(cri, "zviz", tmp_path / "b"))
            hung = subprocess.Popen(
                ["ctr", "--address", containerd.address, "-n", CRI_NAMESPACE, "run", "-d"]
                + ["--runtime", ZVIZ, "--config", spec_path, hung_id],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=containerd.env,
            )
            launched.append(hung)
            await _until_hook_runs(hook_arg, hung)
            started = time.monotonic()
            b_app = await b.start_container("app", "exec sleep 300")
            code, out, _ = await b.exec(b_app, "echo started")
            took = time.monotonic() - started
            return took, hung.poll() is None, (code, out)

    try:
        took, hung_still_creating, exec_result = run(scenario())
    finally:
        output = launched[0].communicate(timeout=HOOK_SECONDS + 60)[0] if launched else ""
        containerd.ctr(
            "tasks", "kill", "-s", "SIGKILL", hung_id, check=False, namespace=CRI_NAMESPACE
        )
        containerd.ctr("tasks", "delete", "-f", hung_id, check=False, namespace=CRI_NAMESPACE)
        containerd.ctr("containers", "delete", hung_id, check=False, namespace=CRI_NAMESPACE)
    # The slow Create did finish: it was slow, not broken.
    assert launched[0].returncode == 0, output
    assert exec_result == (0, "started\n")
    assert took < HOOK_SECONDS / 2, f"pod b's container waited {took:.1f} s behind the hung Create"
    assert hung_still_creating, "the slow Create ended before pod b's start: nothing was shown"


async def _until_hook_runs(hook_arg: str, hung: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert hung.poll() is None, hung.communicate()[0]
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if cmdline(int(pid))[:2] == ["sleep", hook_arg]:
                    return
        await asyncio.sleep(0.05)
    raise AssertionError("the slow Create's hook never ran")
