"""The broker and its warden killed under a running web-server container.

Killing the warden leaves the broker deciding as before (it only loses its stall
watchdog); killing the broker makes every mediated call fail closed with ENOSYS (the
kernel's answer once the listener is gone), never succeed unchecked; in both cases the
container is not stuck: exec, kill and delete work and leave nothing behind.
"""

import time

import pytest

from integration.ids import tagged, unique_id
from integration.leaks import processes_named
from integration.reliability.harness import alive, kill_and_wait
from integration.zviz_cli import Zviz, edit_config, leftovers

PORT = 18160  # in the container's own network namespace: no clash with the host's


def _profile(tmp_path) -> str:
    """web-server, with the loopback port PORT allowed (connect, bind), others refused."""
    path = tmp_path / "web-loopback.toml"
    path.write_text(
        f"""
[profile]
name = "web-loopback"
extends = "web-server"
[network]
egress_deny = []
egress = [{{ cidr = "127.0.0.1/32", ports = [{PORT}] }}]
bind = [{{ cidr = "0.0.0.0/0", ports = [{PORT}] }}, {{ cidr = "::/0", ports = [{PORT}] }}]
tcp_bind = [{PORT}]
tcp_connect = [{PORT}]
"""
    )
    path.chmod(0o644)
    return str(path)


# PID 1 serves PORT and, each time the test drops /tmp/go, makes one connection
# itself (under its own filter, the one the broker serves: an exec gets a filter and a
# broker of its own) and leaves the outcome in /tmp/out.
INIT = (
    f"while true; do nc -l -p {PORT} >/dev/null 2>&1; sleep 0.05; done & "
    "while true; do if [ -e /tmp/go ]; then "
    "read host port < /tmp/go; rm /tmp/go; "
    "(echo a | nc $host $port && echo CONNECTED || echo connect-failed) > /tmp/o 2>&1; "
    "mv /tmp/o /tmp/out; fi; sleep 0.05; done"
)


def _connect(zviz: Zviz, container_id: str, host: str = "127.0.0.1", port: int = PORT) -> str:
    """What PID 1's connect to HOST:PORT printed (nc's error included)."""
    go = zviz("exec", container_id, "sh", "-c", f"rm -f /tmp/out; echo {host} {port} > /tmp/go")
    assert go.returncode == 0, go.stderr
    deadline = time.monotonic() + 15
    while True:
        out = zviz("exec", container_id, "cat", "/tmp/out")
        if out.returncode == 0:
            return out.stdout
        assert time.monotonic() < deadline, "PID 1 never connected"
        time.sleep(0.1)


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def test_warden_then_broker_killed(zviz, make_bundle, tmp_path):
    profile = _profile(tmp_path)
    bundle = make_bundle(["sh", "-c", INIT])
    # web-server's root is read-only: the go/out files live on a tmpfs
    edit_config(
        bundle,
        lambda config: config["mounts"].append(
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}
        ),
    )
    container_id = unique_id("zviz-rel-broker")
    created = zviz.create(bundle, container_id, "--profile", profile)
    assert created.returncode == 0, created.stderr
    try:
        assert zviz("start", container_id).returncode == 0
        deadline = time.monotonic() + 10
        while "CONNECTED" not in (before := _connect(zviz, container_id)):
            assert time.monotonic() < deadline, before
            time.sleep(0.1)
        brokers = processes_named("zviz-broker", container_id)
        wardens = processes_named("zviz-warden", container_id)
        assert len(brokers) == 1 and len(wardens) == 1, (brokers, wardens)

        kill_and_wait(wardens[0])
        time.sleep(0.5)  # the broker's next heartbeats find no warden
        assert alive(brokers[0]), "the broker died with its warden"
        assert "CONNECTED" in _connect(zviz, container_id)
        # Still decided: an address the rules do not allow (the container's own loopback
        # is always its own). TEST-NET-1, and the container's netns has no route out: the
        # broker's EPERM comes before anything could be sent.
        refused = _connect(zviz, container_id, "192.0.2.1", PORT)
        assert "connect-failed" in refused and "not permitted" in refused, refused

        kill_and_wait(brokers[0])
        after = _connect(zviz, container_id)
        assert "connect-failed" in after and "CONNECTED" not in after, after
        assert "Function not implemented" in after, after  # ENOSYS: fail closed
        # not stuck: an unmediated exec runs, and the container still reads as running
        assert zviz("exec", container_id, "true", timeout=30).returncode == 0
        assert zviz.state(container_id)["status"] == "running"
        assert zviz("kill", container_id, "KILL").returncode == 0
    finally:
        deleted = zviz("delete", "--force", container_id, timeout=30)
    assert deleted.returncode == 0, deleted.stderr
    assert leftovers(container_id, zviz.root) == []
    assert processes_named("zviz-broker", container_id) == []
    assert processes_named("zviz-warden", container_id) == []
