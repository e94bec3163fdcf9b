"""zviz as a Kubernetes RuntimeClass: containerd's CRI plugin drives the zviz shim.

This is what a kubelet does through the CRI (k8s.io/cri-api runtime.v1) with a pod whose
RuntimeClass has handler `zviz`: run a pod sandbox, create and start a container in it,
exec into it, stop and remove everything. The CRI client is ours (grpclib and the part
of the CRI proto we use, integration/cri/api.proto, compiled here); containerd 1.6 and
its CRI plugin are Debian's, started privately with handler `zviz` mapped to
io.containerd.zviz.v2. No kubelet runs on this machine: the calls are the ones a kubelet
makes, in its order, with its namespace choices (pod network = the node's: no CNI here).
"""

import asyncio
import importlib
import os
import shutil
import sys
import tempfile
import uuid

import pytest

from integration.cgroup_checks import host_version
from integration.ids import session_tag, tagged
from integration.zviz_cli import remove_test_slices
from tools.containerd import CRI_NAMESPACE, VENV_BIN, PrivateContainerd
from tools.mkimage import DEFAULT_REF, build_image

PROTO_DIR = os.path.join(os.path.dirname(__file__), "cri")
PAUSE_IMAGE = "zviz.local/pause:latest"


@pytest.fixture(scope="module")
def cri(tmp_path_factory):
    """(containerd with the CRI plugin, the compiled CRI modules)."""
    images = tmp_path_factory.mktemp("cri-images")
    build_image(str(images / "pause.tar"), PAUSE_IMAGE, cmd=("sleep", "2147483647"))
    build_image(str(images / "busybox.tar"), DEFAULT_REF)
    daemon = PrivateContainerd(cri_sandbox_image=PAUSE_IMAGE).start()
    try:
        daemon.import_image(str(images / "pause.tar"), namespace=CRI_NAMESPACE)
        daemon.import_image(str(images / "busybox.tar"), namespace=CRI_NAMESPACE)
        yield daemon, _compile_cri(str(tmp_path_factory.mktemp("cri-proto")))
    finally:
        daemon.stop()


def _compile_cri(out_dir: str):
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--plugin=protoc-gen-grpclib_python={VENV_BIN}/protoc-gen-grpclib_python",
        f"--grpclib_python_out={out_dir}",
        "api.proto",
    ]
    assert protoc.main(args) == 0, "protoc failed on integration/cri/api.proto"
    sys.path.insert(0, out_dir)
    try:
        return importlib.import_module("api_pb2"), importlib.import_module("api_grpc")
    finally:
        sys.path.remove(out_dir)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def _sandbox_config(pb, log_dir: str, pid_mode, cgroup_parent: str = ""):
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(
            name=tagged("zviz-pod"), uid=uuid.uuid4().hex, namespace="default"
        ),
        hostname="",  # as kubelet sends for a pod on the node's network (runc refuses one too)
        log_directory=log_dir,
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pid_mode)
            ),
        ),
    )


def _shim_processes() -> list[str]:
    """Command lines of the running zviz shims."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        line = b" ".join(args).decode(errors="replace")
        if "containerd-shim-zviz-v2" in line:
            found.append(line)
    return found


@pytest.mark.parametrize(
    ("share_pids", "systemd_cgroups"),
    [(False, False), (True, False), (False, True)],
    ids=["own-pid-ns", "shared-pid-ns", "systemd-cgroup-driver"],
)
def test_a_pod_with_handler_zviz_runs_confined_execs_reads_its_volume_and_goes_away(
    cri, share_pids, systemd_cgroups
):
    # shared-pid-ns: the pod's shareProcessNamespace, the container joins the sandbox's.
    # systemd-cgroup-driver: the kubelet's pod slice as cgroup parent; CRI then sends
    # slice:cri-containerd:<id> cgroupsPaths.
    daemon, (pb, grpc) = cri
    pid_mode = pb.POD if share_pids else pb.CONTAINER
    pod_slice = (
        f"zviztest-pod{session_tag()}{uuid.uuid4().hex[:6]}.slice" if systemd_cgroups else ""
    )
    from grpclib.client import Channel

    log_dir = tempfile.mkdtemp(prefix=tagged("zviz-cri-logs") + "-")
    # As kubelet's /var/lib/kubelet/pods/<uid>/volumes/...: the volume under a directory
    # the container's root (an unprivileged host uid) may not traverse.
    private = tempfile.mkdtemp(prefix=tagged("zviz-cri-volume") + "-")
    volume = os.path.join(private, "volume")
    os.mkdir(volume, 0o755)
    with open(os.path.join(volume, "config"), "w") as f:
        f.write("from the volume\n")
    os.chmod(os.path.join(volume, "config"), 0o644)

    async def scenario() -> dict:
        seen: dict = {}
        async with Channel(path=daemon.address) as channel:
            runtime = grpc.RuntimeServiceStub(channel)
            version = await runtime.Version(pb.VersionRequest(version="v1"))
            seen["runtime"] = version.runtime_name
            sandbox_config = _sandbox_config(pb, log_dir, pid_mode, pod_slice)
            sandbox = await runtime.RunPodSandbox(
                pb.RunPodSandboxRequest(config=sandbox_config, runtime_handler="zviz")
            )
            sandbox_id = sandbox.pod_sandbox_id
            seen["shims"] = _shim_processes()
            container_id = ""
            try:
                created = await runtime.CreateContainer(
                    pb.CreateContainerRequest(
                        pod_sandbox_id=sandbox_id,
                        sandbox_config=sandbox_config,
                        config=pb.ContainerConfig(
                            metadata=pb.ContainerMetadata(name="app"),
                            image=pb.ImageSpec(image=DEFAULT_REF),
                            command=["sh", "-c", "echo app up; exec sleep 300"],
                            envs=[pb.KeyValue(key="GREETING", value="hello")],
                            mounts=[
                                pb.Mount(container_path="/config", host_path=volume, readonly=True)
                            ],
                            log_path="app.log",
                            linux=pb.LinuxContainerConfig(
                                security_context=pb.LinuxContainerSecurityContext(
                                    namespace_options=pb.NamespaceOption(
                                        network=pb.NODE, pid=pid_mode
                                    )
                                )
                            ),
                        ),
                    )
                )
                container_id = created.container_id
                await runtime.StartContainer(pb.StartContainerRequest(container_id=container_id))
                status = await runtime.ContainerStatus(
                    pb.ContainerStatusRequest(container_id=container_id)
                )
                seen["state"] = status.status.state
                if pod_slice:
                    scope = f"zviztest.slice/{pod_slice}/cri-containerd-{container_id}.scope"
                    mount = "/sys/fs/cgroup/pids" if host_version() == 1 else "/sys/fs/cgroup"
                    seen["scope"] = os.path.isdir(f"{mount}/{scope}")
                script = (
                    "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
                    "cat /proc/self/uid_map; cat /config/config; echo $GREETING; "
                    "echo pid1: $(tr '\\0' ' ' < /proc/1/cmdline); "
                    "mount -t tmpfs none /mnt 2>&1 || echo mount refused"
                )
                result = await runtime.ExecSync(
                    pb.ExecSyncRequest(
                        container_id=container_id, cmd=["sh", "-c", script], timeout=30
                    )
                )
                seen["exec"] = (result.exit_code, result.stdout.decode(), result.stderr.decode())
                await runtime.StopContainer(
                    pb.StopContainerRequest(container_id=container_id, timeout=0)
                )
                status = await runtime.ContainerStatus(
                    pb.ContainerStatusRequest(container_id=container_id)
                )
                seen["stopped"] = (status.status.state, status.status.exit_code)
                await runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id))
            finally:
                await runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
                await runtime.RemovePodSandbox(
                    pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id)
                )
            seen["ids"] = (sandbox_id, container_id)
        return seen

    try:
        seen = run(scenario())
        with open(os.path.join(log_dir, "app.log")) as f:
            log = f.read()
    finally:
        shutil.rmtree(log_dir)
        shutil.rmtree(private)
        if pod_slice:
            remove_test_slices(pod_slice)

    assert seen["runtime"] == "containerd"
    assert seen["shims"], "the pod must run under containerd-shim-zviz-v2"
    assert seen["state"] == pb.CONTAINER_RUNNING
    if pod_slice:
        assert seen["scope"], "the container's scope must be where systemd would put it"
    code, out, err = seen["exec"]
    assert code == 0, err
    lines = out.splitlines()
    assert "CapEff:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines and "Seccomp:\t2" in lines
    assert lines[3].split()[:2] == ["0", "100000"]  # root in a user namespace, unprivileged outside
    assert "from the volume" in lines and "hello" in lines
    # PID 1 of the container's pid namespace: the sandbox's pause with a shared one.
    (pid1,) = [line for line in lines if line.startswith("pid1:")]
    assert pid1 == ("pid1: sleep 2147483647" if share_pids else "pid1: sleep 300")
    assert lines[-1] == "mount refused"
    assert seen["stopped"][0] == pb.CONTAINER_EXITED
    assert seen["stopped"][1] == 137  # StopContainer with timeout 0: SIGKILL
    assert "stdout F app up" in log  # CRI's log format: time stream tag line
    # Nothing of the pod is left (the shim daemon itself idles for the next container).
    for hierarchy in os.listdir("/sys/fs/cgroup"):
        for dirpath, dirnames, _ in os.walk(os.path.join("/sys/fs/cgroup", hierarchy)):
            assert not [d for d in dirnames if d in seen["ids"]], dirpath
