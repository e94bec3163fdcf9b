"""A Kubernetes pod's start and teardown through containerd's CRI: handler zviz vs runc.

    python -m bench pods          (or: make bench)

The kubelet's calls for a one-container pod, timed one by one on the same containerd
(Debian's 1.6) and CRI plugin, with the real CNI of the CRI tests (integration/cni_node.py:
containerd in a network namespace of its own, bridge + host-local IPAM, nothing added
to the host's netns):

    RunPodSandbox -> CreateContainer -> StartContainer -> ContainerStatus RUNNING
    the app (`echo ready; exec sleep`) prints its first line: "ready" in its CRI log
    StopContainer (timeout 0) -> RemoveContainer -> StopPodSandbox -> RemovePodSandbox

"to RUNNING" and "to first line" count from RunPodSandbox's call. One warm-up pod per
handler is not counted (zviz's shim daemon starts there, and both read the images once).
Runs are interleaved, the order flipped every iteration, with a pause between pods as in
bench/cli_run.py (a cgroup write waits for an RCU grace period unless one just passed).
The handler zviz runs the default profile (ci-runner) with the node's DNS as cluster DNS,
as docs/kubernetes.md configures it. Median and p90 per step, and zviz/runc of the medians.
"""

import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid

from grpclib.client import Channel

from bench.shim import _percentile
from integration.cni_node import DNS_IP, CniNode
from integration.ids import tagged
from tools.containerd import CRI_NAMESPACE
from tools.cri import PAUSE_IMAGE, build_pod_images, compile_cri
from tools.mkimage import DEFAULT_REF

RUNS = 20
HANDLERS = ("zviz", "runc")
PAUSE_S = 0.15
APP = "echo ready; exec sleep 600"
FIRST_LINE = "stdout F ready"
POLL_S = 0.002
STEPS = (
    ("RunPodSandbox", "sandbox"),
    ("CreateContainer", "create"),
    ("StartContainer", "start"),
    ("pod to RUNNING", "running"),
    ("pod to first line", "first_line"),
    ("StopContainer", "stop"),
    ("RemoveContainer", "remove"),
    ("StopPodSandbox", "stop_sandbox"),
    ("RemovePodSandbox", "remove_sandbox"),
    ("teardown, all four", "teardown"),
)


class PodTimer:
    """One containerd's CRI, and the timing of one pod at a time through it."""

    def __init__(self, pb, grpc, address: str, log_root: str):
        self.pb = pb
        self.grpc = grpc
        self.address = address
        self.log_root = log_root

    async def one_pod(self, handler: str) -> dict[str, float]:
        pb = self.pb
        uid = uuid.uuid4().hex
        log_dir = os.path.join(self.log_root, uid)
        os.makedirs(log_dir)
        namespaces = pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=tagged("zviz-bench-pod"), uid=uid, namespace="b"),
            hostname=f"pod-{uid[:8]}",
            log_directory=log_dir,
            dns_config=pb.DNSConfig(servers=[DNS_IP], searches=["test"]),
            linux=pb.LinuxPodSandboxConfig(
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=namespaces)
            ),
        )
        container = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="app"),
            image=pb.ImageSpec(image=DEFAULT_REF),
            command=["sh", "-c", APP],
            log_path="app.log",
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(namespace_options=namespaces)
            ),
        )
        times: dict[str, float] = {}
        async with Channel(path=self.address) as channel:
            cri = self.grpc.RuntimeServiceStub(channel)
            began = time.perf_counter()
            sandbox = await cri.RunPodSandbox(
                pb.RunPodSandboxRequest(config=config, runtime_handler=handler)
            )
            pod_id = sandbox.pod_sandbox_id
            try:
                mark = time.perf_counter()
                times["sandbox"] = mark - began
                created = await cri.CreateContainer(
                    pb.CreateContainerRequest(
                        pod_sandbox_id=pod_id, sandbox_config=config, config=container
                    )
                )
                times["create"] = time.perf_counter() - mark
                mark = time.perf_counter()
                container_id = created.container_id
                await cri.StartContainer(pb.StartContainerRequest(container_id=container_id))
                times["start"] = time.perf_counter() - mark
                times["running"] = await self._until_running(cri, container_id) - began
                times["first_line"] = await _until_logged(os.path.join(log_dir, "app.log")) - began
                mark = time.perf_counter()
                await cri.StopContainer(
                    pb.StopContainerRequest(container_id=container_id, timeout=0)
                )
                times["stop"] = time.perf_counter() - mark
                mark = time.perf_counter()
                await cri.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id))
                times["remove"] = time.perf_counter() - mark
            finally:
                mark = time.perf_counter()
                await cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
                times["stop_sandbox"] = time.perf_counter() - mark
                mark = time.perf_counter()
                await cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
                times["remove_sandbox"] = time.perf_counter() - mark
        times["teardown"] = sum(
            times[k] for k in ("stop", "remove", "stop_sandbox", "remove_sandbox")
        )
        shutil.rmtree(log_dir, ignore_errors=True)
        return times

    async def _until_running(self, cri, container_id: str, timeout: float = 30) -> float:
        """perf_counter() when ContainerStatus first says RUNNING (StartContainer returns
        once the task started, so this is normally the first ask)."""
        deadline = time.perf_counter() + timeout
        while True:
            status = await cri.ContainerStatus(
                self.pb.ContainerStatusRequest(container_id=container_id)
            )
            now = time.perf_counter()
            if status.status.state == self.pb.CONTAINER_RUNNING:
                return now
            if now > deadline or status.status.state == self.pb.CONTAINER_EXITED:
                raise RuntimeError(f"container {container_id}: {status.status}")
            await asyncio.sleep(POLL_S)


async def _until_logged(path: str, timeout: float = 30) -> float:
    """perf_counter() when the app's first line is in its CRI log (containerd copies the
    container's output there; within POLL_S of its arrival)."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            with open(path) as log:
                if FIRST_LINE in log.read():
                    return time.perf_counter()
        except FileNotFoundError:
            pass
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{FIRST_LINE!r} never reached {path}")
        await asyncio.sleep(POLL_S)


def _print_table(samples: dict[str, list[dict[str, float]]], runs: int) -> None:
    print(
        f"one-container pod through containerd 1.6's CRI with CNI, {runs} pods per handler, "
        "interleaved; ms"
    )
    print(
        f"{'step':<20} {'zviz median':>11} {'p90':>7} {'runc median':>11} {'p90':>7} {'zviz/runc':>9}"
    )
    for label, key in STEPS:
        row = {}
        for handler in HANDLERS:
            values = [s[key] for s in samples[handler]]
            row[handler] = (statistics.median(values) * 1000, _percentile(values, 0.9) * 1000)
        ratio = row["zviz"][0] / row["runc"][0]
        print(
            f"{label:<20} {row['zviz'][0]:>11.1f} {row['zviz'][1]:>7.1f} "
            f"{row['runc'][0]:>11.1f} {row['runc'][1]:>7.1f} {ratio:>8.2f}x"
        )


def main(runs: int = RUNS) -> None:
    workdir = tempfile.mkdtemp(prefix=tagged("zviz-bench-pods") + "-")
    shim_config = os.path.join(workdir, "zviz.toml")
    with open(shim_config, "w") as f:
        f.write(f'cluster_dns = ["{DNS_IP}:53"]\n')
    node = None
    try:
        archives = build_pod_images(workdir)
        pb, grpc = compile_cri(workdir)
        node = CniNode(
            sandbox_image=PAUSE_IMAGE, cri_handlers={"zviz": shim_config}, debug=False
        ).start()
        for archive in archives:
            node.containerd.import_image(archive, namespace=CRI_NAMESPACE)
        timer = PodTimer(pb, grpc, node.containerd.address, os.path.join(workdir, "logs"))
        for handler in HANDLERS:  # warm-up, not counted
            asyncio.run(timer.one_pod(handler))
        samples: dict[str, list[dict[str, float]]] = {h: [] for h in HANDLERS}
        for index in range(runs):
            order = HANDLERS if index % 2 == 0 else HANDLERS[::-1]
            for handler in order:
                time.sleep(PAUSE_S)
                samples[handler].append(asyncio.run(timer.one_pod(handler)))
        _print_table(samples, runs)
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
