"""Other host users and a running container's bundle (issue 10, item 7).

The shim used to `chmod 0711` containerd's bundle so that a user-namespaced PID 1 could
walk to its rootfs; every host user could then read the container's files and write
its /tmp through `<bundle>/rootfs`. PID 1 never walks that path (the namespace child
chdirs into the rootfs as host root, and the parent clones the rootfs with open_tree),
so the bundle keeps containerd's mode.
"""

import os
import stat
import subprocess
import time

import pytest

from integration.ids import unique_id

pytestmark = pytest.mark.containerd

ZVIZ = "io.containerd.zviz.v2"
NOBODY = 65534


def as_nobody(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )


# native: the rootfs is a plain directory, bind-mounted; overlayfs: containerd's default
# (there a host-side write into the upper layer fails anyway while zviz's id-mapped
# overlay shares it, so only the read shows the hole).
@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
def test_other_host_users_cannot_reach_a_running_containers_rootfs(
    containerd, busybox_image, snapshotter
):
    cid = unique_id(f"zviz-bundle-{snapshotter}")
    bundle = os.path.join(
        containerd.state, "io.containerd.runtime.v2.task", containerd.namespace, cid
    )
    rootfs = os.path.join(bundle, "rootfs")
    try:
        containerd.ctr(
            "run",
            "-d",
            "--snapshotter",
            snapshotter,
            "--runtime",
            ZVIZ,
            busybox_image,
            cid,
            "sleep",
            "1000",
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(rootfs, "etc", "passwd")):
            assert time.monotonic() < deadline, f"{rootfs} never appeared"
            time.sleep(0.05)
        mode = stat.S_IMODE(os.stat(bundle).st_mode)
        # containerd's modes: 0700, or 0710 with the mapped root's group when it maps users.
        assert mode & 0o007 == 0, f"bundle mode {mode:04o} lets other users in"
        read = as_nobody("/bin/cat", os.path.join(rootfs, "etc", "passwd"))
        assert read.returncode != 0 and "Permission denied" in read.stderr, read
        if snapshotter == "native":
            planted = os.path.join(rootfs, "tmp", "planted")
            write = as_nobody("/bin/sh", "-c", f"echo planted > {planted}")
            assert "Permission denied" in write.stderr and not os.path.exists(planted), write
        # The container still runs: nothing it needs went through the bundle.
        tasks = containerd.ctr("tasks", "ls").stdout
        assert any(line.split()[:1] == [cid] and "RUNNING" in line for line in tasks.splitlines())
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        containerd.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
        containerd.ctr("containers", "delete", cid, check=False)
