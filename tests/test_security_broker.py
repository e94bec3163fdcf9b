"""The broker: mediated connect/bind/sendto/sendmsg decided on the broker's copy, failing closed.

Run in a forked child with the real filter and a real broker process (see
test_security_layers.confined); the zviz-run versions are in integration/security/.
"""

import array
import errno
import os
import signal
import socket
import struct
import sys
import threading
import time

import pytest

from runtime import procstat
from runtime.security.broker import warden
from tests.privileges import drops_capabilities
from tests.test_security_layers import confined, errno_of


def loopback_profile(tmp_path, allowed_port: int, bind_port: int = 0) -> str:
    path = tmp_path / "web-loopback.toml"
    path.write_text(
        f"""
[profile]
name = "web-loopback"
extends = "web-server"
[network]
egress_deny = []
egress = [{{ cidr = "127.0.0.1/32", ports = [{allowed_port}] }}]
bind = [{{ cidr = "127.0.0.1/32", ports = [{bind_port or allowed_port}] }}]
tcp_connect = [{allowed_port}]
tcp_bind = [{bind_port or allowed_port}]
"""
    )
    return str(path)


def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s, s.getsockname()[1]


@drops_capabilities
def test_connect_to_allowed_port_works_other_port_is_denied(tmp_path):
    allowed, allowed_port = listener()
    other, other_port = listener()
    profile = loopback_profile(tmp_path, allowed_port)

    def probe():
        out = {}
        for name, port in (("allowed", allowed_port), ("other", other_port)):
            s = socket.socket()
            out[name] = errno_of(lambda p=port, s=s: s.connect(("127.0.0.1", p)))
            s.close()
        return out

    with allowed, other:
        result = confined(tmp_path, profile, probe)
    assert result == {"allowed": 0, "other": errno.EPERM}


@drops_capabilities
def test_connect_from_a_thread_is_decided_like_the_main_threads(tmp_path):
    # The notification names the calling thread; pidfd_open refuses a thread that does not
    # lead its group (pgbench -j, any threaded client got ENOENT from every connect).
    allowed, allowed_port = listener()
    other, other_port = listener()
    profile = loopback_profile(tmp_path, allowed_port)

    def probe():
        out = {}

        def connect(name, port):
            s = socket.socket()
            out[name] = errno_of(lambda: s.connect(("127.0.0.1", port)))
            s.close()

        for name, port in (("allowed", allowed_port), ("other", other_port)):
            thread = threading.Thread(target=connect, args=(name, port))
            thread.start()
            thread.join()
        return out

    with allowed, other:
        result = confined(tmp_path, profile, probe)
    assert result == {"allowed": 0, "other": errno.EPERM}


@drops_capabilities
def test_web_server_profile_refuses_loopback_and_metadata_egress(tmp_path):
    server, port = listener()

    def probe():
        s = socket.socket()
        s.settimeout(2)
        r1 = errno_of(lambda: s.connect(("127.0.0.1", port)))
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r2 = errno_of(lambda: u.sendto(b"x", ("169.254.169.254", 80)))
        return [r1, r2]

    with server:
        assert confined(tmp_path, "web-server", probe) == [errno.EPERM, errno.EPERM]


@drops_capabilities
def test_bind_decided_by_profile(tmp_path):
    probe_port = listener()
    probe_port[0].close()
    free_port = probe_port[1]
    profile = loopback_profile(tmp_path, 1, bind_port=free_port)

    def probe():
        out = {}
        for name, port in (
            ("allowed", free_port),
            ("other", free_port + 1 if free_port < 65535 else free_port - 1),
        ):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            out[name] = errno_of(lambda p=port, s=s: s.bind(("127.0.0.1", p)))
            s.close()
        ephemeral = socket.socket()
        out["ephemeral"] = errno_of(lambda: ephemeral.bind(("127.0.0.1", 0)))
        return out

    assert confined(tmp_path, profile, probe) == {
        "allowed": 0,
        "other": errno.EPERM,
        "ephemeral": 0,
    }


@drops_capabilities
def test_udp_sendto_and_sendmsg_decided_on_the_copied_address(tmp_path):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    receiver.settimeout(5)
    profile = loopback_profile(tmp_path, port)

    def probe():
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return [
            errno_of(lambda: u.sendto(b"via-sendto", ("127.0.0.1", port))),
            errno_of(lambda: u.sendmsg([b"via-", b"sendmsg"], [], 0, ("127.0.0.1", port))),
            errno_of(lambda: u.sendto(b"no", ("127.0.0.1", port + 1 if port < 65535 else 1))),
        ]

    with receiver:
        assert confined(tmp_path, profile, probe) == [0, 0, errno.EPERM]
        got = {receiver.recv(100), receiver.recv(100)}
    assert got == {b"via-sendto", b"via-sendmsg"}


@drops_capabilities
def test_sendmsg_passes_file_descriptors_through_the_broker(tmp_path):
    def probe():
        a, b = socket.socketpair()
        r, w = os.pipe()
        os.write(w, b"through-the-broker")
        a.sendmsg([b"fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        msg, anc, _, _ = b.recvmsg(10, socket.CMSG_SPACE(4))
        fd = array.array("i", anc[0][2])[0]
        return [msg.decode(), os.read(fd, 100).decode()]

    assert confined(tmp_path, "web-server", probe) == ["fd", "through-the-broker"]


@drops_capabilities
def test_unix_connect_by_path_works_through_the_broker(tmp_path):
    path = str(tmp_path / "sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def probe():
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.sendall(b"hello")
        return "ok"

    with server:
        assert confined(tmp_path, "web-server", probe) == "ok"
        conn, _ = server.accept()
        assert conn.recv(10) == b"hello"
        conn.close()


@drops_capabilities
def test_killed_broker_makes_mediated_calls_fail_never_succeed(tmp_path):
    allowed, allowed_port = listener()
    profile = loopback_profile(tmp_path, allowed_port)

    def kill(broker_pid):
        os.kill(broker_pid, signal.SIGKILL)
        # The broker is nobody's child: wait for it to vanish instead of reaping.
        while os.path.exists(f"/proc/{broker_pid}") and "Z" not in _state(broker_pid):
            os.sched_yield()

    def probe():
        s = socket.socket()
        return errno_of(lambda: s.connect(("127.0.0.1", allowed_port)))

    with allowed:
        result = confined(tmp_path, profile, probe, after_apply=kill)
    assert result == errno.ENOSYS  # the kernel's answer with no listener left: never allowed


def _state(pid):
    try:
        return procstat.state(pid)
    except OSError:
        return "Z"


@drops_capabilities
def test_unix_bind_through_the_broker_only_where_the_container_may_write(tmp_path):
    writable = tmp_path / "writable"
    writable.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def probe():
        out = {}
        for name, where in (("writable", writable), ("elsewhere", elsewhere)):
            s = socket.socket(socket.AF_UNIX)
            out[name] = errno_of(lambda s=s, w=where: s.bind(str(w / "sock")))
            s.close()
        return out

    # writable= replaces the profile's list (which has /tmp) for the child and the broker.
    result = confined(tmp_path, "web-server", probe, writable=[str(writable), "/dev/null"])
    assert result == {"writable": 0, "elsewhere": errno.EACCES}
    assert (writable / "sock").exists() and not (elsewhere / "sock").exists()


@drops_capabilities
def test_privileged_port_bind_needs_the_callers_capability(tmp_path):
    no_caps = tmp_path / "web-no-caps.toml"
    no_caps.write_text('[profile]\nextends = "web-server"\n[capabilities]\nallow = []\n')

    def probe():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        result = errno_of(lambda: s.bind(("0.0.0.0", 8443)))  # unprivileged, listed
        s.close()
        s = socket.socket()
        result2 = errno_of(lambda: s.bind(("0.0.0.0", 443)))  # listed, privileged
        s.close()
        return [result, result2]

    # The broker binds as host root: it must refuse what the caller itself could not do.
    assert confined(tmp_path, str(no_caps), probe) == [0, errno.EACCES]
    assert confined(tmp_path, "web-server", probe) == [0, 0]


@drops_capabilities
def test_sendmmsg_sends_each_message_and_reports_lengths(tmp_path):
    import ctypes

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    receiver.settimeout(5)
    profile = loopback_profile(tmp_path, port)

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    class Msghdr(ctypes.Structure):
        _fields_ = [
            ("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
            ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p),
            ("controllen", ctypes.c_size_t), ("flags", ctypes.c_int),
        ]  # fmt: skip

    class Mmsghdr(ctypes.Structure):
        _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]

    def probe():
        libc = ctypes.CDLL(None, use_errno=True)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        addr = ctypes.create_string_buffer(
            struct.pack("=H", socket.AF_INET)
            + struct.pack("!H", port)
            + socket.inet_aton("127.0.0.1")
            + b"\0" * 8
        )
        payloads = [ctypes.create_string_buffer(b"first"), ctypes.create_string_buffer(b"second!")]
        iovs = [Iovec(ctypes.cast(p, ctypes.c_void_p), len(p.value)) for p in payloads]
        vec = (Mmsghdr * 2)()
        for i in range(2):
            vec[i].hdr.name = ctypes.cast(addr, ctypes.c_void_p)
            vec[i].hdr.namelen = 16
            vec[i].hdr.iov = ctypes.cast(ctypes.pointer(iovs[i]), ctypes.c_void_p)
            vec[i].hdr.iovlen = 1
        sent = libc.sendmmsg(u.fileno(), vec, 2, 0)
        return [sent, vec[0].len, vec[1].len]

    with receiver:
        assert confined(tmp_path, profile, probe) == [2, 5, 7]
        assert {receiver.recv(100), receiver.recv(100)} == {b"first", b"second!"}


def _short_timeout(tmp_path, port: int, seconds: float = 0.5) -> str:
    path = tmp_path / "web-loopback-short.toml"
    path.write_text(
        f'[profile]\nextends = "{loopback_profile(tmp_path, port)}"\n'
        f"[broker]\ntimeout = {seconds}\n"
    )
    return str(path)


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _warden_of(broker_pid: int) -> int:
    """The broker's one child, its warden."""
    with open(f"/proc/{broker_pid}/task/{broker_pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    assert len(children) == 1, children
    return children[0]


@drops_capabilities
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python-fallback"])
def test_stopped_broker_is_killed_by_its_warden_and_the_call_fails(tmp_path, monkeypatch, compiled):
    """The compiled warden (runtime/broker_warden.c, as `make install` built it), and
    without it the Python warden the broker forks instead (said under --verbose)."""
    if compiled and not os.path.exists(warden.binary_path()):
        pytest.skip(f"no {warden.binary_path()}: `make install` builds it")
    if not compiled:
        monkeypatch.setattr(warden, "binary_path", lambda: str(tmp_path / "no-warden-here"))
    allowed, allowed_port = listener()
    profile = _short_timeout(tmp_path, allowed_port)
    log = tmp_path / "broker.log"
    stopped = []

    def stop(broker_pid):
        guard = _warden_of(broker_pid)
        # The Python warden names itself once it has closed the broker's fds.
        deadline = time.monotonic() + 10
        while _comm(guard) != "zviz-warden":
            assert time.monotonic() < deadline, _comm(guard)
            time.sleep(0.01)
        exe = os.readlink(f"/proc/{guard}/exe")
        fds = sorted(map(int, os.listdir(f"/proc/{guard}/fd")))
        if compiled:
            assert exe == os.path.realpath(warden.binary_path())
            assert fds == [3, 4]  # the heartbeat pipe and the broker's pidfd: no listener
        else:
            assert exe == os.path.realpath(sys.executable)
        os.kill(broker_pid, signal.SIGSTOP)
        stopped.append(broker_pid)

    def probe():
        s = socket.socket()
        return errno_of(lambda: s.connect(("127.0.0.1", allowed_port)))

    with allowed:
        result = confined(tmp_path, profile, probe, after_apply=stop, verbose=True, log_path=log)
        allowed.setblocking(False)
        arrived = errno_of(allowed.accept)
    assert stopped
    # The warden's SIGKILL closed the listener: the kernel's ENOSYS, and no connection.
    assert result == errno.ENOSYS
    assert arrived == errno.EAGAIN
    fell_back = "the Python warden runs" in log.read_text()
    assert fell_back == (not compiled), log.read_text()


@drops_capabilities
def test_connect_unfinished_by_the_deadline_fails_and_is_undone(tmp_path):
    """A loopback listener with a full accept queue drops SYNs: the connect hangs."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    profile = _short_timeout(tmp_path, port)

    def probe():
        import time

        s = socket.socket()
        result = errno_of(lambda: s.connect(("127.0.0.1", port)))
        full.accept()[0].close()  # room again: a SYN retransmitted now would connect
        time.sleep(1.5)  # past the first SYN retransmission (1 s)
        full.setblocking(False)
        return [result, errno_of(s.getpeername), errno_of(full.accept)]

    with full, filler:
        assert confined(tmp_path, profile, probe) == [
            errno.ETIMEDOUT,
            errno.ENOTCONN,
            errno.EAGAIN,
        ]


@drops_capabilities
def test_unix_connect_to_a_full_backlog_fails_by_the_deadline(tmp_path):
    path = str(tmp_path / "full.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(0)
    fillers = []

    def probe():
        c = socket.socket(socket.AF_UNIX)
        return errno_of(lambda: c.connect(path))

    with server:
        # Fill the backlog from the host (a blocking connect waits once it is full).
        while True:
            f = socket.socket(socket.AF_UNIX)
            f.setblocking(False)
            if errno_of(lambda f=f: f.connect(path)):
                f.close()
                break
            fillers.append(f)
        try:
            result = confined(tmp_path, _short_timeout(tmp_path, 1), probe)
        finally:
            for f in fillers:
                f.close()
    assert result == errno.ETIMEDOUT


def test_broker_timeout_is_validated_and_defaulted(tmp_path):
    from runtime.errors import InvalidArgument
    from runtime.security.profiles import load_profile

    assert load_profile("web-server").broker_timeout == 10.0
    good = tmp_path / "good.toml"
    good.write_text('[profile]\nextends = "web-server"\n[broker]\ntimeout = 2\n')
    assert load_profile(str(good)).broker_timeout == 2.0
    for bad_value in ("0", "-1", '"10s"', "7200"):
        bad = tmp_path / "bad.toml"
        bad.write_text(f'[profile]\nextends = "web-server"\n[broker]\ntimeout = {bad_value}\n')
        with pytest.raises(InvalidArgument, match=r"bad\.toml: broker\.timeout: must be a number"):
            load_profile(str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[profile]\nextends = "web-server"\n[broker]\ntimeot = 2\n')
    with pytest.raises(InvalidArgument, match=r"broker\.timeot: unknown key"):
        load_profile(str(unknown))


@drops_capabilities
def test_call_the_worker_has_not_performed_by_the_deadline_fails_and_stays_undone(
    tmp_path, monkeypatch
):
    """The watchdog's answer. Only the slowness is injected (a delay before the worker
    starts, standing in for a stuck or starved thread); the broker, filter and sockets
    are real. The worker wakes after the answer and must perform nothing (the id is no
    longer valid in the kernel, and its claim on the call fails)."""
    import time

    from runtime.security import broker

    allowed, allowed_port = listener()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", allowed_port))  # the same number, UDP
    profile = _short_timeout(tmp_path, allowed_port, seconds=0.3)
    mediate = broker.Broker._mediate

    def slow_mediate(self, note, handler):
        time.sleep(self.timeout + 0.3)
        mediate(self, note, handler)

    # Patched here, inherited by the broker process start_broker forks from this one.
    monkeypatch.setattr(broker.Broker, "_mediate", slow_mediate)

    def probe():
        s = socket.socket()
        connected = errno_of(lambda: s.connect(("127.0.0.1", allowed_port)))
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sent = errno_of(lambda: u.sendto(b"late", ("127.0.0.1", allowed_port)))
        time.sleep(0.8)  # both workers have woken up (and must have done nothing)
        return [connected, sent, errno_of(s.getpeername)]

    with allowed, receiver:
        result = confined(tmp_path, profile, probe)
        allowed.setblocking(False)
        receiver.setblocking(False)
        arrived = [errno_of(allowed.accept), errno_of(lambda: receiver.recv(10))]
    assert result == [errno.ETIMEDOUT, errno.ETIMEDOUT, errno.ENOTCONN]
    assert arrived == [errno.EAGAIN, errno.EAGAIN]


@drops_capabilities
def test_ipv4_mapped_destination_is_decided_by_the_ipv4_rules(tmp_path):
    """::ffff:127.0.0.1 is sent over IPv4 to 127.0.0.1: an IPv6 rule must not allow it."""
    server, port = listener()
    path = tmp_path / "v6-only.toml"
    path.write_text(
        f"""
[profile]
name = "v6-only"
extends = "web-server"
[network]
egress_deny = []
egress = [{{ cidr = "::/0", ports = [{port}] }}]
tcp_connect = [{port}]
"""
    )

    def probe():
        s = socket.socket(socket.AF_INET6)
        return errno_of(lambda: s.connect(("::ffff:127.0.0.1", port)))

    with server:
        assert confined(tmp_path, str(path), probe) == errno.EPERM


def test_copy_budget_waits_for_room_then_fails_with_enobufs():
    import threading
    import time

    from runtime.security import broker

    budget = broker.CopyBudget(10)
    budget.take(8, time.monotonic() + 1)
    try:
        budget.take(4, time.monotonic() + 0.05)
        raise AssertionError("took more than the budget")
    except broker.Denied as e:
        assert e.errno == errno.ENOBUFS
    threading.Timer(0.05, budget.give, args=(8,)).start()
    budget.take(4, time.monotonic() + 5)  # room once the first call gives its bytes back
    assert budget.used == 4
