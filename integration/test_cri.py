"""zviz as a Kubernetes RuntimeClass: containerd's CRI plugin drives the zviz shim.

This is what a kubelet does through the CRI (k8s.io/cri-api runtime.v1) with a pod whose
RuntimeClass has handler `zviz`: run a pod sandbox, create and start containers in it,
exec into them, stop and remove everything. The CRI client is ours (grpclib and the part
of the CRI proto we use, integration/cri/api.proto, compiled here); containerd 1.6 and
its CRI plugin are Debian's, started privately with handler `zviz` mapped to
io.containerd.zviz.v2 and handler `runc` to io.containerd.runc.v2. No kubelet runs on
this machine: the calls are the ones a kubelet makes, in its order, with its namespace
choices.

The harness (integration/cni_node.py), one per module: containerd runs inside a "node"
network namespace the test creates, with a real CNI (Debian's bridge + host-local IPAM on
10.211.0.0/24, bridge zbr0 in the node netns), so every pod gets its own network
namespace with an address, as on a Kubernetes node. Beside the pods, on the same bridge:
a "service" host (a TCP server at cni_node.SERVICE_IP:8080) and a DNS server (dnsmasq at
cni_node.DNS_IP, answering svc.test and nothing outside .test), which every pod gets as
its DNS config. Nothing is added to the host's network namespace; the node netns has no
default route and no masquerade, so no packet leaves the machine.

The pod scenarios of issue 11 run under both handlers in one run: `runc` is the
reference (a scenario that fails under runc is a broken test). A zviz cell marked
xfail(strict) is a behaviour issue 11 asks for and zviz lacks today: it turns red (XPASS)
when the behaviour arrives, and its mark must go then.
"""

import asyncio
import contextlib
import os
import subprocess
import time
import uuid

import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from integration.cgroup_checks import host_version
from integration.cni_node import (
    BRIDGE,
    DNS_IP,
    SERVICE_IP,
    SERVICE_NAME,
    SERVICE_PORT,
    SERVICE_REPLY,
    SUBNET_PREFIX,
    CniNode,
)
from integration.ids import session_tag, tagged
from integration.zviz_cli import remove_test_slices
from runtime.security import capabilities
from tools.containerd import CRI_NAMESPACE
from tools.cri import PAUSE_IMAGE, build_pod_images, compile_cri
from tools.mkimage import DEFAULT_REF

APP_PORT = 8080
# Serves /ping ("pong") from a directory every profile may write (/tmp).
HTTPD = "mkdir -p /tmp/www && echo pong > /tmp/www/ping && exec httpd -f -h /tmp/www -p {listen}"
# An HTTP GET from inside a container. nc, not busybox wget: static glibc's wget resolves
# the "http" service through NSS, which a busybox image lacks, and crashes (SIGSEGV).
HTTP_GET = "printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {port}"


class Cri:
    """The module's node: its CNI network, containerd, and the compiled CRI modules."""

    def __init__(self, node: CniNode, pb, grpc):
        self.node = node
        self.pb = pb
        self.grpc = grpc

    @contextlib.asynccontextmanager
    async def runtime(self):
        async with Channel(path=self.node.containerd.address) as channel:
            yield self.grpc.RuntimeServiceStub(channel)


# The zviz handler's shim config: the harness's dnsmasq is the cluster's DNS service, as
# an operator names kube-dns (docs/kubernetes.md). Nothing else of the cluster is named.
ZVIZ_SHIM_CONFIG = f'cluster_dns = ["{DNS_IP}:53"]\n'


@pytest.fixture(scope="module")
def cri(tmp_path_factory):
    handlers = handler_configs(tmp_path_factory, {"zviz": ZVIZ_SHIM_CONFIG})
    with cri_node(tmp_path_factory, cri_handlers=handlers) as harness:
        yield harness


def handler_configs(tmp_path_factory, texts: dict[str, str]) -> dict[str, str]:
    """Each handler's shim config (TEXTS: handler -> zviz.toml text) written to a file of
    its own: the cri_handlers of cri_node."""
    configs = tmp_path_factory.mktemp("shim-configs")
    handlers = {}
    for handler, text in texts.items():
        path = configs / f"{handler}.toml"
        path.write_text(text)
        handlers[handler] = str(path)
    return handlers


@contextlib.contextmanager
def cri_node(tmp_path_factory, **containerd_options):
    """A started node (CniNode with CONTAINERD_OPTIONS) with the images imported."""
    images = tmp_path_factory.mktemp("cri-images")
    archives = build_pod_images(str(images))
    pb, grpc = compile_cri(str(tmp_path_factory.mktemp("cri-proto")))
    node = CniNode(sandbox_image=PAUSE_IMAGE, **containerd_options).start()
    harness = Cri(node, pb, grpc)
    try:
        for archive in archives:
            node.containerd.import_image(archive, namespace=CRI_NAMESPACE)
        yield harness
    finally:
        # As the kubelet would for pods a failed test left behind: CNI DEL releases their
        # veths and addresses before the node's namespaces go.
        with contextlib.suppress(Exception):
            run(_remove_every_pod(harness))
        node.stop()


async def _remove_every_pod(cri: Cri) -> None:
    async with cri.runtime() as runtime:
        pods = await runtime.ListPodSandbox(cri.pb.ListPodSandboxRequest())
        for pod in pods.items:
            await runtime.StopPodSandbox(cri.pb.StopPodSandboxRequest(pod_sandbox_id=pod.id))
            await runtime.RemovePodSandbox(cri.pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


class Pod:
    """One pod, driven with the kubelet's calls: RunPodSandbox, then its containers."""

    def __init__(self, cri: Cri, runtime, handler: str, log_dir: str, host_network=False):
        self.pb = cri.pb
        self.runtime = runtime
        self.handler = handler
        self.network = cri.pb.NODE if host_network else cri.pb.POD
        self.pid_mode = cri.pb.CONTAINER
        self.log_dir = log_dir
        self.id = ""
        self.config = None

    async def run(
        self, share_pids: bool = False, cgroup_parent: str = "", annotations: dict | None = None
    ) -> None:
        pb = self.pb
        self.pid_mode = pb.POD if share_pids else pb.CONTAINER
        uid = uuid.uuid4().hex
        self.config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=tagged("zviz-pod"), uid=uid, namespace="default"),
            # The kubelet sends none for a hostNetwork pod (the node's name is the pod's).
            hostname="" if self.network == pb.NODE else f"pod-{uid[:8]}",
            # The pod's metadata.annotations, as the kubelet passes them on.
            annotations=annotations or {},
            log_directory=self.log_dir,
            # As the kubelet's dnsPolicy ClusterFirst, with the test's DNS as cluster DNS.
            dns_config=pb.DNSConfig(servers=[DNS_IP], searches=["test"]),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=self._namespaces()
                ),
            ),
        )
        sandbox = await self.runtime.RunPodSandbox(
            pb.RunPodSandboxRequest(config=self.config, runtime_handler=self.handler)
        )
        self.id = sandbox.pod_sandbox_id

    def _namespaces(self):
        return self.pb.NamespaceOption(network=self.network, pid=self.pid_mode)

    async def start_container(self, name: str, script: str, mounts=(), envs=()) -> str:
        pb = self.pb
        created = await self.runtime.CreateContainer(
            pb.CreateContainerRequest(
                pod_sandbox_id=self.id,
                sandbox_config=self.config,
                config=pb.ContainerConfig(
                    metadata=pb.ContainerMetadata(name=name),
                    image=pb.ImageSpec(image=DEFAULT_REF),
                    command=["sh", "-c", script],
                    envs=[pb.KeyValue(key=k, value=v) for k, v in envs],
                    mounts=list(mounts),
                    log_path=f"{name}.log",
                    linux=pb.LinuxContainerConfig(
                        security_context=pb.LinuxContainerSecurityContext(
                            namespace_options=self._namespaces()
                        )
                    ),
                ),
            )
        )
        await self.runtime.StartContainer(
            pb.StartContainerRequest(container_id=created.container_id)
        )
        return created.container_id

    async def exec(self, container_id: str, script: str, timeout: int = 30):
        """ExecSync `sh -c SCRIPT`: (exit code, stdout, stderr)."""
        result = await self.runtime.ExecSync(
            self.pb.ExecSyncRequest(
                container_id=container_id, cmd=["sh", "-c", script], timeout=timeout
            )
        )
        return result.exit_code, result.stdout.decode(), result.stderr.decode()

    async def wait_listening(self, container_id: str, address: str) -> None:
        """Until the container's own HTTP server answers on ADDRESS (asked from inside it)."""
        host, port = address.split(":")
        get = HTTP_GET.format(path="/ping", host=host, port=port)
        probe = f"for i in $(seq 100); do {get} >/dev/null 2>&1 && exit 0; sleep 0.05; done; exit 1"
        code, out, err = await self.exec(container_id, probe)
        assert code == 0, f"the server in the container never answered on {address}: {err}"

    async def ip(self) -> str:
        status = await self.runtime.PodSandboxStatus(
            self.pb.PodSandboxStatusRequest(pod_sandbox_id=self.id)
        )
        return status.status.network.ip

    def log(self, container_name: str) -> str:
        with open(os.path.join(self.log_dir, f"{container_name}.log")) as f:
            return f.read()

    async def remove(self) -> None:
        if self.id:
            await self.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=self.id))
            await self.runtime.RemovePodSandbox(
                self.pb.RemovePodSandboxRequest(pod_sandbox_id=self.id)
            )


@contextlib.asynccontextmanager
async def pod(cri: Cri, handler: str, log_dir, host_network=False, **run_options):
    async with cri.runtime() as runtime:
        the_pod = Pod(cri, runtime, handler, str(log_dir), host_network)
        try:
            await the_pod.run(**run_options)
            yield the_pod
        finally:
            await the_pod.remove()


def both_handlers(zviz_fails_today: str | None = None):
    """Parametrize over handler runc (the reference) and zviz; ZVIZ_FAILS_TODAY: the
    xfail reason for zviz's cell, where issue 11 asks for what zviz does not do yet."""
    zviz = "zviz"
    if zviz_fails_today:
        mark = pytest.mark.xfail(strict=True, raises=AssertionError, reason=zviz_fails_today)
        zviz = pytest.param("zviz", marks=mark)
    return pytest.mark.parametrize("handler", ["runc", zviz])


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
    cri, tmp_path, share_pids, systemd_cgroups
):
    # shared-pid-ns: the pod's shareProcessNamespace, the container joins the sandbox's.
    # systemd-cgroup-driver: the kubelet's pod slice as cgroup parent; CRI then sends
    # slice:cri-containerd:<id> cgroupsPaths.
    pb = cri.pb
    pod_slice = (
        f"zviztest-pod{session_tag()}{uuid.uuid4().hex[:6]}.slice" if systemd_cgroups else ""
    )
    # As kubelet's /var/lib/kubelet/pods/<uid>/volumes/...: the volume under a directory
    # the container's root (an unprivileged host uid) may not traverse.
    private = tmp_path / "private"
    volume = private / "volume"
    volume.mkdir(parents=True)
    private.chmod(0o700)
    volume.chmod(0o755)
    (volume / "config").write_text("from the volume\n")
    (volume / "config").chmod(0o644)
    log_dir = tmp_path / "logs"

    async def scenario() -> dict:
        seen: dict = {}
        async with pod(
            cri, "zviz", log_dir, share_pids=share_pids, cgroup_parent=pod_slice
        ) as the_pod:
            version = await the_pod.runtime.Version(pb.VersionRequest(version="v1"))
            seen["runtime"] = version.runtime_name
            seen["shims"] = _shim_processes()
            container_id = await the_pod.start_container(
                "app",
                "echo app up; exec sleep 300",
                mounts=[pb.Mount(container_path="/config", host_path=str(volume), readonly=True)],
                envs=[("GREETING", "hello")],
            )
            status = await the_pod.runtime.ContainerStatus(
                pb.ContainerStatusRequest(container_id=container_id)
            )
            seen["state"] = status.status.state
            if pod_slice:
                scope = f"zviztest.slice/{pod_slice}/cri-containerd-{container_id}.scope"
                mount = "/sys/fs/cgroup/pids" if host_version() == 1 else "/sys/fs/cgroup"
                seen["scope"] = os.path.isdir(f"{mount}/{scope}")
            seen["exec"] = await the_pod.exec(
                container_id,
                "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
                "cat /proc/self/uid_map; cat /config/config; echo $GREETING; "
                "echo pid1: $(tr '\\0' ' ' < /proc/1/cmdline); "
                "mount -t tmpfs none /mnt 2>&1 || echo mount refused",
            )
            await the_pod.runtime.StopContainer(
                pb.StopContainerRequest(container_id=container_id, timeout=0)
            )
            status = await the_pod.runtime.ContainerStatus(
                pb.ContainerStatusRequest(container_id=container_id)
            )
            seen["stopped"] = (status.status.state, status.status.exit_code)
            await the_pod.runtime.RemoveContainer(
                pb.RemoveContainerRequest(container_id=container_id)
            )
            seen["ids"] = (the_pod.id, container_id)
            seen["log"] = the_pod.log("app")
        return seen

    try:
        seen = run(scenario())
    finally:
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
    # The kubelet's default capabilities, cut to what ci-runner keeps: those the kernel
    # confines to the container's user namespace (issue 14).
    confined = capabilities.mask(capabilities.CONFINED_TO_USER_NAMESPACE)
    assert f"CapEff:\t{confined:016x}" in lines, lines
    assert "NoNewPrivs:\t1" in lines and "Seccomp:\t2" in lines
    assert lines[3].split()[:2] == ["0", "100000"]  # root in a user namespace, unprivileged outside
    assert "from the volume" in lines and "hello" in lines
    # PID 1 of the container's pid namespace: the sandbox's pause with a shared one.
    (pid1,) = [line for line in lines if line.startswith("pid1:")]
    assert pid1 == ("pid1: sleep 2147483647" if share_pids else "pid1: sleep 300")
    assert lines[-1] == "mount refused"
    assert seen["stopped"][0] == pb.CONTAINER_EXITED
    assert seen["stopped"][1] == 137  # StopContainer with timeout 0: SIGKILL
    assert "stdout F app up" in seen["log"]  # CRI's log format: time stream tag line
    # Nothing of the pod is left (the shim daemon itself idles for the next container).
    for hierarchy in os.listdir("/sys/fs/cgroup"):
        for dirpath, dirnames, _ in os.walk(os.path.join("/sys/fs/cgroup", hierarchy)):
            assert not [d for d in dirnames if d in seen["ids"]], dirpath


# Issue 11's pod scenarios. Each zviz cell that fails today names the issue item and
# what fails; the reasons were checked against the actual failures.


@both_handlers()
def test_two_containers_of_a_pod_talk_over_localhost(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            server = await the_pod.start_container(
                "server", HTTPD.format(listen=f"127.0.0.1:{APP_PORT}")
            )
            client = await the_pod.start_container("client", "exec sleep 300")
            await the_pod.wait_listening(server, f"127.0.0.1:{APP_PORT}")
            netns = [
                (await the_pod.exec(c, "readlink /proc/self/ns/net"))[1].strip()
                for c in (server, client)
            ]
            get = HTTP_GET.format(path="/ping", host="127.0.0.1", port=APP_PORT)
            return netns, await the_pod.exec(client, get + " 2>&1")

    netns, (code, out, _) = run(scenario())
    assert code == 0 and out.endswith("\r\n\r\npong\n"), f"{out} (server, client: {netns})"


@both_handlers()
def test_a_port_open_in_a_container_is_reachable_on_the_pods_ip_from_the_node(
    cri, tmp_path, handler
):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            server = await the_pod.start_container("server", HTTPD.format(listen=APP_PORT))
            await the_pod.wait_listening(server, f"127.0.0.1:{APP_PORT}")
            address = await the_pod.ip()
            try:
                reply = cri.node.http_get_from_node(address, APP_PORT, "/ping")
            except OSError as error:
                reply = repr(error).encode()
            host_addresses = subprocess.run(
                ["ip", "-o", "addr"], capture_output=True, text=True, check=True
            ).stdout
            return address, reply, host_addresses

    address, reply, host_addresses = run(scenario())
    assert address.startswith(f"{SUBNET_PREFIX}."), address
    # The pod network is the node netns' own: the host's namespace has none of it.
    assert f" {SUBNET_PREFIX}." not in host_addresses and f" {BRIDGE} " not in host_addresses
    assert reply.startswith(b"HTTP/1.") and reply.endswith(b"\r\n\r\npong\n"), reply


@both_handlers()
def test_a_container_resolves_a_name_through_the_pods_dns_config(cri, tmp_path, handler):
    # zviz: ci-runner has no network; the operator's cluster_dns (ZVIZ_SHIM_CONFIG) is
    # the one way out it has, TCP/UDP to that address and port only.
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            container = await the_pod.start_container("app", "exec sleep 300")
            return await the_pod.exec(
                container, f"cat /etc/resolv.conf; nslookup {SERVICE_NAME} 2>&1"
            )

    code, out, _ = run(scenario())
    assert f"nameserver {DNS_IP}" in out.splitlines(), out
    assert code == 0 and f"Address: {SERVICE_IP}" in out.splitlines(), out


@both_handlers()
def test_egress_to_the_service_host_is_the_profiles_decision(cri, tmp_path, handler):
    # runc: the pod reaches a host on its network. zviz's default profile (ci-runner,
    # network "none") means no egress (issue 11 item 1): the container is in the pod's
    # netns, and the broker refuses destinations that are not the pod's own.
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            container = await the_pod.start_container("app", "exec sleep 300")
            return await the_pod.exec(
                container, HTTP_GET.format(path="/", host=SERVICE_IP, port=SERVICE_PORT) + " 2>&1"
            )

    code, out, _ = run(scenario())
    if handler == "runc":
        assert code == 0 and out.encode().endswith(SERVICE_REPLY), out
    else:
        assert code != 0 and SERVICE_REPLY.decode() not in out, out


@both_handlers()
def test_the_cluster_dns_exception_is_its_address_and_port_only(cri, tmp_path, handler):
    # Port 80 of the DNS host: nothing listens there. runc's connect is refused by the
    # host (ECONNREFUSED); zviz's ci-runner never sends it (the broker's EPERM): the
    # operator's cluster_dns opens port 53 of that address, nothing more.
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            container = await the_pod.start_container("app", "exec sleep 300")
            return await the_pod.exec(container, f"nc -w 2 {DNS_IP} 80 </dev/null 2>&1")

    code, out, _ = run(scenario())
    assert code != 0, out
    if handler == "runc":
        assert "refused" in out, out
    else:
        assert "not permitted" in out, out


@both_handlers()
def test_a_host_network_pod_runs_in_the_nodes_netns_or_is_refused(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path, host_network=True) as the_pod:
            container = await the_pod.start_container("app", "exec sleep 300")
            return await the_pod.exec(container, "readlink /proc/self/ns/net")

    if handler == "runc":
        code, out, err = run(scenario())
        assert code == 0, err
        assert out.strip() == f"net:[{cri.node.node.inode()}]"
        return
    # zviz: refused unless the operator's config says allow_host_network = true.
    try:
        seen = run(scenario())
    except GRPCError as error:
        seen = error
    node = f"net:[{cri.node.node.inode()}]"
    assert isinstance(seen, GRPCError), f"a hostNetwork pod ran under zviz (node: {node}): {seen}"
    assert "host network" in seen.message.lower() or "hostnetwork" in seen.message.lower()


@both_handlers()
def test_an_exec_writing_to_pid_1s_stdout_lands_in_the_container_log(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            container = await the_pod.start_container("app", "echo app up; exec sleep 300")
            result = await the_pod.exec(container, "echo written by exec > /proc/1/fd/1")
            # containerd copies the pipe to the log file asynchronously.
            deadline = time.monotonic() + 5
            while "written by exec" not in the_pod.log("app") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return result, the_pod.log("app")

    (code, _, err), log = run(scenario())
    assert code == 0, err
    assert " stdout F written by exec\n" in log, log


def test_the_node_network_stays_inside_the_namespaces_the_test_made(cri):
    # What keeps every pod packet on this machine: the node netns routes only its own
    # subnet and the bridge is there, not in the host's namespace.
    assert cri.node.node.ip("route", "show", "default") == ""
    assert cri.node.node.ip("-o", "route").split()[:1] == [f"{SUBNET_PREFIX}.0/24"]
    host_links = subprocess.run(
        ["ip", "-o", "link", "show", BRIDGE], capture_output=True, text=True
    )
    assert host_links.returncode != 0, host_links.stdout
