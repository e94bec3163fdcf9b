"""The warden of a running web-server container's broker is the compiled program
(runtime/broker_warden.c, `make install` builds it beside zviz) and holds nothing but the
heartbeat pipe and the broker's pidfd: never the listener, which the broker's death has
to close (test_layers.py and test_broker_forker.py have the warden killing a stalled
broker; tests/test_security_broker.py and tests/test_broker_warden.py the fallback)."""

import os
import time

import pytest

from integration.ids import tagged, unique_id
from integration.leaks import processes_named
from integration.zviz_cli import Zviz, leftovers
from runtime import procstat
from runtime.security.broker import warden


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def test_a_web_server_containers_warden_is_the_compiled_program_holding_two_fds(zviz, make_bundle):
    binary = os.path.join(os.path.dirname(zviz.binary), warden.BINARY_NAME)
    if not os.path.exists(binary):
        pytest.skip(f"no {binary}: `make install` builds it (with gcc and libc6-dev)")
    container_id = unique_id("zviz-warden")
    created = zviz.create(make_bundle(["sleep", "1000"]), container_id, "--profile", "web-server")
    assert created.returncode == 0, created.stderr
    try:
        assert zviz("start", container_id).returncode == 0
        deadline = time.monotonic() + 10
        while not (wardens := processes_named("zviz-warden", container_id)):
            assert time.monotonic() < deadline, "no warden named by the container's id"
            time.sleep(0.05)
        brokers = processes_named("zviz-broker", container_id)
        assert len(brokers) == 1 and len(wardens) == 1, (brokers, wardens)
        guard = wardens[0]
        assert procstat.parent(guard) == brokers[0]
        assert os.readlink(f"/proc/{guard}/exe") == os.path.realpath(binary)
        fds = {
            int(fd): os.readlink(f"/proc/{guard}/fd/{fd}") for fd in os.listdir(f"/proc/{guard}/fd")
        }
        assert sorted(fds) == [3, 4], fds
        assert fds[3].startswith("pipe:") and fds[4] == "anon_inode:[pidfd]", fds
        # The broker holds the listener; the warden none of the broker's other fds.
        broker_fds = {
            os.readlink(f"/proc/{brokers[0]}/fd/{fd}")
            for fd in os.listdir(f"/proc/{brokers[0]}/fd")
        }
        assert "anon_inode:seccomp notify" in broker_fds, broker_fds
        with open(f"/proc/{guard}/status") as f:
            rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        assert rss_kib < 1024, f"the compiled warden uses {rss_kib} KiB"
    finally:
        deleted = zviz("delete", "--force", container_id, timeout=30)
    assert deleted.returncode == 0, deleted.stderr
    assert leftovers(container_id, zviz.root) == []
    deadline = time.monotonic() + 10
    while processes_named("zviz-warden", container_id):
        assert time.monotonic() < deadline, "the warden outlived its container"
        time.sleep(0.05)
