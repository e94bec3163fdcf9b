"""A pod's network keeps its policy (issue 11, item 1), in real containers.

Every profile now joins a network namespace named by path (a pod sandbox's) instead of
replacing it; what a profile allows is then decided inside it by the broker:
- mode "none" (ci-runner): loopback and the pod's own addresses only. A host outside the
  pod (a second namespace on the other end of a veth) is refused with EPERM, by TCP
  connect and by UDP sends of every kind, the listener there receiving nothing;
- web-server: its egress rules as before (10.0.0.0/8 stays refused) while the pod's
  loopback is its own;
- the host's network is never had by accident: a spec without a network namespace, or
  one joining the runtime's own by path (even under another name), is refused unless
  root on the host allows it (`zviz run --allow-host-network`, the shim config's
  `allow_host_network = true`); allowed, nothing of the host counts as the container's.
"""

import copy
import itertools
import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from integration.podnet import LISTEN, PEER_IP, PEER_IP6
from integration.zviz_cli import Zviz
from tools.mkbundle import default_config

PORT = 8080  # in web-server's egress ports: only the destination decides
HOST_SWITCH = "allow_host_network = true in the shim config"


@pytest.fixture
def outside(podnet):
    """A TCP listener greeting as the probes' host listener, and a UDP receiver, on the
    peer's address (a host outside the pod); yields the Popen (its stdout: datagrams)."""
    server = podnet.peer_popen(
        LISTEN.replace("zn11-outside", "zviz-host-listener"), PEER_IP, "8080"
    )
    try:
        assert server.stdout.readline() == "ready\n", server.stderr.read()
        yield server
    finally:
        server.kill()
        server.wait()


def linux_joining(path: str | None) -> dict:
    """mkbundle's linux section with its network namespace joined by PATH (None: none)."""
    linux = copy.deepcopy(default_config(["true"])["linux"])
    namespaces = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
    if path is not None:
        namespaces.append({"type": "network", "path": path})
    linux["namespaces"] = namespaces
    return linux


def run_in(probes, broker_probe, profile, path, script, *extra_flags):  # noqa: F811
    """sh -c SCRIPT under zviz PROFILE in a bundle joining PATH, with both probes in it."""
    return probes.run(
        "zviz",
        profile,
        ["/bin/sh", "-c", script],
        config={"linux": linux_joining(path)},
        image_change=lambda rootfs: shutil.copy2(broker_probe, os.path.join(rootfs, "bprobe")),
        cid=f"zn11-sec-{uuid.uuid4().hex[:8]}",
        flags=extra_flags,
    )


EGRESS = (
    f"/probe egress {PEER_IP}:{PORT}; "
    + "; ".join(
        f"/bprobe udp_unspec {m} {PEER_IP} {PORT}" for m in ("sendto", "sendmsg", "sendmmsg")
    )
    + f"; echo x | nc -u -w 1 {PEER_IP} {PORT}; echo nc-udp=$?"
    + f"; echo x | nc {PEER_IP6} {PORT}; echo nc-v6=$?"
    + f"; echo x | nc ::ffff:{PEER_IP} {PORT}; echo nc-mapped=$?"
)


@pytest.mark.parametrize("profile", ["ci-runner", "web-server"])
def test_a_container_in_a_pod_reaches_nothing_outside_it(
    probes,
    broker_probe,  # noqa: F811
    podnet,
    outside,
    profile,
):
    result = run_in(probes, broker_probe, profile, podnet.pod_path, EGRESS)
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "ESCAPED" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("BLOCKED")]
    # TCP connect and the three UDP sends (AF_UNSPEC read as AF_INET), each EPERM.
    assert len(lines) == 4 and all("errno 1 " in line for line in lines), out + result.stderr
    # busybox nc -u connects its UDP socket first; IPv6, and IPv4 written as IPv4-mapped
    # IPv6 (sent over IPv4 by the kernel): each refused as well.
    assert all(f"nc-{kind}=1" in out for kind in ("udp", "v6", "mapped")), out
    assert result.stderr.count("Operation not permitted") == 3, result.stderr
    outside.kill()
    assert "udp" not in outside.communicate()[0]  # no datagram arrived outside the pod


def test_an_exec_into_a_pod_container_is_held_to_the_same_rule(
    probes,
    broker_probe,  # noqa: F811
    podnet,
    outside,
):
    """`zviz exec` hardens the container's spec again: its process gets a broker too."""
    bundle = probes.bundle(["sleep", "30"], linux=linux_joining(podnet.pod_path))
    zviz = Zviz(probes.zviz, os.path.join(probes.base, "root-zviz"))
    cid = f"zn11-exec-{uuid.uuid4().hex[:8]}"
    try:
        created = zviz.create(bundle, cid, "--profile", "ci-runner")
        assert created.returncode == 0, created.stderr
        assert zviz("start", cid).returncode == 0
        result = zviz("exec", cid, "/probe", "egress", f"{PEER_IP}:{PORT}")
    finally:
        zviz("delete", "-f", cid)
        shutil.rmtree(bundle, ignore_errors=True)
    assert result.stdout.startswith("BLOCKED") and "errno 1 " in result.stdout, (
        result.stdout + result.stderr
    )


@pytest.fixture
def host_netns_alias():
    """The host's network namespace bind-mounted under another name, as `ip netns` would."""
    alias = f"/run/netns/zn11-host-{uuid.uuid4().hex[:6]}"
    os.makedirs("/run/netns", exist_ok=True)
    open(alias, "w").close()
    subprocess.run(["mount", "--bind", "/proc/self/ns/net", alias], check=True)
    try:
        yield alias
    finally:
        subprocess.run(["umount", alias], check=False)
        os.unlink(alias)


@pytest.mark.parametrize("profile", ["ci-runner", "web-server"])
@pytest.mark.parametrize("how", ["no-namespace", "proc-self", "named-alias"])
def test_the_host_network_is_refused_by_the_cli_unless_allowed(
    probes,
    broker_probe,  # noqa: F811
    host_netns_alias,
    profile,
    how,
):
    path = {"no-namespace": None, "proc-self": "/proc/self/ns/net"}.get(how, host_netns_alias)
    result = run_in(probes, broker_probe, profile, path, "cat /proc/net/dev")
    assert result.returncode != 0, result.stdout
    assert f"profile {profile}: host network refused; the operator allows it with " in (
        result.stderr
    )
    assert "--allow-host-network" in result.stderr


def test_allowed_host_network_counts_nothing_of_the_hosts_as_the_containers(
    probes,
    broker_probe,  # noqa: F811
    host_listener,
):
    """ci-runner on the host's network: the host's loopback is not the container's."""
    script = "readlink /proc/self/ns/net; /probe egress " + host_listener
    result = run_in(probes, broker_probe, "ci-runner", None, script, "--allow-host-network")
    assert result.returncode == 0, result.stderr
    netns, verdict = result.stdout.splitlines()[:2]
    assert netns == os.readlink("/proc/self/ns/net")  # the host's own namespace
    assert verdict.startswith("BLOCKED") and "errno 1 " in verdict, result.stdout


# --- the same rule under the shim ---

ZVIZ = "io.containerd.zviz.v2"
_ids = itertools.count()


def ctr_run_host_network(containerd, image, args, config=None):
    cid = f"zn11-hostnet-{os.getpid()}-{next(_ids)}"
    cmd = ["run", "--rm", "--runtime", ZVIZ, "--net-host"]
    config_dir = None
    if config is not None:
        config_dir = tempfile.mkdtemp(prefix="zn11-shimcfg-", dir="/run")
        path = os.path.join(config_dir, "shim.toml")
        with open(path, "w") as f:
            f.write(config)
        cmd += ["--runtime-config-path", path]
    try:
        return containerd.ctr(*cmd, image, cid, *args, check=False, timeout=120)
    finally:
        containerd.ctr("tasks", "delete", "-f", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)
        if config_dir:
            shutil.rmtree(config_dir, ignore_errors=True)


@pytest.mark.containerd
def test_host_network_refused_by_the_shim_unless_the_operator_allows_it(
    containerd, busybox_image, host_listener
):
    host, port = host_listener.split(":")
    script = f"readlink /proc/self/ns/net; echo x | nc {host} {port}; echo nc=$?"
    refused = ctr_run_host_network(containerd, busybox_image, ["sh", "-c", script])
    assert refused.returncode != 0, refused.stdout
    assert (
        f"profile ci-runner: host network refused; the operator allows it with {HOST_SWITCH}"
        in (refused.stderr)
    )
    allowed = ctr_run_host_network(
        containerd, busybox_image, ["sh", "-c", script], config="allow_host_network = true\n"
    )
    assert allowed.returncode == 0, allowed.stderr
    lines = allowed.stdout.splitlines()
    assert lines[0] == os.readlink("/proc/self/ns/net"), allowed.stdout  # the host's
    # ci-runner has no network: on the host's, the broker refuses even its loopback.
    assert "zviz-host-listener" not in allowed.stdout and lines[-1] == "nc=1", allowed.stdout
