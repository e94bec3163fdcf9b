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

import subprocess

import pytest

from integration.test_cri import (  # noqa: F401 - test_cri's scenario, run again here
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
    with cri_node(tmp_path_factory, containerd_bin=binaries[0], ctr_bin=binaries[1]) as harness:
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
