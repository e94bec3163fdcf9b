"""containerd's own runc shim (io.containerd.runc.v2) drives `zviz` as its runtime binary.

`ctr run --runc-binary <zviz>` makes the real peer call zviz exactly as it calls runc
(through go-runc): create with --pid-file/--log-format json, start, state, exec,
ps --format json, kill, delete. Passing here proves the CLI keeps runc's flags and
output formats.
"""

import os
import time

import pytest

from integration.cgroup_checks import host_version
from integration.zviz_cli import unique_id

pytestmark = [pytest.mark.containerd, pytest.mark.every_containerd]

RUNC_SHIM = "io.containerd.runc.v2"


def ctr_run(containerd, zviz_bin, image, container_id, *args, detach=False, timeout=60):
    flags = ["--runtime", RUNC_SHIM, "--runc-binary", zviz_bin]
    if detach:
        flags.append("-d")
    else:
        flags.append("--rm")
    return containerd.ctr("run", *flags, image, container_id, *args, check=False, timeout=timeout)


def cleanup(containerd, container_id):
    containerd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=False)
    for _ in range(100):
        if containerd.ctr("task", "delete", container_id, check=False).returncode == 0:
            break
        if "not found" in containerd.ctr("task", "ls", check=False).stdout + "not found":
            pass
        time.sleep(0.1)
    containerd.ctr("container", "delete", container_id, check=False)


def test_run_passes_output_and_exit_code(containerd, busybox_image, zviz_bin):
    container_id = unique_id("zviz-rt-ctr")
    result = ctr_run(
        containerd,
        zviz_bin,
        busybox_image,
        container_id,
        "sh",
        "-c",
        "echo hello-from-zviz; echo pid=$$; exit 3",
    )
    try:
        assert "hello-from-zviz" in result.stdout, result.stderr
        assert "pid=1" in result.stdout
        assert result.returncode == 3, (result.stdout, result.stderr)
    finally:
        cleanup(containerd, container_id)


def test_detached_task_exec_ps_kill_delete(containerd, busybox_image, zviz_bin):
    container_id = unique_id("zviz-rt-ctr")
    started = ctr_run(containerd, zviz_bin, busybox_image, container_id, "sleep", "60", detach=True)
    assert started.returncode == 0, started.stderr
    try:
        tasks = containerd.ctr("task", "ls").stdout
        assert container_id in tasks and "RUNNING" in tasks
        # zviz's state dir lives under the root the shim passed (runc's layout).
        runc_root = f"/run/containerd/runc/{containerd.namespace}"
        # containerd sets linux.cgroupsPath to /<namespace>/<id>
        mount = "/sys/fs/cgroup/pids" if host_version() == 1 else "/sys/fs/cgroup"
        cgroup_dir = f"{mount}/{containerd.namespace}/{container_id}"
        assert os.path.exists(os.path.join(runc_root, container_id, "state.json"))

        executed = containerd.ctr(
            "task", "exec", "--exec-id", "probe", container_id, "sh", "-c", "echo exec-ok; hostname"
        )
        assert "exec-ok" in executed.stdout, executed.stderr

        assert os.path.isdir(cgroup_dir)
        ps = containerd.ctr("task", "ps", container_id)
        pids = [int(line.split()[0]) for line in ps.stdout.splitlines()[1:] if line.split()]
        assert pids, ps.stdout
        for pid in pids:
            assert os.path.exists(f"/proc/{pid}")

        assert containerd.ctr("task", "pause", container_id).returncode == 0
        assert "PAUSED" in containerd.ctr("task", "ls").stdout
        assert containerd.ctr("task", "resume", container_id).returncode == 0
        assert "RUNNING" in containerd.ctr("task", "ls").stdout

        assert containerd.ctr("task", "kill", "-s", "SIGKILL", container_id).returncode == 0
        deadline = time.monotonic() + 30
        while "STOPPED" not in containerd.ctr("task", "ls").stdout:
            assert time.monotonic() < deadline, "the task never stopped"
            time.sleep(0.1)
        deleted = containerd.ctr("task", "delete", container_id, check=False)
        assert deleted.returncode == 0, deleted.stderr
        assert not os.path.exists(os.path.join(runc_root, container_id))
        assert not os.path.exists(cgroup_dir)
    finally:
        cleanup(containerd, container_id)


def test_runtime_errors_reach_ctr_through_the_json_log(containerd, busybox_image, zviz_bin):
    container_id = unique_id("zviz-rt-ctr")
    result = ctr_run(containerd, zviz_bin, busybox_image, container_id, "/no/such/binary")
    try:
        assert result.returncode != 0
        # go-runc reads the last error line of --log (json); the shim puts it in the reply.
        assert "/no/such/binary" in result.stderr, result.stderr
    finally:
        cleanup(containerd, container_id)
