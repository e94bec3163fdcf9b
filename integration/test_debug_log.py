"""`--debug` shows each step of a create with its time; `--verbose` records carry RFC 3339
times like every other zviz record (issue 15, item 5)."""

import datetime
import json
import re

import pytest

from integration.ids import tagged, unique_id
from integration.zviz_cli import Zviz


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def test_debug_logs_each_create_step_with_its_time(zviz, make_bundle):
    result = zviz("--debug", "run", "--bundle", make_bundle(["true"]), unique_id("zviz-debug"))
    assert result.returncode == 0, result.stderr
    steps = re.findall(r"zviz: debug: create \S+: (.+) \((\d+\.\d) ms\)", result.stderr)
    names = [name for name, _ in steps]
    assert names[0] == "config.json loaded", result.stderr
    assert "profile ci-runner resolved, spec hardened" in names
    assert "cgroups made, limits applied" in names
    assert any(name.startswith("PID 1 (") for name in names), result.stderr
    assert re.search(r"create \S+: done in \d+\.\d ms", result.stderr), result.stderr
    quiet = zviz("run", "--bundle", make_bundle(["true"]), unique_id("zviz-debug"))
    assert "debug:" not in quiet.stderr


def test_verbose_records_have_rfc3339_times(zviz, make_bundle):
    bundle = make_bundle(["sh", "-c", "unshare -n true; exit 0"])
    result = zviz("--verbose", "run", "--bundle", bundle, unique_id("zviz-verbose"))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    unshare = [r for r in records if r["syscall"] == "unshare"]
    assert unshare, result.stderr
    when = datetime.datetime.fromisoformat(unshare[0]["time"].replace("Z", "+00:00"))
    assert when.tzinfo is not None and unshare[0]["time"].endswith("Z")


@pytest.mark.containerd
def test_the_shim_logs_create_steps_when_containerd_debugs(containerd, busybox_image):
    """containerd at debug level starts shims with -debug: the core's steps of a create
    reach containerd's log, with the container's id."""
    cid = unique_id("zviz-debug-shim")
    try:
        result = containerd.ctr(
            "run", "--rm", "--runtime", "io.containerd.zviz.v2", busybox_image, cid, "true",
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    finally:
        containerd.ctr("containers", "delete", cid, check=False)
    with open(containerd.log_path) as f:
        logged = [line for line in f if f"create {cid}: " in line]
    assert any("config.json loaded" in line for line in logged), logged
    assert any(f"create {cid}: done in" in line for line in logged), logged
