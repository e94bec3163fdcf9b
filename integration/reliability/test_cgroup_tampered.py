"""A container's cgroup changed by someone else: removed after its processes are gone,
or frozen behind zviz's back. kill, state and delete must still work, promptly, and
leave nothing (no process, no cgroup, no state)."""

import json
import os
import signal
import time

import pytest

from integration.ids import tagged, unique_id
from integration.reliability.harness import alive, cgroup_pids
from integration.zviz_cli import Zviz, leftovers


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


@pytest.fixture
def running(zviz, make_bundle):
    """A started `sleep 1000` container; force-deleted after the test whatever happened."""
    container_id = unique_id("zviz-rel-cg")
    created = zviz.create(make_bundle(["sleep", "1000"]), container_id)
    assert created.returncode == 0, created.stderr
    assert zviz("start", container_id).returncode == 0
    yield container_id
    zviz("delete", "--force", container_id, timeout=30)


def _group_dirs(zviz: Zviz, container_id: str) -> list[str]:
    with open(os.path.join(zviz.root, container_id, "state.json")) as f:
        paths = json.load(f)["cgroupPaths"]
    return sorted({path for path in paths.values() if os.path.isdir(path)})


def _freeze(directory: str, frozen: bool) -> None:
    v1 = os.path.join(directory, "freezer.state")
    if os.path.exists(v1):
        with open(v1, "w") as f:
            f.write("FROZEN" if frozen else "THAWED")
    else:
        with open(os.path.join(directory, "cgroup.freeze"), "w") as f:
            f.write("1" if frozen else "0")


def _freezer_dir(dirs: list[str]) -> str:
    for directory in dirs:
        if os.path.exists(os.path.join(directory, "freezer.state")) or os.path.exists(
            os.path.join(directory, "cgroup.freeze")
        ):
            return directory
    pytest.skip("no freezer (v1 freezer.state or v2 cgroup.freeze) in the container's groups")


def test_cgroup_removed_after_its_processes_died(zviz, running):
    pid = zviz.state(running)["pid"]
    dirs = _group_dirs(zviz, running)
    assert dirs
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cgroup_pids(running) and time.monotonic() < deadline:
        time.sleep(0.02)
    for directory in sorted(dirs, key=len, reverse=True):
        os.rmdir(directory)  # someone else's cleanup got there first
    assert zviz.state(running)["status"] == "stopped"
    deleted = zviz("delete", running)
    assert deleted.returncode == 0, deleted.stderr
    assert leftovers(running, zviz.root) == []


def test_cgroup_frozen_behind_its_back(zviz, running):
    pid = zviz.state(running)["pid"]
    dirs = _group_dirs(zviz, running)
    _freeze(_freezer_dir(dirs), True)
    began = time.monotonic()
    # a frozen container reads as paused, and a forced delete still ends it
    assert zviz.state(running)["status"] == "paused"
    deleted = zviz("delete", "--force", running, timeout=30)
    assert deleted.returncode == 0, deleted.stderr
    assert time.monotonic() - began < 10
    assert not alive(pid)
    assert leftovers(running, zviz.root) == []


def test_kill_of_a_container_frozen_behind_its_back(zviz, running):
    pid = zviz.state(running)["pid"]
    dirs = _group_dirs(zviz, running)
    _freeze(_freezer_dir(dirs), True)
    killed = zviz("kill", running, "KILL", timeout=30)
    assert killed.returncode == 0, killed.stderr
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "SIGKILL to a frozen container never landed"
    deleted = zviz("delete", running)
    assert deleted.returncode == 0, deleted.stderr
    assert leftovers(running, zviz.root) == []
