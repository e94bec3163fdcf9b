"""containerd and the shim failing under running containers, through containerd 1.6 and
`ctr` as a node runs them: the shim daemon SIGKILLed while two containers run, and
containerd restarted while an exec is attached. Afterwards containerd reports what is
true, and nothing keeps running unaccounted."""

import os
import signal
import subprocess
import time

import pytest

from integration.ids import unique_id
from integration.reliability.harness import alive, cgroup_pids
from integration.test_shim_containerd import _shim_pid, _task_state, _wait_task_state

pytestmark = pytest.mark.containerd

ZVIZ = "io.containerd.zviz.v2"


@pytest.fixture
def containers(containerd, busybox_image):
    """run(id, *cmd) starts a detached zviz container; all are removed after the test."""
    made: list[str] = []

    def run(*cmd: str) -> str:
        container_id = unique_id("zviz-rel-ctrd")
        made.append(container_id)
        result = containerd.ctr(
            "run", "-d", "--runtime", ZVIZ, busybox_image, container_id, *cmd, check=False
        )
        assert result.returncode == 0, result.stderr
        assert _wait_task_state(containerd, container_id, {"RUNNING"}) == "RUNNING"
        return container_id

    yield run
    for container_id in made:
        containerd.ctr("tasks", "kill", "-a", "-s", "SIGKILL", container_id, check=False)
        _wait_task_state(containerd, container_id, {"STOPPED", None}, timeout=20)
        containerd.ctr("tasks", "delete", "-f", container_id, check=False, timeout=30)
        containerd.ctr("containers", "delete", container_id, check=False)


def _wait_until(predicate, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_shim_killed_with_two_containers_running(containerd, containers):
    ids = [containers("sleep", "1000") for _ in range(2)]
    pids = [_task_state(containerd, container_id)[1] for container_id in ids]
    shim_pid = _shim_pid(containerd, ids[0])
    assert _shim_pid(containerd, ids[1]) == shim_pid  # one daemon serves the namespace
    os.kill(shim_pid, signal.SIGKILL)
    # containerd sees the connection drop and runs `<shim> delete` for each container.
    for container_id in ids:
        assert _wait_task_state(containerd, container_id, {None}) is None
    assert _wait_until(lambda: not any(alive(pid) for pid in pids))
    for container_id in ids:
        assert cgroup_pids(container_id) == []
    containerd.restart()
    listed = containerd.ctr("tasks", "ls", "-q").stdout.split()
    assert not set(ids) & set(listed), "a restarted containerd lists tasks that are gone"
    # The container records (not tasks) stay, and a new task can run in each.
    for container_id in ids:
        started = containerd.ctr("task", "start", "-d", container_id, check=False)
        assert started.returncode == 0, started.stderr
        assert _wait_task_state(containerd, container_id, {"RUNNING"}) == "RUNNING"


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[:-1]
    except OSError:
        return []


def test_containerd_restarted_while_an_exec_is_attached(containerd, containers):
    container_id = containers("sleep", "1000")
    attached = subprocess.Popen(
        [
            containerd.ctr_bin,
            "--address",
            containerd.address,
            "-n",
            containerd.namespace,
            "task",
            "exec",
            "--exec-id",
            "attached",
            container_id,
            "sh",
            "-c",
            "echo started; exec sleep 1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=containerd.env,
    )
    try:
        assert attached.stdout.readline() == b"started\n"
        init_pid = _task_state(containerd, container_id)[1]
        before = set(cgroup_pids(container_id))
        assert init_pid in before
        # The process running the exec: itself, or (forked by the container's exec anchor,
        # runtime/exec_anchor.py) the anchor's child beside the runtime's stand-in.
        running = [pid for pid in before - {init_pid} if _cmdline(pid) == [b"sleep", b"1000"]]
        assert len(running) == 1, before
        exec_pid = running[0]
        containerd.restart()
        # The client lost its containerd; the exec did not: still running, still counted.
        assert _task_state(containerd, container_id) == ("RUNNING", init_pid)
        assert alive(exec_pid)
        ps = containerd.ctr("task", "ps", container_id).stdout.split()
        assert str(exec_pid) in ps
        # and still under control: kill the exec through the restarted containerd
        killed = containerd.ctr(
            "task", "kill", "--exec-id", "attached", "-s", "SIGKILL", container_id, check=False
        )
        assert killed.returncode == 0, killed.stderr
        assert _wait_until(lambda: not alive(exec_pid))
    finally:
        attached.kill()
        attached.wait()
    containerd.ctr("task", "kill", "-s", "SIGKILL", container_id)
    assert _wait_task_state(containerd, container_id, {"STOPPED"}) == "STOPPED"
    assert containerd.ctr("task", "delete", container_id, check=False).returncode == 0
    assert _wait_until(lambda: cgroup_pids(container_id) == [])
