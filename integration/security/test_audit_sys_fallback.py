"""The /sys fallback must be read-only all the way down (issue 10, suspicion).

A user namespace may mount sysfs only with a network namespace of its own; when it
joins one owned by the host (a pod's sandbox namespace), zviz binds the host's /sys
recursively instead. The read-only remount reached only the top mount: every mount
beneath (/sys/fs/cgroup/*, /sys/kernel/security, /sys/fs/bpf, ...) stayed writable.
"""

import os
import subprocess

import pytest

from integration.ids import unique_id
from integration.security.test_audit_landlock import base, run_in_image  # noqa: F401
from integration.zviz_cli import edit_config


@pytest.fixture
def host_owned_netns():
    name = unique_id("zviz-audit-sys")  # /run/netns/<name> is a mount point
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_sys_bound_from_the_host_is_read_only_in_every_submount(zviz_bin, base, host_owned_netns):  # noqa: F811
    script = 'awk \'$5 ~ "^/sys" {print "MOUNT", $5, $6}\' /proc/self/mountinfo'

    def join_netns(rootfs):
        def change(config):
            for ns in config["linux"]["namespaces"]:
                if ns["type"] == "network":
                    ns["path"] = host_owned_netns
                    break
            else:
                config["linux"]["namespaces"].append({"type": "network", "path": host_owned_netns})

        edit_config(os.path.dirname(rootfs), change)

    result = run_in_image(zviz_bin, base, "web-server", script, join_netns)
    assert result.returncode == 0, result.stderr
    assert "binding /sys read-only" in result.stderr, "the fallback was not taken: " + result.stderr
    mounts = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("MOUNT ")]
    assert len(mounts) > 1, result.stdout  # the host's /sys has submounts: they are the point
    writable = [point for point, options in mounts if "ro" not in options.split(",")]
    assert not writable, f"writable under the /sys fallback: {writable}"
