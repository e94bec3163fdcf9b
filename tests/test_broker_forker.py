"""The broker forker (runtime/security/broker/process.py `Forker`): the shim daemon's
brokers are forked by it. Real processes, no container: a broker whose channel closes
before start exits, as one whose container went away."""

import os
import socket
import time

import pytest

from runtime import procstat
from runtime.errors import SecurityLayerError
from runtime.security.broker import process
from runtime.security.profiles import load_profile


class Channel:
    def __init__(self):
        self.container_end, supervisor_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET
        )
        self.supervisor_fd = supervisor_end.detach()

    def close_supervisor_end(self):
        if self.supervisor_fd >= 0:
            os.close(self.supervisor_fd)
            self.supervisor_fd = -1


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def children_named(name: str, ppid: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = procstat.read(pid)
        except OSError:
            continue
        if (
            int(fields[procstat.PARENT]) == ppid
            and fields[procstat.STATE] != "Z"
            and comm(int(pid)) == name
        ):
            found.append(int(pid))
    return found


@pytest.fixture
def forker():
    made = process.Forker()
    yield made
    made.close()
    for pid in children_named("zviz-forker", os.getpid()):
        wait_for(lambda pid=pid: os.waitpid(pid, os.WNOHANG)[0] == pid)


def test_the_forker_forks_a_broker_and_its_warden_and_goes_when_closed(forker):
    channel = Channel()
    broker = forker.spawn(channel, os.getpid(), load_profile("web-server"), {})
    assert channel.supervisor_fd == -1  # handed over, ours closed
    wait_for(lambda: comm(broker) == "zviz-broker")
    [forker_pid] = children_named("zviz-forker", os.getpid())
    wait_for(lambda: len(wardens_of(broker)) == 1)
    wardens = wardens_of(broker)
    # The container went away before start: the broker exits, its warden with it.
    channel.container_end.close()
    wait_for(lambda: comm(broker) == "")
    wait_for(lambda: all(comm(w) == "" for w in wardens))
    # A second broker from the same forker.
    again = Channel()
    second = forker.spawn(again, os.getpid(), load_profile("web-server"), {})
    wait_for(lambda: comm(second) == "zviz-broker")
    again.container_end.close()
    forker.close()
    # The forker is our child: it exits (a zombie until reaped here) when its socket closes.
    wait_for(lambda: os.waitpid(forker_pid, os.WNOHANG) == (forker_pid, 0))


def wardens_of(broker: int) -> list[int]:
    """The wardens holding a pidfd of BROKER."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if comm(int(pid)) != "zviz-warden":
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if f"Pid:\t{broker}\n" in f.read():
                        found.append(int(pid))
                        break
        except OSError:
            pass
    return found


def test_what_went_wrong_in_the_forker_is_the_callers_error(forker, tmp_path):
    channel = Channel()
    options = {"log_path": str(tmp_path / "missing" / "log")}
    with pytest.raises(SecurityLayerError, match="could not start.*FileNotFoundError"):
        forker.spawn(channel, os.getpid(), load_profile("web-server"), options)
    assert channel.supervisor_fd == -1
    # The forker survives a failed request.
    again = Channel()
    broker = forker.spawn(again, os.getpid(), load_profile("web-server"), {})
    wait_for(lambda: comm(broker) == "zviz-broker")
    again.container_end.close()
    wait_for(lambda: comm(broker) == "")
