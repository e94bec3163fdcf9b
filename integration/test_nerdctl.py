"""nerdctl (tools/gotools.py builds it) driving zviz's shim, with runc as the reference.

`nerdctl run --runtime io.containerd.zviz.v2` as users type it: run --rm, run -d, exec,
logs, ps, stop, rm, the io.zviz.profile annotation, and -p HOST:CONTAINER through
nerdctl's CNI networking (its createRuntime OCI hook calls the bridge and portmap plugins).
Against both Debian's containerd 1.6 and the 2.x `make tools` builds.

Everything happens in namespaces and directories the test makes: containerd (and so its
shims, the OCI hooks and the CNI plugins with their iptables rules) runs in a network
namespace of its own with the bridge inside it; nerdctl's data root, CNI config and IPAM
state live under the private containerd's directory; the published port is requested from
inside that namespace. Nothing touches the host's network.
"""

import json
import os
import subprocess
import sys

import pytest

from integration.ids import tagged, unique_id
from tools import gotools
from tools.containerd import VENV_BIN, PrivateContainerd
from tools.mkimage import DEFAULT_REF
from tools.netns import NamedNetns

pytestmark = pytest.mark.containerd

ZVIZ = "io.containerd.zviz.v2"
RUNC = "io.containerd.runc.v2"
CNI_PLUGIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
NETWORK = "zviz-nerdctl"
SUBNET_PREFIX = "10.213.0"
GATEWAY = f"{SUBNET_PREFIX}.1"
HOST_PORT = 18080
CONTAINER_PORT = 8080
PAGE = "hello from the container"


def network_conflist(ipam_dir: str) -> dict:
    """A bridge inside the test's namespace, and portmap for -p (no masquerade: no exit)."""
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "znerd0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{"subnet": f"{SUBNET_PREFIX}.0/24", "gateway": GATEWAY}]],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


class Node:
    """A private containerd in its own network namespace, and nerdctl pointed at it."""

    def __init__(
        self,
        nerdctl_bin: str,
        containerd_bin: str,
        ctr_bin: str,
        archive: str,
        shim_dir: str = VENV_BIN,
    ):
        self.nerdctl_bin = nerdctl_bin
        self.netns = NamedNetns(tagged("zviz-nerd"))
        try:
            self.containerd = PrivateContainerd(
                netns=self.netns.path,
                containerd_bin=containerd_bin,
                ctr_bin=ctr_bin,
                shim_dir=shim_dir,
            )
            self.containerd.start()
        except BaseException:
            self.netns.delete()
            raise
        base = self.containerd.base
        self.data_root = os.path.join(base, "nerdctl")
        self.netconf_dir = os.path.join(base, "net.d")
        os.makedirs(self.data_root)
        os.makedirs(self.netconf_dir)
        with open(os.path.join(self.netconf_dir, f"10-{NETWORK}.conflist"), "w") as f:
            json.dump(network_conflist(os.path.join(base, "ipam")), f)
        self.containerd.import_image(archive)

    def nerdctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        cmd = [
            self.nerdctl_bin,
            "--address",
            self.containerd.address,
            "--namespace",
            self.containerd.namespace,
            "--data-root",
            self.data_root,
            "--cni-path",
            CNI_PLUGIN_DIR,
            "--cni-netconfpath",
            self.netconf_dir,
            # The namespace has no default route to guess the host's gateway from.
            "--host-gateway-ip",
            GATEWAY,
            "--cgroup-manager",
            "cgroupfs",
            *args,
        ]
        return self.netns.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=self.containerd.env
        )

    def http_get(self, url: str) -> subprocess.CompletedProcess:
        """A GET from inside the namespace, where containerd and the portmap rules are."""
        fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        return self.netns.run(
            [sys.executable, "-c", fetch, url], capture_output=True, text=True, timeout=30
        )

    def stop(self) -> None:
        try:
            self.containerd.stop()
        finally:
            self.netns.delete()


def containerd_binaries(version: str) -> tuple[str, str]:
    """containerd and ctr of VERSION: Debian's 1.6 on PATH, or the 2.x `make tools` builds
    (the test skips with the reason when it is not built)."""
    if version == "1.6":
        return "containerd", "ctr"
    binaries = [gotools.binary(gotools.CONTAINERD2, name) for name in ("containerd", "ctr")]
    if not all(binaries):
        pytest.skip(gotools.missing_reason(gotools.CONTAINERD2))
    return binaries[0], binaries[1]


@pytest.fixture(scope="module", params=["1.6", "2.x"], ids=["containerd1.6", "containerd2"])
def node(request, busybox_archive):
    nerdctl_bin = gotools.binary(gotools.NERDCTL, "nerdctl")
    if nerdctl_bin is None:
        pytest.skip(gotools.missing_reason(gotools.NERDCTL))
    instance = Node(nerdctl_bin, *containerd_binaries(request.param), busybox_archive)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(params=[ZVIZ, RUNC], ids=["zviz", "runc"])
def runtime(request):
    return request.param


@pytest.fixture
def name(node):
    """A container name, its container removed after the test whatever happened."""
    chosen = unique_id("zviz-nerd")
    yield chosen
    node.nerdctl("rm", "-f", chosen)


def test_run_rm_passes_output_and_exit_code(node, runtime, name):
    result = node.nerdctl(
        "run", "--runtime", runtime, "--rm", "--name", name, "--network", "none",
        DEFAULT_REF, "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stdout == "to-stdout\n"
    assert "to-stderr" in result.stderr
    gone = node.nerdctl("ps", "-a", "--format", "{{.Names}}")
    assert name not in gone.stdout.split(), "--rm left the container behind"


def test_detached_container_exec_logs_ps_stop_rm(node, runtime, name):
    started = node.nerdctl(
        "run", "--runtime", runtime, "-d", "--name", name, "--network", "none",
        DEFAULT_REF, "sh", "-c", "echo ready; exec sleep 1000",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    listed = node.nerdctl("ps", "--format", "{{.Names}} {{.Status}}")
    assert f"{name} Up" in listed.stdout, listed.stdout + listed.stderr
    executed = node.nerdctl("exec", name, "sh", "-c", "echo exec-out; cat /proc/1/cmdline")
    assert executed.returncode == 0, executed.stderr
    assert executed.stdout.startswith("exec-out\nsleep")
    # nerdctl 2.0 exits 1 and names the process's status (docker would exit with it).
    failed = node.nerdctl("exec", name, "sh", "-c", "exit 4")
    assert failed.returncode != 0 and "exit code 4" in failed.stderr, failed.stderr
    logs = node.nerdctl("logs", name)
    assert logs.returncode == 0 and logs.stdout == "ready\n", logs.stdout + logs.stderr
    stopped = node.nerdctl("stop", "-t", "2", name)
    assert stopped.returncode == 0, stopped.stderr
    listed = node.nerdctl("ps", "-a", "--format", "{{.Names}} {{.Status}}")
    assert f"{name} Exited" in listed.stdout, listed.stdout
    removed = node.nerdctl("rm", name)
    assert removed.returncode == 0, removed.stderr
    listed = node.nerdctl("ps", "-a", "--format", "{{.Names}}")
    assert name not in listed.stdout.split()


def test_profile_annotation_reaches_the_shim(node, name):
    """zviz only (runc has no profiles): nerdctl's --annotation lands in the spec the shim
    reads, and the profile it names maps the container's root (hostile-tenant: 200000)."""
    chosen = node.nerdctl(
        "run", "--runtime", ZVIZ, "--rm", "--name", name, "--network", "none",
        "--annotation", "io.zviz.profile=hostile-tenant", DEFAULT_REF, "cat", "/proc/self/uid_map",
    )  # fmt: skip
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.split()[:2] == ["0", "200000"], chosen.stdout
    refused = node.nerdctl(
        "run", "--runtime", ZVIZ, "--rm", "--name", name + "-x", "--network", "none",
        "--annotation", "io.zviz.profile=no-such-profile", DEFAULT_REF, "true",
    )  # fmt: skip
    node.nerdctl("rm", "-f", name + "-x")
    assert refused.returncode != 0
    assert "no-such-profile" in refused.stderr, refused.stderr


def test_published_port_reaches_a_server_in_the_container(node, runtime, name):
    serve = (
        f"mkdir -p /tmp/www && echo '{PAGE}' > /tmp/www/index.html && "
        f"exec httpd -f -p {CONTAINER_PORT} -h /tmp/www"
    )
    started = node.nerdctl(
        "run", "--runtime", runtime, "-d", "--name", name, "--network", NETWORK,
        "-p", f"{HOST_PORT}:{CONTAINER_PORT}", DEFAULT_REF, "sh", "-c", serve,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    ports = node.nerdctl("port", name)
    assert f"{CONTAINER_PORT}/tcp -> 0.0.0.0:{HOST_PORT}" in ports.stdout, ports.stdout
    # Through portmap's DNAT on the node's own address, as a client on the host would come.
    fetched = node.http_get(f"http://{GATEWAY}:{HOST_PORT}/")
    for _ in range(20):  # httpd may not listen yet
        if fetched.returncode == 0:
            break
        node.netns.run(["sleep", "0.25"])
        fetched = node.http_get(f"http://{GATEWAY}:{HOST_PORT}/")
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == PAGE
