"""Landlock rules name paths; a malicious image must not move them with symlinks.

The profile's writable paths (/home, /run, /tmp, ...) are directories the image
provides. If the image makes one a symlink to /dev (or /), a rule opened through
the symlink grants write beneath /dev: the workload can then create files in the
container's /dev tmpfs (owned by the container's root) and read devices
config.json added but the profile does not list. The rules must land only on
paths reached without symlinks; through a symlink, the target's own rule decides.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from integration.ids import tagged, unique_id
from tools.mkbundle import build_bundle


@pytest.fixture
def base():
    # The mapped container root must reach the bundle (pytest's tmp dirs are 0700).
    path = tempfile.mkdtemp(prefix=tagged("zviz-audit-ll") + "-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_in_image(zviz_bin, base, profile, script, image_change, mounts=()):
    bundle = os.path.join(base, unique_id("bundle"))
    build_bundle(bundle, args=["/bin/sh", "-c", script])
    if mounts:
        config_path = os.path.join(bundle, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["mounts"] += list(mounts)
        with open(config_path, "w") as f:
            json.dump(config, f)
    image_change(os.path.join(bundle, "rootfs"))
    cid = unique_id("zviz-audit")
    root = os.path.join(base, "root")
    try:
        return subprocess.run(
            [zviz_bin, "--root", root, "run", "--profile", profile, "--bundle", bundle, cid],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    finally:
        subprocess.run([zviz_bin, "--root", root, "delete", "-f", cid], capture_output=True)


def symlink_to_dev(name):
    def change(rootfs):
        path = os.path.join(rootfs, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.symlink("/dev", path)

    return change


WRITE_IN_DEV = (
    "echo planted > /dev/zviz-audit-planted && echo WROTE || echo REFUSED; "
    "ls /dev/zviz-audit-planted 2>/dev/null || true"
)


@pytest.mark.parametrize(
    ("profile", "writable_name"),
    [("ci-runner", "home"), ("ci-runner", "run"), ("hostile-tenant", "tmp")],
)
def test_writable_path_symlinked_to_dev_grants_nothing_in_dev(
    zviz_bin, base, profile, writable_name
):
    result = run_in_image(zviz_bin, base, profile, WRITE_IN_DEV, symlink_to_dev(writable_name))
    assert result.returncode == 0, result.stderr
    assert "REFUSED" in result.stdout and "WROTE" not in result.stdout, result.stdout


def test_top_level_symlink_to_dev_grants_no_read_of_unlisted_files_in_dev(zviz_bin, base):
    # A file config.json binds into /dev is unreadable under ci-runner (not in
    # `devices`); an image entry /devlink -> /dev must not make it readable.
    secret = os.path.join(base, "secret")
    with open(secret, "w") as f:
        f.write("host-secret\n")
    os.chmod(secret, 0o644)
    script = "cat /devlink/zviz-secret 2>/dev/null || echo REFUSED; cat /dev/zviz-secret || true"

    def change(rootfs):
        os.symlink("/dev", os.path.join(rootfs, "devlink"))

    mount = {
        "destination": "/dev/zviz-secret",
        "type": "bind",
        "source": secret,
        "options": ["bind", "ro"],
    }
    result = run_in_image(zviz_bin, base, "ci-runner", script, change, mounts=[mount])
    assert result.returncode == 0, result.stderr
    assert "host-secret" not in result.stdout and "REFUSED" in result.stdout, result.stdout


def test_ordinary_image_symlinks_still_work(zviz_bin, base):
    # Merged-/usr style links (/var/run -> /run) keep working: the target's rule decides.
    def change(rootfs):
        os.makedirs(os.path.join(rootfs, "var"), exist_ok=True)
        os.symlink("/run", os.path.join(rootfs, "var", "run"))

    result = run_in_image(
        zviz_bin,
        base,
        "ci-runner",
        "echo ok > /var/run/f && cat /run/f && cat /bin/../bin/busybox > /dev/null && echo fine",
        change,
        mounts=[{"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": []}],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "fine"], result.stdout
