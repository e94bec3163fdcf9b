"""Under the shim, brokers are forked by the daemon's forker (runtime/security/broker/
process.py `Forker`), not by the daemon: what that changes must not weaken the broker.

The forker holds nothing of the daemon's but stderr and its socket; a broker it forked
still has a warden that kills it when it stalls; the forker goes when the daemon does.
"""

import os
import signal
import sys
import time

import pytest

from integration.ids import unique_id
from integration.leaks import processes_named
from integration.reliability.harness import alive

pytestmark = [pytest.mark.containerd]

ZVIZ = "io.containerd.zviz.v2"
# web-server's broker.timeout (the default): the warden's limit without a heartbeat.
BROKER_TIMEOUT = 10


def _wait_gone(pids, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_broker_of_the_forker_is_still_killed_by_its_warden_when_stalled(
    containerd, busybox_image, tmp_path
):
    config = tmp_path / "shim.toml"
    config.write_text("idle_exit_seconds = 0\n")  # the daemon (and its forker) go with it
    container_id = unique_id("zviz-forker")
    ran = containerd.ctr(
        "run", "-d", "--runtime", ZVIZ, "--runtime-config-path", str(config),
        "--annotation", "io.zviz.profile=web-server", busybox_image, container_id,
        "sleep", "1000", check=False,
    )  # fmt: skip
    address = containerd.address
    try:
        assert ran.returncode == 0, ran.stderr
        forkers = processes_named("zviz-forker", address)
        brokers = processes_named("zviz-broker", address)
        wardens = processes_named("zviz-warden", address)
        assert len(forkers) == 1 and len(brokers) == 1 and len(wardens) == 1, (
            forkers, brokers, wardens,
        )  # fmt: skip
        # Nothing of the daemon's: not its ttrpc listener, not a container's stdio.
        fds = {int(fd): os.readlink(f"/proc/{forkers[0]}/fd/{fd}")
               for fd in os.listdir(f"/proc/{forkers[0]}/fd")}  # fmt: skip
        assert set(fds) - {0, 1, 2} and all(
            target.startswith("socket:") for fd, target in fds.items() if fd > 2
        ), fds
        assert len(set(fds) - {0, 1, 2}) == 1, fds

        # The warden is the compiled program when `make install` built it (the shim runs
        # the venv's Python, so the binary sits beside it).
        compiled = os.path.join(os.path.dirname(sys.executable), "zviz-warden")
        if os.path.exists(compiled):
            assert os.readlink(f"/proc/{wardens[0]}/exe") == os.path.realpath(compiled)
            assert sorted(map(int, os.listdir(f"/proc/{wardens[0]}/fd"))) == [3, 4]

        os.kill(brokers[0], signal.SIGSTOP)
        # No heartbeat for the broker's timeout: the warden SIGKILLs it, then exits.
        assert _wait_gone(brokers, BROKER_TIMEOUT + 10), "the stalled broker was not killed"
        assert _wait_gone(wardens, 5), "the warden outlived its broker"
        assert alive(forkers[0]), "the forker went with one broker"
    finally:
        for pid in processes_named("zviz-broker", address):
            if pid in brokers:
                os.kill(pid, signal.SIGCONT)
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", container_id, check=False)
        time.sleep(0.5)
        containerd.ctr("tasks", "delete", "-f", container_id, check=False)
        containerd.ctr("containers", "delete", container_id, check=False)
    # The last container gone, the daemon exits (idle_exit_seconds = 0), so does its forker.
    assert _wait_gone(forkers, 30), "the forker outlived its daemon"
