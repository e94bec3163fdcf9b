"""zviz as a RuntimeClass handler of containerd 2.x's CRI plugin (tools/gotools.py builds
the 2.x), as test_cri.py does with Debian's 1.6.

The same node harness (integration/cni_node.py: containerd inside a network namespace the
test makes, real CNI) with a 2.x, whose config version 3 splits the CRI plugin into
io.containerd.cri.v1.{runtime,images} (tools/containerd.py). test_cri.py's confined-pod
scenario (RunPodSandbox with handler zviz, a container with a volume and env, ExecSync,
StopContainer, RemoveContainer, nothing left) runs again here, and a pod under handler
runc is the reference for the handler mapping itself. 2.x's CRI asks every pod for
net.ipv4.ping_group_range "0 2147483647", which the kernel refuses inside zviz's user
namespace: every zviz pod failed here ("sysctl: Invalid argument") until the runtime
narrowed the range to the groups the namespace maps. Skipped with the reason when 2.x
is not built.
"""

import os
import subprocess

import pytest
from grpclib.exceptions import GRPCError

from integration.cni_node import SUBNET_PREFIX
from integration.test_cri import (  # noqa: F401 - test_cri's scenario, run again here
    APP_PORT,
    HTTPD,
    Pod,
    _shim_processes,
    cri_node,
    pod,
    run,
    test_a_pod_with_handler_zviz_runs_confined_execs_reads_its_volume_and_goes_away,
)
from tools import gotools
from tools.containerd import CRI_NAMESPACE

pytestmark = pytest.mark.containerd


@pytest.fixture(scope="module")
def cri(tmp_path_factory):
    binaries = [gotools.binary(gotools.CONTAINERD2, name) for name in ("containerd", "ctr")]
    if not all(binaries):
        pytest.skip(gotools.missing_reason(gotools.CONTAINERD2))
    # The runc handler: a runc that makes id-mapped mounts when built (hostUsers: false
    # needs one), else Debian's (that test's runc cell then skips, saying why).
    runc = gotools.binary(gotools.RUNC, "runc")
    with cri_node(
        tmp_path_factory, containerd_bin=binaries[0], ctr_bin=binaries[1], runc_binary=runc
    ) as harness:
        yield harness


def sandbox_range(containerd, pod_id: str) -> list[str]:
    """net.ipv4.ping_group_range in the pod sandbox's netns, read from the host."""
    tasks = containerd.ctr("tasks", "ls", namespace=CRI_NAMESPACE).stdout.splitlines()
    (pid,) = [line.split()[1] for line in tasks if line.startswith(pod_id)]
    read = subprocess.run(
        ["nsenter", "-t", pid, "-n", "cat", "/proc/sys/net/ipv4/ping_group_range"],
        capture_output=True,
        text=True,
        check=True,
    )
    return read.stdout.split()


@pytest.mark.parametrize("handler", ["runc", "zviz"])
def test_the_handler_picks_the_runtime_under_containerd_2(cri, tmp_path, handler):
    pb = cri.pb

    async def scenario():
        async with pod(cri, handler, tmp_path / "logs") as the_pod:
            version = await the_pod.runtime.Version(pb.VersionRequest(version="v1"))
            container_id = await the_pod.start_container("app", "exec sleep 300")
            shims = _shim_processes()
            # containerd 2.x's CRI asks net.ipv4.ping_group_range "0 2147483647" for every
            # pod sandbox (runc's containers share its netns, so they show it).
            script = "cat /proc/self/uid_map /proc/sys/net/ipv4/ping_group_range"
            return (
                version,
                shims,
                await the_pod.exec(container_id, script),
                sandbox_range(cri.node.containerd, the_pod.id),
            )

    version, shims, (code, out, err), in_sandbox = run(scenario())
    assert version.runtime_version.lstrip("v").startswith("2."), version.runtime_version
    assert code == 0, err
    if handler == "zviz":
        assert shims, "handler zviz must run the pod under containerd-shim-zviz-v2"
        assert out.split()[:2] == ["0", "100000"]  # the default profile's user namespace
        # The pod's netns is the host user namespace's: the runtime writes the pod's net
        # sysctls there as host root, as runc does (PID 1 could not), so the whole range
        # holds; the container, in that netns, reads it through its own id map.
        assert in_sandbox == ["0", "2147483647"], in_sandbox
        assert out.split()[3:] == ["65534", "65534"], out
    else:
        assert out.split()[:3] == ["0", "0", "4294967295"]  # runc: no user namespace
        assert out.split()[3:] == ["0", "2147483647"], out
        assert in_sandbox == ["0", "2147483647"], in_sandbox


# ---- hostUsers: false: the kubelet's user namespace, through 2.x's CRI ----------------

# The kubelet hands each hostUsers: false pod a 65536-aligned range of host ids.
USERNS_HOST_ID = 0x70000
USERNS_LENGTH = 65536


def runc_version() -> str:
    """What the CRI's runc handler runs: the runc on PATH when RUNC is not built."""
    runc = gotools.binary(gotools.RUNC, "runc") or "runc"
    version = subprocess.run([runc, "--version"], capture_output=True, text=True).stdout
    return version.split("\n")[0]


def task_pid(containerd, container_id: str) -> str:
    """The host pid of a CRI container's task (ctr tasks ls in k8s.io)."""
    tasks = containerd.ctr("tasks", "ls", namespace=CRI_NAMESPACE).stdout.splitlines()
    (pid,) = [line.split()[1] for line in tasks if line.startswith(container_id)]
    return pid


@pytest.mark.parametrize("handler", ["runc", "zviz"])
def test_a_host_users_false_pod_runs_in_the_kubelets_user_namespace(cri, tmp_path, handler):
    pb = cri.pb
    mapping = [pb.IDMapping(host_id=USERNS_HOST_ID, container_id=0, length=USERNS_LENGTH)]
    userns = pb.UserNamespace(mode=pb.POD, uids=mapping, gids=mapping)
    # An emptyDir as the kubelet makes one: 0777, root's, bound writable.
    volume = tmp_path / "empty-dir"
    volume.mkdir()
    volume.chmod(0o777)

    async def scenario():
        async with cri.runtime() as runtime:
            the_pod = Pod(cri, runtime, handler, str(tmp_path / "logs"))
            # The kubelet sends the same userns_options in the sandbox's and every
            # container's namespace options.
            the_pod._namespaces = lambda: pb.NamespaceOption(
                network=pb.POD, pid=pb.CONTAINER, userns_options=userns
            )
            try:
                await the_pod.run()
                app = await the_pod.start_container(
                    "app",
                    HTTPD.format(listen=f"0.0.0.0:{APP_PORT}"),
                    mounts=[pb.Mount(container_path="/data", host_path=str(volume))],
                )
                seen = {"ip": await the_pod.ip()}
                seen["inside"] = await the_pod.exec(
                    app,
                    "cat /proc/self/uid_map /proc/self/gid_map; id -u; "
                    "grep -c ' /tmp ' /proc/self/mountinfo; stat -c '%u %g' /etc/hosts; "
                    "echo made > /data/made-here && echo made > /tmp/made-in-rootfs && echo written",
                )
                pid = task_pid(cri.node.containerd, app)
                seen["rootfs_file"] = os.stat(f"/proc/{pid}/root/tmp/made-in-rootfs")
                # What a kubelet probe does: the node reaches the pod's server on its IP.
                await the_pod.wait_listening(app, f"127.0.0.1:{APP_PORT}")
                seen["probe"] = cri.node.http_get_from_node(seen["ip"], APP_PORT, "/ping")
                return seen
            finally:
                await the_pod.remove()

    try:
        seen = run(scenario())
    except GRPCError as error:
        # containerd 2.x asks the runtime's `features` whether it makes id-mapped mounts
        # (the pod's /etc/hosts, /etc/hostname, /etc/resolv.conf are) and refuses one that
        # does not say so: Debian's runc 1.1 has no mountExtensions entry.
        if handler == "runc" and "idmap mounts not supported" in str(error.message):
            pytest.skip(
                f"the reference cannot run it here: {runc_version()}: {error.message}"
                f" ({gotools.missing_reason(gotools.RUNC)})"
            )
        raise
    code, out, err = seen["inside"]
    assert code == 0, (out, err)
    lines = out.splitlines()
    expected = ["0", str(USERNS_HOST_ID), str(USERNS_LENGTH)]
    assert [line.split() for line in lines[:2]] == [expected, expected], out
    assert lines[2] == "0", out  # root, in the kubelet's user namespace
    assert lines[3] == "0", out  # /tmp is the rootfs's: no mount of its own
    # containerd made the pod's /etc/hosts as host root and asked for it id-mapped: the
    # pod's root owns it.
    assert lines[4] == "0 0", out
    assert lines[5] == "written", out
    # Container root is USERNS_HOST_ID on the host: what it creates is that uid's, in the
    # volume and in its rootfs alike.
    made = (volume / "made-here").stat()
    assert (made.st_uid, made.st_gid) == (USERNS_HOST_ID, USERNS_HOST_ID)
    rootfs_file = seen["rootfs_file"]
    assert (rootfs_file.st_uid, rootfs_file.st_gid) == (USERNS_HOST_ID, USERNS_HOST_ID)
    # The pod kept its network: an address from the CNI, reachable from the node.
    assert seen["ip"].startswith(SUBNET_PREFIX + "."), seen["ip"]
    assert seen["probe"].startswith(b"HTTP/1.") and seen["probe"].endswith(b"\r\n\r\npong\n")
