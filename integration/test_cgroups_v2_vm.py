"""runtime.cgroups on a real cgroup v2 kernel: Debian's 6.1 under QEMU (see cgroup2_vm.py).

The guest runs integration/cgroups_v2_guest.py once (one boot, ~10 s here) and reports
what the kernel did; each test below asserts one part of it.
"""

import json
import os

import pytest

from integration.cgroup2_vm import missing_requirements, run_in_v2_vm

MiB = 1024 * 1024
GUEST_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cgroups_v2_guest.py")


@pytest.fixture(scope="module")
def guest():
    reason = missing_requirements()
    if reason:
        pytest.skip(f"no cgroup v2 guest: {reason}")
    with open(GUEST_SCRIPT) as f:
        rc, output = run_in_v2_vm(f.read(), timeout=110)
    assert rc == 0, f"guest script failed (rc {rc}):\n{output[-4000:]}"
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"guest printed no RESULT line:\n{output[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def result(guest, name: str) -> dict:
    facts = guest[name]
    assert not (isinstance(facts, dict) and "error" in facts and len(facts) == 1), facts.get(
        "error"
    )
    return facts


def test_v2_is_detected_and_limits_are_written(guest):
    facts = result(guest, "limits_and_membership")
    assert facts["version"] == 2
    assert facts["paths"] == {"unified": "/sys/fs/cgroup/zviz/zviz-vm-limits"}
    assert facts["files"] == {
        "memory.max": str(64 * MiB),
        "memory.swap.max": str(32 * MiB),  # OCI swap is memory+swap
        "memory.low": str(16 * MiB),
        "memory.high": str(60 * MiB),  # from linux.resources.unified
        "pids.max": "20",
        "cpu.weight": "39",  # shares 1024, runc's conversion
        "cpu.max": "50000 100000",
        "cpuset.cpus": "0",
    }
    # the device rules are an eBPF program: deny all but the basic nodes
    assert facts["device_programs"] == 1
    assert facts["devices_seen"] == "/dev/null open; /dev/kmsg 1"
    assert facts["notes"] == []
    # controllers are delegated inside zviz's own parent group
    assert set(facts["parent_subtree_control"].split()) >= {"cpu", "cpuset", "memory", "pids"}


def test_v2_add_pid_pids_load_and_already_exists(guest):
    facts = result(guest, "limits_and_membership")
    assert facts["pids"] == [facts["child"]]
    assert facts["child_cgroup"] == "0::/zviz/zviz-vm-limits"
    assert facts["reloaded_pids"] == [facts["child"]]
    assert facts["second_create"].startswith("AlreadyExists")


def test_v2_destroy_kills_and_removes(guest):
    facts = result(guest, "limits_and_membership")
    assert facts["child_status"] == -9
    assert facts["exists_after_destroy"] is False
    assert guest["nothing_left"] == [], "zviz groups left in the guest's /sys/fs/cgroup"


def test_v2_memory_hog_is_oom_killed_counted_and_watched(guest):
    facts = result(guest, "oom_kill")
    assert facts["before"] == 0
    assert facts["status"] == -9
    assert facts["watcher_readable"] is True
    assert facts["watcher_read"] == 1
    assert facts["count"] == 1
    assert facts["stats_oom_kill"] == 1
    assert "oom_kill 1" in facts["memory_events"]


def test_v2_fork_fails_at_the_pids_limit_and_cgroup_kill_reaps_all(guest):
    facts = result(guest, "fork_limit_and_kill_all")
    assert facts["made"] == 5  # the forker is the sixth task
    assert facts["errno"] == 11  # EAGAIN
    assert facts["stats_pids"] == {"current": 6, "limit": 6}
    assert facts["procs"] == 6
    assert facts["limit_hits"] == 1  # the one refused fork: pids.events "max"
    assert facts["limits"] == [6, 0]  # no memory limit: 0
    assert facts["status"] == -9
    assert facts["procs_after_kill"] == []


def test_v2_freeze_and_thaw(guest):
    facts = result(guest, "freeze_and_thaw")
    assert facts["first"].startswith("t")
    assert facts["frozen"] is True
    assert facts["silent_while_frozen"] is True
    assert facts["frozen_after_thaw"] is False
    assert facts["ticks_after_thaw"].startswith("t")
    assert facts["status"] == -9  # destroyed while frozen


def test_v2_stats(guest):
    facts = result(guest, "stats")
    assert facts["ready"] == f"ready {16 * MiB}"
    stats = facts["stats"]
    assert stats["version"] == 2
    assert 16 * MiB <= stats["memory"]["usage"] <= 128 * MiB
    assert stats["memory"]["limit"] == 128 * MiB
    assert stats["memory"]["rss"] >= 16 * MiB
    assert stats["memory"]["max_usage"] >= stats["memory"]["usage"]
    assert stats["pids"] == {"current": 1, "limit": 10}
    assert stats["cpu"]["usage_ns"] > 0
    assert stats["cpu"]["user_ns"] + stats["cpu"]["system_ns"] > 0
    assert stats["oom_kill"] == 0


@pytest.mark.parametrize(
    ("label", "field"),
    [
        ("cpus", "cpu.cpus"),
        ("quota", "cpu.quota"),
        ("memory_high", "unified.memory.high"),
        ("swap", "memory.swap"),
        ("realtime", "cpu.realtimeRuntime"),
    ],
)
def test_v2_impossible_values_are_invalid_argument_and_leave_nothing(guest, label, field):
    facts = result(guest, "invalid_values")[label]
    assert facts["error"] and f"linux.resources.{field}" in facts["error"]
    assert facts["left_behind"] is False


def test_v2_whole_containers_through_zviz_run(guest):
    facts = result(guest, "containers_through_zviz")
    inside = facts["cgroup_inside"]
    assert inside["rc"] == 0, inside["err"]
    assert inside["out"].strip() == "0::/"  # its own cgroup namespace
    hog = facts["hog"]
    assert hog["rc"] == 137, hog["err"]
    assert "OOM" in hog["err"]
    fork = facts["fork"]
    assert "can't fork" in fork["out"] + fork["err"]
    execd = facts["exec"]
    assert execd["rc"] == 0, execd["err"]
    cgroup, procs = execd["out"].split()
    # In the container's cgroup (its namespace root), beside PID 1: sleep, sh, cat at least.
    assert cgroup == "0::/" and int(procs) >= 2
    assert guest["nothing_left"] == []


def test_v2_the_host_checks_hold_here_too(guest):
    """integration/cgroup_checks.py, shared with test_cgroups.py, on the v2 kernel."""
    facts = result(guest, "shared_checks")
    assert facts["apply_writes_the_limits"] == "passed", facts["apply_writes_the_limits"]
    throttle = facts["block_io_throttle"]
    assert throttle == "passed" or throttle.startswith("skipped: "), throttle


def test_v2_block_io_weight_applies_through_the_file_the_kernel_offers(guest):
    outcome = result(guest, "shared_checks")["block_io_weight"]
    assert outcome.startswith(("applied: ", "refused: ")), outcome
    if outcome.startswith("refused: "):
        pytest.skip(f"the guest kernel offers no weight file (the refusal was checked): {outcome}")
    # Debian's kernel has io.cost (CONFIG_BLK_CGROUP_IOCOST=y) but no BFQ loaded
    assert outcome == "applied: io.weight"
