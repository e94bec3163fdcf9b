"""A pod is one network (issue 11, item 1): containers joining one network namespace by
path (a pod sandbox's) share it under every profile, in real containers.

Before: a mode "none" profile (ci-runner) swapped the pod's namespace for a fresh
loopback-only one, so two containers of a pod could not talk over localhost and nothing
listened on the pod's address; web-server kept the namespace but refused its loopback.
The egress side (what a container of the pod may NOT reach) is in
integration/security/test_pod_network.py.
"""

import time
import uuid

import pytest

from integration.leaks import processes_named
from integration.podnet import POD_IP, POD_IP6, SEND
from integration.zviz_cli import Zviz

PORT = 8080  # web-server's bind rules allow it; mode "none" leaves bind to the kernel
PROFILES = ["ci-runner", "web-server"]


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / "root"))


def cid(name: str) -> str:
    return f"zn11-{name}-{uuid.uuid4().hex[:6]}"


def listener(zviz, make_bundle, podnet, profile: str, container_id: str):
    """A container of the pod printing what the first connection to PORT sends."""
    # nc's stdin is a fifo it holds open for writing itself: busybox nc quits at EOF on
    # stdin, and with /dev/null it may quit before a connection accepted a moment early
    # has delivered its data (seen as '' from a client whose first try was refused).
    script = f"mkfifo /dev/shm/in && exec 3<>/dev/shm/in && exec nc -l -p {PORT} <&3"
    bundle = podnet.join(make_bundle(["sh", "-c", script]))
    return zviz.popen("run", "--profile", profile, "--bundle", bundle, container_id)


def finish(zviz, run, container_id: str, *, stop: bool = False) -> str:
    """The container's output once it exited (killed first when STOP or when it hangs:
    PID 1 holds the pipes, killing the client alone would leave them open)."""
    import subprocess

    try:
        if stop:
            zviz("kill", container_id, "KILL")
        try:
            out, err = run.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            zviz("kill", container_id, "KILL")
            out, err = run.communicate(timeout=30)
    finally:
        zviz("delete", "-f", container_id)
    assert stop or run.returncode == 0, err
    return out


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("destination", ["127.0.0.1", POD_IP, "::1", POD_IP6])
def test_two_containers_of_a_pod_talk(zviz, make_bundle, podnet, profile, destination):
    """One listens, the other connects over localhost or the pod's own address (IPv4:
    SIOCGIFCONF, IPv6: if_inet6, read by the broker in the pod's namespace)."""
    server_id = cid("srv")
    server = listener(zviz, make_bundle, podnet, profile, server_id)
    # Retried: the server may not listen yet (a refused connect is ECONNREFUSED; an EPERM
    # from the broker would repeat as well and end in failure).
    client_script = (
        "i=0; while [ $i -lt 100 ]; do "
        f"echo from-the-other-container | nc {destination} {PORT} && exit 0; "
        "i=$((i+1)); sleep 0.1; done; exit 1"
    )
    client = podnet.join(make_bundle(["sh", "-c", client_script]))
    client_id = cid("cli")
    try:
        result = zviz("run", "--profile", profile, "--bundle", client, client_id, timeout=60)
    finally:
        zviz("delete", "-f", client_id)
    out = finish(zviz, server, server_id, stop=result.returncode != 0)
    assert result.returncode == 0, result.stderr
    assert out == "from-the-other-container\n"


@pytest.mark.parametrize("profile", PROFILES)
def test_a_listener_in_the_pod_is_reached_from_outside(zviz, make_bundle, podnet, profile):
    """Inbound through the pod's address (kubelet probes, Services): bind, listen and
    accept are not egress, under no profile."""
    server_id = cid("in")
    server = listener(zviz, make_bundle, podnet, profile, server_id)
    sent = podnet.in_peer(SEND, POD_IP, str(PORT), "from-outside-the-pod")
    out = finish(zviz, server, server_id, stop=sent.returncode != 0)
    assert sent.returncode == 0, sent.stderr
    assert out == "from-outside-the-pod"


@pytest.mark.parametrize("joined", [False, True], ids=["own-namespace", "pod-namespace"])
def test_no_network_pays_for_a_broker_only_in_a_shared_namespace(zviz, make_bundle, podnet, joined):
    """ci-runner in a namespace of its own keeps the zero-cost path (loopback is all there
    is); in a pod's namespace the broker decides every way out."""
    bundle = make_bundle(["sh", "-c", "echo up; sleep 3"])
    if joined:
        podnet.join(bundle)
    container_id = cid("brk")
    run = zviz.popen("run", "--profile", "ci-runner", "--bundle", bundle, container_id)
    try:
        assert run.stdout.readline() == "up\n", run.stderr.read()
        seen = set()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not seen:
            seen = processes_named("zviz-broker", container_id)
            time.sleep(0.05)
        assert bool(seen) == joined, seen
    finally:
        finish(zviz, run, container_id)


@pytest.mark.parametrize("profile", PROFILES)
def test_net_sysctls_of_a_pod_are_written_into_the_pods_namespace(
    zviz, make_bundle, podnet, profile
):
    """containerd 2.x's CRI asks these two for every pod sandbox. The pod's namespace is
    the host user namespace's, so PID 1 may not write them ("Permission denied" before):
    the runtime does, inside that namespace, and the host's own values stay as they were."""
    from integration.zviz_cli import edit_config

    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        host_before = f.read()
    sysctls = {
        "net.ipv4.ip_unprivileged_port_start": "0",
        "net.ipv4.ping_group_range": "0 2147483647",
    }
    bundle = podnet.join(
        make_bundle(
            [
                "sh",
                "-c",
                "cat /proc/sys/net/ipv4/ip_unprivileged_port_start "
                "/proc/sys/net/ipv4/ping_group_range",
            ]
        )
    )
    edit_config(bundle, lambda c: c["linux"].setdefault("sysctl", {}).update(sysctls))
    container_id = cid("sysctl")
    try:
        result = zviz("run", "--profile", profile, "--bundle", bundle, container_id, timeout=60)
    finally:
        zviz("delete", "-f", container_id)
    assert result.returncode == 0, result.stderr
    # The container reads the range through its own id map: host gids 0.. are unmapped.
    assert result.stdout.split() == ["0", "65534", "65534"], result.stdout
    import subprocess

    in_pod = subprocess.run(
        ["nsenter", f"--net={podnet.pod_path}", "cat", "/proc/sys/net/ipv4/ping_group_range"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert in_pod.stdout.split() == ["0", "2147483647"]
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        assert f.read() == host_before
