"""What the reliability tests share: a shim daemon driven over its real socket (the test
plays containerd's Task client and Events server, as integration/test_shim_service.py
does), raw ttrpc frames for clients that misbehave, and the leftovers a container can
leave (processes in its cgroup, its state)."""

import os
import select
import signal
import socket
import time

from api.gen.containerd.task.v2 import shim_pb2
from api.ttrpc.framing import HEADER, TYPE_REQUEST
from api.ttrpc.wire import Response, encode_request, request_prefix
from integration.test_shim_service import (  # noqa: F401 - re-exported for the tests here
    NAMESPACE,
    TASK,
    Harness,
    RecordedEvents,
    _scenario,
    _wait_gone,
)
from runtime import procstat


def plain_bundle(make_bundle, args) -> str:
    """A busybox bundle running ARGS without a terminal (the shim gets plain fifos)."""
    import json

    bundle = make_bundle(args=list(args))
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    with open(path, "w") as f:
        json.dump(config, f)
    return bundle


def socket_path(address: str) -> str:
    return address.removeprefix("unix://")


def raw_connect(address: str, *, blocking: bool = False) -> socket.socket:
    """A connection made the way Go's net.Dial makes it: a non-blocking connect, which
    fails with EAGAIN (not waits) when the listener's backlog is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(blocking)
    try:
        sock.connect(socket_path(address))
    except BaseException:
        sock.close()
        raise
    return sock


def connect_frame(container_id: str, stream_id: int = 1) -> bytes:
    """A whole Task/Connect request frame."""
    payload = encode_request(
        request_prefix(TASK, "Connect"),
        shim_pb2.ConnectRequest(id=container_id).SerializeToString(),
    )
    return HEADER.pack(len(payload), stream_id, TYPE_REQUEST, 0) + payload


def read_response(sock: socket.socket, timeout: float) -> shim_pb2.ConnectResponse:
    """The Connect response on SOCK (blocking, within TIMEOUT); raises on an error status."""
    sock.settimeout(timeout)
    header = _read_exactly(sock, HEADER.size)
    length, _stream, _type, _flags = HEADER.unpack(header)
    response = Response.FromString(_read_exactly(sock, length))
    if response.status.code:
        raise AssertionError(f"Connect answered {response.status.code}: {response.status.message}")
    return shim_pb2.ConnectResponse.FromString(response.payload)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def cgroup_pids(container_id: str) -> list[int]:
    """Processes left in any cgroup named after CONTAINER_ID (v1 hierarchies or v2)."""
    found = set()
    for directory, _subdirs, files in os.walk("/sys/fs/cgroup"):
        if container_id in os.path.basename(directory) and "cgroup.procs" in files:
            try:
                with open(os.path.join(directory, "cgroup.procs")) as f:
                    found.update(int(line) for line in f if line.strip())
            except OSError:
                pass  # removed while we looked
    return sorted(found)


class Watched:
    """A process followed through a pidfd from the moment it is known. A bare pid may name
    another process by the time it is checked again: pid_max is 32768 on this machine and
    a soak's containers fork hundreds of processes a second, so a pid noted minutes ago is
    often someone else's (the soak saw one "alive" after its container was deleted). A
    pidfd never moves to another process; it turns readable when its process exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self.fd = None  # already gone

    def alive(self) -> bool:
        if self.fd is None:
            return False
        exited = select.select([self.fd], [], [], 0)[0]
        return not exited

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __repr__(self) -> str:
        return f"Watched({self.pid})"


def watch(pids) -> list[Watched]:
    return [Watched(pid) for pid in pids]


def alive(pid: "int | Watched") -> bool:
    """Running (a zombie is dead: its parent, maybe the host's init, reaps it in its time).
    A bare pid is only safe to check soon after it was learnt; else pass a Watched."""
    if isinstance(pid, Watched):
        return pid.alive()
    try:
        return procstat.state(pid) != "Z"
    except (FileNotFoundError, ProcessLookupError):
        # Gone before the open, or between the open and the read (ESRCH): seen under load.
        return False


def kill_and_wait(pid: int) -> None:
    """SIGKILL PID and wait (10 s at most) until it is gone."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)
