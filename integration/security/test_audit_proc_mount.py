"""procfs and sysfs must land where their masks will be applied.

maskedPaths and readonlyPaths are applied by path after pivot_root. An image can
make /proc a symlink whose resolution changes once a later volume covers part of
it: /proc -> /tmp/l/proc with /tmp/l -> /x in the image. procfs then lands on
/x/proc, the /tmp volume hides the link, the masks and the read-only /proc/sys
find nothing (ENOENT is skipped) and the workload sees an unmasked procfs with a
writable /proc/sys at /x/proc. zviz must refuse such a destination.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from integration.ids import tagged, unique_id
from integration.zviz_cli import leftovers
from tools.mkbundle import build_bundle


@pytest.fixture
def base():
    path = tempfile.mkdtemp(prefix=tagged("zviz-audit-proc") + "-")
    os.chmod(path, 0o755)  # the mapped container root must reach the bundle
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_bundle(base, script, redirect):
    bundle = os.path.join(base, unique_id("bundle"))
    build_bundle(bundle, args=["/bin/sh", "-c", script])
    config_path = os.path.join(bundle, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["mounts"].append(
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}
    )
    with open(config_path, "w") as f:
        json.dump(config, f)
    redirect(os.path.join(bundle, "rootfs"))
    return bundle


def run(zviz_bin, base, bundle, profile="ci-runner"):
    cid = unique_id("zviz-audit")
    root = os.path.join(base, "root")
    try:
        result = subprocess.run(
            [zviz_bin, "--root", root, "run", "--profile", profile, "--bundle", bundle, cid],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    finally:
        subprocess.run([zviz_bin, "--root", root, "delete", "-f", cid], capture_output=True)
    return result, leftovers(cid, root)


def proc_through_a_link_a_volume_hides(rootfs):
    shutil.rmtree(os.path.join(rootfs, "proc"))
    os.symlink("/tmp/l/proc", os.path.join(rootfs, "proc"))
    os.symlink("/x", os.path.join(rootfs, "tmp", "l"))
    os.makedirs(os.path.join(rootfs, "x", "proc"))


def sys_through_a_link_a_volume_hides(rootfs):
    shutil.rmtree(os.path.join(rootfs, "sys"))
    os.symlink("/tmp/l/sys", os.path.join(rootfs, "sys"))
    os.symlink("/x", os.path.join(rootfs, "tmp", "l"))
    os.makedirs(os.path.join(rootfs, "x", "sys"))


PROBE = (
    "ls /x/proc/timer_list /x/proc/1 >/dev/null 2>&1 && echo UNMASKED-PROC; "
    "grep -q ' /x/proc proc rw' /proc/mounts /x/proc/mounts 2>/dev/null && echo RW-PROC; "
    "ls /x/sys/firmware/* >/dev/null 2>&1 && echo UNMASKED-SYS; "
    "echo done"
)


@pytest.mark.parametrize(
    "redirect",
    [proc_through_a_link_a_volume_hides, sys_through_a_link_a_volume_hides],
    ids=["proc", "sysfs"],
)
def test_proc_or_sys_through_an_image_symlink_is_refused(zviz_bin, base, redirect):
    result, left = run(zviz_bin, base, make_bundle(base, PROBE, redirect))
    assert "UNMASKED" not in result.stdout and "RW-PROC" not in result.stdout, result.stdout
    assert result.returncode != 0, result.stdout
    assert "symlink" in result.stderr, result.stderr
    assert left == []


def test_ordinary_proc_and_sys_still_mount(zviz_bin, base):
    result, left = run(
        zviz_bin,
        base,
        make_bundle(base, "test -r /proc/self/status && test -d /sys/kernel && echo fine", str),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fine"]
    assert left == []
