"""A Kubernetes node's network for the CRI tests, made only of namespaces the test creates.

    host netns        untouched: no link, address, route or socket is added to it
    node netns        containerd, its shims and the CNI plugins run here: loopback and
                      the bridge zbr0 10.211.0.1/24 (the pods' gateway); no default route,
                      no masquerade, so no packet can leave the machine
      pod netns       one per pod sandbox (containerd makes it), a veth on zbr0 and an
                      address from host-local IPAM in 10.211.0.10-199
      service netns   10.211.0.250, a veth on zbr0: a TCP server on :8080 (HTTP/1.0,
                      answering every request with SERVICE_REPLY)
      dns netns       10.211.0.253, a veth on zbr0: dnsmasq answering for *.test only
                      (svc.test -> the service host), no upstream, no /etc/hosts

CNI is Debian's containernetworking-plugins (bridge, host-local, loopback) and DNS
Debian's dnsmasq; both are in the Makefile's DEB_PKGS. The names of the namespaces and
directories made here carry the session's tag (integration/ids.py): several test runs
can go at once, and the leak check sees what this one left.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

from integration.ids import session_tag, tagged
from tests.served_socket import ServedSocket
from tools.containerd import PrivateContainerd
from tools.netns import NamedNetns, socket_in

CNI_PLUGIN_DIR = "/usr/lib/cni"
SUBNET_PREFIX = "10.211.0"
GATEWAY = f"{SUBNET_PREFIX}.1"
SERVICE_IP = f"{SUBNET_PREFIX}.250"
SERVICE_PORT = 8080
SERVICE_NAME = "svc.test"
SERVICE_REPLY = b"hello from the service host\n"
DNS_IP = f"{SUBNET_PREFIX}.253"
BRIDGE = "zbr0"


def _name(role: str) -> str:
    return tagged(f"zviz-{role}")


def cni_conflist(ipam_dir: str) -> dict:
    """The pod network: one bridge in the node netns, addresses from host-local."""
    return {
        "cniVersion": "0.4.0",
        "name": "zviz-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                # The gateway address lives on the bridge, in the node netns only.
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [
                        [
                            {
                                "subnet": f"{SUBNET_PREFIX}.0/24",
                                "rangeStart": f"{SUBNET_PREFIX}.10",
                                "rangeEnd": f"{SUBNET_PREFIX}.199",
                                "gateway": GATEWAY,
                            }
                        ]
                    ],
                },
            }
        ],
    }


class CniNode:
    """The node netns with its bridge, test hosts and a CRI containerd inside it."""

    def __init__(self, sandbox_image: str, **containerd_options):
        self.sandbox_image = sandbox_image
        # For PrivateContainerd: its CRI handlers and pod_annotations, and its binaries
        # (Debian's containerd 1.6 unless given another: test_containerd2_cri.py, a 2.x).
        self.containerd_options = containerd_options
        self.node: NamedNetns | None = None
        self.hosts: list[NamedNetns] = []
        self.containerd: PrivateContainerd | None = None
        self.dnsmasq: subprocess.Popen | None = None
        self.service: ServedSocket | None = None
        self.workdir = tempfile.mkdtemp(prefix=f"{_name('cni')}-")

    def start(self) -> "CniNode":
        missing = [p for p in ("bridge", "host-local", "loopback") if not self._has_plugin(p)]
        assert not missing, f"CNI plugins {missing} missing: `make deps` installs them"
        assert shutil.which("dnsmasq"), "dnsmasq missing: `make deps` installs it"
        try:
            self.node = NamedNetns(_name("node"))
            # Made here rather than by the bridge plugin at the first pod: the test hosts
            # attach to it before any pod runs. The plugin takes it as it finds it.
            self.node.ip("link", "add", BRIDGE, "type", "bridge")
            self.node.ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
            self.node.ip("link", "set", BRIDGE, "up")
            service = self._host("svc", SERVICE_IP)
            self.service = ServedSocket(
                _listen_in(service.path, SERVICE_IP, SERVICE_PORT), _answer_http
            )
            self._start_dnsmasq(self._host("dns", DNS_IP))
            self._start_containerd()
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _has_plugin(name: str) -> bool:
        return os.access(os.path.join(CNI_PLUGIN_DIR, name), os.X_OK)

    def _host(self, role: str, address: str) -> NamedNetns:
        """A netns with one veth into the node's bridge, at ADDRESS on the pods' subnet."""
        host = NamedNetns(_name(role))
        self.hosts.append(host)
        self.node.ip(
            "link", "add", role, "type", "veth", "peer", "name", "eth0", "netns", host.name
        )
        self.node.ip("link", "set", role, "master", BRIDGE, "up")
        host.ip("addr", "add", f"{address}/24", "dev", "eth0")
        host.ip("link", "set", "eth0", "up")
        return host

    def _start_dnsmasq(self, host: NamedNetns) -> None:
        log = os.path.join(self.workdir, "dnsmasq.log")
        self.dnsmasq = host.popen(
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--pid-file=",  # none: the process is ours, by its Popen
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                f"--listen-address={DNS_IP}",
                f"--host-record={SERVICE_NAME},{SERVICE_IP}",
                "--local=/test/",  # other .test names: NXDOMAIN, never forwarded
                "--log-queries",
                f"--log-facility={log}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Ready once its UDP socket on :53 (0035) shows in its own netns' table.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.dnsmasq.poll() is None, f"dnsmasq exited; see {log}"
            with contextlib.suppress(OSError):
                with open(f"/proc/{self.dnsmasq.pid}/net/udp") as table:
                    if any(":0035 " in line for line in table):
                        return
            time.sleep(0.02)
        raise AssertionError(f"dnsmasq did not listen within 10 s; see {log}")

    def _start_containerd(self) -> None:
        # Short: shim socket paths under it must stay within 108 bytes.
        base = tempfile.mkdtemp(prefix=f"zc-{session_tag()}-", dir="/run")
        self.containerd = PrivateContainerd(
            base_dir=base,
            cri_sandbox_image=self.sandbox_image,
            netns=self.node.path,
            **self.containerd_options,
        )
        cni = os.path.join(self.containerd.base, "cni")
        os.makedirs(os.path.join(cni, "net.d"))
        os.symlink(CNI_PLUGIN_DIR, os.path.join(cni, "bin"))
        with open(os.path.join(cni, "net.d", "10-zviz-test.conflist"), "w") as f:
            json.dump(cni_conflist(os.path.join(cni, "ipam")), f, indent=2)
        self.containerd.start()

    def http_get_from_node(self, address: str, port: int, path: str, timeout=5.0) -> bytes:
        """What a kubelet probe or a Service's proxy does: an HTTP GET from the node netns.
        The whole response, headers included."""
        with socket_in(self.node.path) as conn:
            conn.settimeout(timeout)
            conn.connect((address, port))
            conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
        return b"".join(chunks)

    def stop(self) -> None:
        if self.containerd:
            self.containerd.stop()
        if self.dnsmasq:
            self.dnsmasq.terminate()
            try:
                self.dnsmasq.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.dnsmasq.kill()
                self.dnsmasq.wait()
        if self.service:
            self.service.close()
        for netns in [*self.hosts, self.node]:
            if netns:
                netns.delete()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _listen_in(netns_path: str, address: str, port: int) -> socket.socket:
    server = socket_in(netns_path)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(16)
    return server


def _answer_http(server: socket.socket) -> None:
    """Answer a connection with SERVICE_REPLY as HTTP/1.0 (busybox wget reads it)."""
    conn, _ = server.accept()
    with conn:
        conn.settimeout(5)
        with contextlib.suppress(OSError):
            conn.recv(4096)
            conn.sendall(
                b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                % (len(SERVICE_REPLY), SERVICE_REPLY)
            )
