"""Landlock's signal scope in a pid namespace shared with another container.

zviz leaves the signal scope out when a container has a pid namespace of its own
(`security._signals_need_scope`: the namespace already keeps every other process out of
reach). Where the pid namespace is joined, it holds another container's processes, and
the scope is what stops a signal: the same user namespace means the same ids, so the
kernel's own permission check lets it through (runc, the reference, shows that).

Container A runs `sleep`; container B joins A's user and pid namespaces by path, as a
pod's containers join its sandbox's, and sends signal 0 and SIGTERM to A's PID 1.
"""

import json
import os
import subprocess
import time

import pytest

from integration.ids import tagged
from integration.zviz_cli import Zviz, edit_config, leftovers, unique_id
from runtime.security import landlock

PROFILES = ["ci-runner", "hostile-tenant"]
# B's verdict on each signal, one line each: "sig0=0" is reached, "sig0=1" refused.
PROBE = "kill -0 1; echo sig0=$?; kill -TERM 1; echo term=$?"


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def _needs_signal_scope():
    if landlock.abi_version() < 6:
        pytest.skip(f"Landlock ABI {landlock.abi_version()}: signal scope needs ABI 6")


@pytest.mark.parametrize("profile", PROFILES)
def test_a_container_in_a_shared_pid_namespace_cannot_signal_the_others(zviz, make_bundle, profile):
    _needs_signal_scope()
    first, second = unique_id("zviz-sigscope-a"), unique_id("zviz-sigscope-b")
    bundle_a = make_bundle(["sleep", "1000"])
    bundle_b = make_bundle(["sh", "-c", PROBE])
    try:
        created = zviz.create(bundle_a, first, "--profile", profile)
        assert created.returncode == 0, created.stderr
        started = zviz("start", first)
        assert started.returncode == 0, started.stderr
        pid_a = zviz.state(first)["pid"]

        def join_a(config):
            linux = config["linux"]
            linux.pop("uidMappings", None)
            linux.pop("gidMappings", None)
            kept = [ns for ns in linux["namespaces"] if ns["type"] not in ("pid", "user")]
            linux["namespaces"] = [
                *kept,
                {"type": "user", "path": f"/proc/{pid_a}/ns/user"},
                {"type": "pid", "path": f"/proc/{pid_a}/ns/pid"},
            ]

        edit_config(bundle_b, join_a)
        probe = zviz(
            "run", "--profile", profile, "--bundle", bundle_b, second, stdin=subprocess.DEVNULL
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
        said = dict(line.split("=", 1) for line in probe.stdout.split() if "=" in line)
        # busybox kill: 1 when the kernel refused (EPERM: Landlock's scope).
        assert said == {"sig0": "1", "term": "1"}, probe.stdout + probe.stderr
        time.sleep(0.2)
        assert zviz.state(first)["status"] == "running"
        assert os.path.exists(f"/proc/{pid_a}")
    finally:
        for container_id in (second, first):
            zviz("delete", "--force", container_id)
        assert leftovers(first, zviz.root) == [] and leftovers(second, zviz.root) == []


def test_runc_lets_the_signal_through(runc_bin, make_bundle, tmp_path):
    """The reference: without Landlock the kernel's check alone lets B signal A's PID 1
    (both host root), so the refusal above is the scope's."""
    root = str(tmp_path / tagged("runc-root"))
    first, second = unique_id("runc-sigscope-a"), unique_id("runc-sigscope-b")
    bundle_a = make_bundle(["sleep", "1000"])
    bundle_b = make_bundle(["sh", "-c", "kill -0 1; echo sig0=$?"])
    runc = [runc_bin, "--root", root]
    try:
        subprocess.run(
            [*runc, "create", "--bundle", bundle_a, first],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        subprocess.run([*runc, "start", first], check=True, timeout=60)
        state = subprocess.run([*runc, "state", first], capture_output=True, text=True, check=True)
        pid_a = json.loads(state.stdout)["pid"]
        edit_config(
            bundle_b,
            lambda config: config["linux"].update(
                namespaces=[
                    ns if ns["type"] != "pid" else {"type": "pid", "path": f"/proc/{pid_a}/ns/pid"}
                    for ns in config["linux"]["namespaces"]
                ]
            ),
        )
        probe = subprocess.run(
            [*runc, "run", "--bundle", bundle_b, second],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        assert "sig0=0" in probe.stdout, probe.stdout + probe.stderr
    finally:
        for container_id in (second, first):
            subprocess.run([*runc, "delete", "--force", container_id], capture_output=True)
