"""Resource limits enforced on real containers: memory (OOM kill reported), pids (fork bomb stopped)."""

import json

import pytest

from integration.cgroup_checks import cgroup_file, read
from integration.ids import tagged
from integration.zviz_cli import Zviz, edit_config, leftovers, unique_id
from runtime import cgroups


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def test_memory_hog_is_killed_at_its_limit_and_reported(zviz, make_bundle):
    container_id = unique_id()
    # Grows a shell variable forever: only the memory limit can stop it.
    hog = "x=0123456789abcdef; while :; do x=$x$x; done"
    bundle = make_bundle(["sh", "-c", hog])
    edit_config(
        bundle,
        lambda c: c["linux"]["resources"].update(
            memory={"limit": 32 * 1024 * 1024, "swap": 32 * 1024 * 1024}
        ),
    )
    result = zviz("run", "--keep", "--bundle", bundle, container_id, timeout=120)
    try:
        assert result.returncode == 137, result.stderr
        assert "OOM killed" in result.stderr
        state = zviz.state(container_id)
        assert state["status"] == "stopped"
        assert state["exitStatus"] == 137
        assert state["oomKilled"] is True
    finally:
        assert zviz("delete", container_id).returncode == 0
    assert leftovers(container_id, zviz.root) == []


def test_fork_bomb_is_stopped_at_the_pids_limit(zviz, make_bundle):
    limit = 16
    # A subshell forks sleepers until fork fails; the count then uses only builtins
    # (the glob), since every pid slot is taken.
    script = "( while :; do sleep 30 & done ) 2>/dev/null; set -- /proc/[0-9]*; echo $#; kill -9 -1; exit 0"
    bundle = make_bundle(["sh", "-c", script])
    edit_config(bundle, lambda c: c["linux"]["resources"].update(pids={"limit": limit}))
    result = zviz.run(bundle, timeout=120)
    assert result.returncode == 0, result.stderr
    running = int(result.stdout.split()[-1])
    assert 1 < running <= limit


def test_limits_are_visible_in_the_cgroup(zviz, make_bundle):
    container_id = unique_id()
    bundle = make_bundle(["sleep", "30"])
    edit_config(
        bundle,
        lambda c: c["linux"]["resources"].update(
            memory={"limit": 64 * 1024 * 1024}, pids={"limit": 33}
        ),
    )
    assert zviz.create(bundle, container_id).returncode == 0
    group = cgroups.for_container(container_id)  # only its paths: where zviz put it
    try:
        memory_limit = cgroup_file(group, "memory", "memory.limit_in_bytes", "memory.max")
        assert int(read(memory_limit)) == 64 * 1024 * 1024
        assert read(cgroup_file(group, "pids", "pids.max")) == "33"
        pid = zviz.state(container_id)["pid"]
        assert pid in [int(p) for p in read(cgroup_file(group, "pids", "cgroup.procs")).split()]
        update = zviz(
            "update", "--resources", "-", container_id, input=json.dumps({"pids": {"limit": 44}})
        )
        assert update.returncode == 0, update.stderr
        assert read(cgroup_file(group, "pids", "pids.max")) == "44"
    finally:
        assert zviz("delete", "--force", container_id).returncode == 0
    assert leftovers(container_id, zviz.root) == []
