"""Nothing outlives a container: 100 create/delete cycles leave no mount, cgroup, process, fd or state dir.

The cycles run through the library API in this (long-lived) process, as the shim does,
so a leaked fd shows up in our own /proc/self/fd. A CLI pass and failed creates are
checked the same way.
"""

import os
import time

import pytest

from integration.ids import session_tag, tagged
from integration.zviz_cli import Zviz, edit_config
from runtime import errors
from runtime.container import Container
from runtime.state import proc_stat

CYCLES = 100
# Every container here is named <LEAK_IDS>...: this session's, never another run's.
LEAK_IDS = tagged("zviz-rt-leak")


def snapshot(root: str) -> dict:
    # Only mounts that could be ours: other suites run beside this one and mount
    # their own things meanwhile.
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(
            m
            for m in (line.split()[4] for line in f)
            if session_tag() in m or m.startswith(os.path.dirname(root))
        )
    cgroups = sorted(
        os.path.join(h, name)
        for h in os.listdir("/sys/fs/cgroup")
        if os.path.isdir(os.path.join("/sys/fs/cgroup", h, "zviz"))
        for name in os.listdir(os.path.join("/sys/fs/cgroup", h, "zviz"))
        if name.startswith(LEAK_IDS)
    )
    return {
        "mounts": mounts,
        "cgroups": cgroups,
        "fds": sorted(os.listdir("/proc/self/fd")),
        "state dirs": sorted(os.listdir(root)) if os.path.isdir(root) else [],
        "our forks": _our_forks(),
    }


def _our_forks() -> list[int]:
    """Processes forked from this test process (same cmdline), e.g. a leaked PID 1 or broker."""
    me = os.getpid()
    with open("/proc/self/cmdline", "rb") as f:
        mine = f.read()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == mine:
                    found.append(int(pid))
        except OSError:
            continue
    return sorted(found)


def settle(root: str, before: dict, timeout: float = 10) -> dict:
    """Killed processes are reaped by init asynchronously: give them a moment."""
    deadline = time.monotonic() + timeout
    while True:
        after = snapshot(root)
        if after == before or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def test_hundred_create_delete_cycles_leave_nothing(make_bundle, tmp_path):
    root = str(tmp_path / tagged("root"))
    os.makedirs(root)
    bundle = make_bundle(["sleep", "60"])
    before = snapshot(root)
    pids = []
    for i in range(CYCLES):
        container = Container.create(root, f"{LEAK_IDS}{i}", bundle, detach=True)
        pids.append((container.pid, container.data["pidStartTime"]))
        if i % 3 == 1:
            container.start()
        container.delete(force=True)
    assert settle(root, before) == before
    for pid, start_time in pids:
        deadline = time.monotonic() + 10
        while (
            (stat := proc_stat(pid)) is not None
            and stat.start_time == start_time
            and stat.state != "Z"
        ):
            assert time.monotonic() < deadline, f"PID 1 {pid} outlived its container"
            time.sleep(0.05)


def test_failed_creates_leave_nothing(make_bundle, tmp_path):
    root = str(tmp_path / tagged("root"))
    os.makedirs(root)
    before = snapshot(root)
    bad_exec = make_bundle(["/no/such/binary"])
    bad_mount = make_bundle(["true"])
    edit_config(
        bad_mount,
        lambda c: c["mounts"].append(
            {"destination": "/x", "type": "bind", "source": "/no/such/dir", "options": ["bind"]}
        ),
    )
    bad_limit = make_bundle(["true"])
    edit_config(bad_limit, lambda c: c["linux"]["resources"].update(memory={"limit": -5}))
    for i in range(10):
        for bundle in (bad_exec, bad_mount, bad_limit):
            with pytest.raises(errors.ZvizError):
                Container.create(root, f"{LEAK_IDS}-bad{i}", bundle, detach=True)
    assert settle(root, before) == before


def test_cli_cycles_leave_nothing(zviz_bin, make_bundle, tmp_path):
    zviz = Zviz(zviz_bin, str(tmp_path / tagged("root")))
    bundle = make_bundle(["true"])
    before = snapshot(zviz.root)
    for _ in range(10):
        container_id = f"{LEAK_IDS}-cli"
        assert zviz.create(bundle, container_id).returncode == 0
        assert zviz("start", container_id).returncode == 0
        assert zviz("delete", "--force", container_id).returncode == 0
        assert zviz.run(bundle).returncode == 0
    assert settle(zviz.root, before)["cgroups"] == before["cgroups"]
    assert settle(zviz.root, before)["state dirs"] == []
