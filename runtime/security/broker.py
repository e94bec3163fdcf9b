"""The broker: the supervisor side of seccomp user notification.

It answers two kinds of notification from a container's filter:
- mediated calls (connect, bind, sendto with an address, sendmsg, sendmmsg): the
  broker copies the arguments out of the caller's memory, decides on its own copy
  against the profile's egress/bind rules, and performs the call itself on the
  caller's socket (fetched with pidfd_getfd) with the copied arguments. It never
  answers SECCOMP_USER_NOTIF_FLAG_CONTINUE, so a caller rewriting its memory after
  the decision changes nothing.
- denied calls under --verbose: logged as one JSON line each and answered EPERM.

Fail closed: any error while handling a call answers EPERM. If the broker dies, the
kernel answers every pending and future notified call with ENOSYS. A stall ends in an
error too, within the profile's `broker.timeout` (T):
- a call the broker has received but not started performing by its deadline (receipt
  + T) is answered ETIMEDOUT by a watchdog thread; the worker, when it gets there,
  sees the call answered and does nothing;
- a call being performed is bounded by the same deadline on the broker's side: a
  connect runs non-blocking and, if not finished in time, is aborted (connect to
  AF_UNSPEC) before ETIMEDOUT is answered, so the caller's socket cannot connect
  later; sends wait for room only until the deadline;
- a whole-broker stall (stopped, deadlocked) leaves the calls unreceived in the kernel:
  the warden, a small child process forked before the broker holds the listener,
  expects a heartbeat from the watchdog thread at least every T once the broker
  serves, and SIGKILLs the broker otherwise, which closes the listener (ENOSYS for
  every pending call).

One broker process per container that needs one (`spawn`), double-forked so it is
nobody's child to reap; it exits when the last task using the filter has gone.
The same `Broker` class can run inside a long-lived supervisor on a thread
(`Broker(listener_fd, ...).serve()`) if one prefers.
"""

import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import select
import signal
import struct
import threading
import time

from runtime import denials, linux
from runtime.security import syscalls

# linux/seccomp.h ioctls on the listener fd.
NOTIF_RECV = 0xC0502100
NOTIF_SEND = 0xC0182101
NOTIF_ID_VALID = 0x40082102
_NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, nr, arch, ip, args[6]
_RESP = struct.Struct("=QqiI")  # id, val, error, flags

AF_UNSPEC, AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 0, 1, 2, 10, 16
SOL_SOCKET, SCM_RIGHTS, SCM_CREDENTIALS, SO_ERROR, SO_DOMAIN = 1, 1, 2, 4, 39
SO_PROTOCOL, IPPROTO_TCP, IPPROTO_UDP = 38, 6, 17
SO_TYPE, SO_PEERCRED, SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 3, 17, 1, 2, 5
SHUT_RDWR = 2
CLONE_NEWNET = 0x40000000
MSG_DONTWAIT = 0x40
SIOCGSKNS = 0x894C  # linux/sockios.h: a socket's network namespace, as a new fd
SIOCGIFCONF = 0x8912  # the IPv4 addresses of the socket's network namespace
_IFREQ_SIZE = 40  # struct ifreq on 64-bit: name[16] + the sockaddr union, padded
CAP_NET_BIND_SERVICE = 10
# Below this port a bind needs CAP_NET_BIND_SERVICE (the kernel default of
# net.ipv4.ip_unprivileged_port_start; zviz does not change it in containers).
UNPRIVILEGED_PORT_START = 1024
# pidfd_open's flag for a pidfd naming one thread, not its group (Linux 6.9; == O_EXCL).
PIDFD_THREAD = os.O_EXCL
# The most bytes the broker copies for one send: a datagram's ceiling, with room.
MAX_SEND = 4 << 20
MAX_IOV = 1024
# The most bytes all calls in flight may hold copied at once (a few of the largest).
MAX_COPIED = 4 * MAX_SEND
MAX_IN_FLIGHT = 256
DEFAULT_TIMEOUT = 10.0
# A received call is WAITING until its worker claims it right before the side effect
# (PERFORMING); it leaves the registry when answered, by the worker or the watchdog.
WAITING, PERFORMING = range(2)
OPENAT2 = 437

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.sendmsg.restype = ctypes.c_ssize_t
_libc.sendto.restype = ctypes.c_ssize_t


class Denied(Exception):
    def __init__(self, reason: str, err: int = errno.EPERM):
        super().__init__(reason)
        self.reason = reason
        self.errno = err
        self.decoded: dict = {}  # the refused address, for the denial record


class _Answered(Exception):
    """The watchdog answered the call before the worker could perform it."""


class CopyBudget:
    """Bytes the broker may hold copied from its container, shared by the calls in flight.

    The broker's memory is bounded by what it copies: without a budget, 256 calls in
    flight of MAX_SEND each (or one sendmmsg naming the same 4 MiB 64 times) would
    grow it far beyond the container's own memory limit. A call waits for room until
    its deadline, then fails with ENOBUFS.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._changed = threading.Condition()

    def take(self, size: int, deadline: float) -> None:
        with self._changed:
            while self.used + size > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Denied("the broker's copy budget is used up", errno.ENOBUFS)
                self._changed.wait(left)
            self.used += size

    def give(self, size: int) -> None:
        if size:
            with self._changed:
                self.used -= size
                self._changed.notify_all()


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Notification:
    __slots__ = ("id", "pid", "nr", "arch", "args")

    def __init__(self, raw: bytes):
        fields = _NOTIF.unpack(raw)
        self.id, self.pid, _, self.nr, self.arch, _ = fields[:6]
        self.args = fields[6:]


class Broker:
    """Serves one listener fd until every task using the filter is gone."""

    def __init__(
        self,
        listener_fd: int,
        profile,
        *,
        verbose: bool = False,
        container_id: str = "",
        log_fd: int = 2,
        heartbeat_fd: int = -1,
        records=None,
        record_context: dict | None = None,
    ):
        self.fd = listener_fd
        self.profile = profile
        self.verbose = verbose
        self.container_id = container_id
        self.log_fd = log_fd
        self.mediated = {syscalls.number(n): n for n in profile.mediate}
        self._log_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self.copies = CopyBudget(MAX_COPIED)
        self.egress_hosts = _EgressHosts(profile) if profile.egress_hosts else None
        self.timeout = float(getattr(profile, "broker_timeout", DEFAULT_TIMEOUT))
        self.heartbeat_fd = heartbeat_fd
        # Refusals become denial records (runtime/denials.py) in the container's file.
        self.records = records
        self.record_context = record_context or {}
        self._record_limit = denials.RateLimiter()
        self._calls: dict[int, list] = {}  # id -> [deadline, state, note]
        self._calls_changed = threading.Condition()
        self._serving = True
        # When the main loop took its current notification (None: waiting in poll).
        self._busy_since: float | None = None

    # --- the loop ---

    def serve(self) -> None:
        watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        watchdog.start()
        try:
            self._serve()
        finally:
            with self._calls_changed:
                self._serving = False
                self._calls_changed.notify()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            events = poller.poll()
            if any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in events):
                if not any(ev & select.POLLIN for _, ev in events):
                    return  # no task uses the filter any more
            self._busy_since = time.monotonic()
            buf = bytearray(_NOTIF.size)
            try:
                fcntl.ioctl(self.fd, NOTIF_RECV, buf)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR):
                    continue  # the caller died (or a signal) before we took it
                raise
            note = Notification(bytes(buf))
            name = self.mediated.get(note.nr)
            if name is not None:
                with self._calls_changed:
                    self._calls[note.id] = [time.monotonic() + self.timeout, WAITING, note]
                    self._calls_changed.notify()
                # A bounded number of calls in flight: a container flooding connects
                # waits for its own earlier calls instead of growing the broker (which
                # lives outside the container's cgroup) without limit. Calls waiting
                # here in the kernel are still covered by the warden's heartbeat.
                # Waiting for a slot is not a stall: each call in flight ends by its deadline.
                self._busy_since = None
                self._slots.acquire()
                self._busy_since = time.monotonic()
                threading.Thread(target=self._mediate, args=(note, name), daemon=True).start()
            else:
                self._deny(note, "denied by profile")
            self._busy_since = None

    def respond(self, note: Notification, val: int = 0, err: int = 0) -> None:
        try:
            fcntl.ioctl(self.fd, NOTIF_SEND, _RESP.pack(note.id, val, -err if err else 0, 0))
        except OSError as e:
            # ENOENT: the caller is gone; EINPROGRESS: already answered (the kernel
            # keeps the first answer only).
            if e.errno not in (errno.ENOENT, errno.EINPROGRESS):
                raise

    # --- deadlines ---

    def claim(self, note: Notification) -> bool:
        """The worker is about to perform the call: False if it has been answered already."""
        with self._calls_changed:
            call = self._calls.get(note.id)
            if call is None or call[1] != WAITING:
                return False
            call[1] = PERFORMING
            return True

    def deadline(self, note: Notification) -> float:
        with self._calls_changed:
            call = self._calls.get(note.id)
        return call[0] if call else time.monotonic()

    def answer(
        self, note: Notification, val: int = 0, err: int = 0, reason: str = "", decoded=None
    ) -> None:
        """The worker's one answer, unless the watchdog gave one first."""
        with self._calls_changed:
            call = self._calls.pop(note.id, None)
        if call is None:
            return
        self._answer_and_log(note, reason, val, err, decoded)

    def _watch(self) -> None:
        """Answers calls that passed their deadline unperformed; beats for the warden."""
        beat = self.timeout / 4
        while True:
            expired = []
            with self._calls_changed:
                if not self._serving:
                    return
                now = time.monotonic()
                for call_id, call in list(self._calls.items()):
                    if call[1] == WAITING and call[0] <= now:
                        expired.append(self._calls.pop(call_id)[2])
                # A performing call is bounded by its worker (same deadline): answering
                # it here could report a failure for a connect that then succeeds.
                waiting = [c[0] for c in self._calls.values() if c[1] == WAITING]
                wait = min([beat, *(d - now for d in waiting)])
                if not expired:
                    self._calls_changed.wait(max(wait, 0.001))
            for note in expired:
                self._answer_and_log(note, "broker did not answer in time", 0, errno.ETIMEDOUT)
            self._heartbeat()

    def _heartbeat(self) -> None:
        busy_since = self._busy_since
        if self.heartbeat_fd < 0 or (
            busy_since is not None and time.monotonic() - busy_since > self.timeout
        ):
            return  # the main loop is stuck on one notification: the rest go unreceived
        try:
            os.write(self.heartbeat_fd, b".")
        except BlockingIOError:
            pass  # the warden has not read the earlier beats yet: it knows we live

    def _deny(self, note: Notification, reason: str, err: int = errno.EPERM) -> None:
        self._answer_and_log(note, reason, 0, err)

    def _answer_and_log(
        self, note: Notification, reason: str, val: int, err: int, decoded=None
    ) -> None:
        # The record is taken while the caller still waits (its command name), written
        # after the answer: a log write may block on a full pipe, the caller must not.
        line = self._record(note, reason, err) if reason else None
        denial = self._denial(note, reason, err, decoded) if reason and err else None
        self.respond(note, val=val, err=err)
        if line:
            self._write_log(line)
        if denial is not None:
            with self._log_lock:
                self.records.write(self._record_limit.admit(denial))

    def record_audited(self, note: Notification, reason: str, decoded: dict) -> None:
        """Audit mode: a call the profile refuses goes through, recorded (verdict audit)."""
        if self.records is None:
            return
        audited = denials.record(
            self.record_context,
            source="broker",
            pid=note.pid,
            comm=_comm(note.pid),
            syscall=syscalls.name(note.nr),
            args=decoded,
            verdict="audit",
            rule=f"{reason}; {denials.AUDITED}",
        )
        with self._log_lock:
            self.records.write(self._record_limit.admit(audited))

    def _denial(self, note: Notification, reason: str, err: int, decoded) -> dict | None:
        """A refusal as a denial record (docs/denials.md), when the container keeps them."""
        if self.records is None:
            return None
        return denials.record(
            self.record_context,
            source="broker",
            pid=note.pid,
            comm=_comm(note.pid),
            syscall=syscalls.name(note.nr),
            args=decoded or {},
            verdict=errno.errorcode.get(err, str(err)),
            rule=reason,
        )

    def _record(self, note: Notification, reason: str, err: int) -> bytes | None:
        if not self.verbose:
            return None
        record = {
            "time": denials.rfc3339(time.time()),
            "container": self.container_id,
            "profile": self.profile.name,
            "pid": note.pid,
            "command": _comm(note.pid),
            "syscall": syscalls.name(note.nr),
            "nr": note.nr,
            "args": [f"{a:#x}" for a in note.args],
            "verdict": errno.errorcode.get(err, str(err)),
            "reason": reason,
        }
        return (json.dumps(record) + "\n").encode()

    def _write_log(self, line: bytes) -> None:
        # A log nobody reads (a full pipe) must not stall the broker: a record that
        # cannot be written within the timeout is dropped.
        writable = select.poll()
        writable.register(self.log_fd, select.POLLOUT)
        with self._log_lock:
            try:
                if writable.poll(int(self.timeout * 1000)):
                    os.write(self.log_fd, line)
            except OSError:
                pass

    def _valid(self, note: Notification) -> bool:
        try:
            fcntl.ioctl(self.fd, NOTIF_ID_VALID, struct.pack("=Q", note.id))
            return True
        except OSError:
            return False

    # --- mediated calls ---

    def _mediate(self, note: Notification, name: str) -> None:
        try:
            self._mediate_one(note, name)
        finally:
            self._slots.release()

    def _mediate_one(self, note: Notification, name: str) -> None:
        try:
            call = _Call(self, note, writable=name == "sendmmsg")
            try:
                result = getattr(call, name)()
            finally:
                call.close()
        except _Answered:
            return
        except Denied as d:
            self.answer(note, err=d.errno, reason=d.reason, decoded=d.decoded)
            return
        except OSError as e:
            # The call itself failed (e.g. ECONNREFUSED): that is its answer.
            self.answer(note, err=e.errno or errno.EPERM)
            return
        except Exception as e:  # noqa: BLE001 - fail closed on anything unexpected
            self.answer(note, err=errno.EPERM, reason=f"broker error: {type(e).__name__}: {e}")
            return
        self.answer(note, val=result)


_FAMILY_NAMES = {
    AF_UNSPEC: "AF_UNSPEC",
    AF_UNIX: "AF_UNIX",
    AF_INET: "AF_INET",
    AF_INET6: "AF_INET6",
    AF_NETLINK: "AF_NETLINK",
}


def _describe_address(addr: bytes) -> dict:
    """A sockaddr as a denial record shows it: family, and address:port or path."""
    if len(addr) < 2:
        return {}
    family = struct.unpack_from("=H", addr)[0]
    described = {"family": _FAMILY_NAMES.get(family, str(family))}
    try:
        if family in (AF_INET, AF_INET6):
            ip, port = _inet_address(family, addr)
            described["address"] = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        elif family == AF_UNIX:
            path = addr[2:].split(b"\0", 1)[0] if addr[2:3] != b"\0" else b"@" + addr[3:]
            described["address"] = path.decode(errors="replace")
    except (ValueError, struct.error):
        pass
    return described


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _socket_option(sock: int, option: int) -> int:
    value = ctypes.c_int(0)
    size = ctypes.c_uint32(4)
    if _libc.getsockopt(sock, SOL_SOCKET, option, ctypes.byref(value), ctypes.byref(size)):
        raise OSError(ctypes.get_errno(), "getsockopt")
    return value.value


def _normal_ip(ip):
    """An IPv4-mapped IPv6 address is the IPv4 address it carries: the kernel sends
    there over IPv4 (udpv6_sendmsg, tcp_v6_connect), so the IPv4 rules decide."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def _inet_address(family: int, addr: bytes):
    """(ip, port) of a sockaddr_in/sockaddr_in6 as the kernel reads it."""
    if family == AF_INET and len(addr) >= 8:
        ip = ipaddress.IPv4Address(addr[4:8])
    elif family == AF_INET6 and len(addr) >= 24:
        ip = _normal_ip(ipaddress.IPv6Address(addr[8:24]))
    else:
        raise Denied("short address", errno.EINVAL)
    return ip, struct.unpack_from("!H", addr, 2)[0]


def _sockets_by_pid(cgroups: bytes, pid_namespace: os.stat_result) -> dict[int, set[int]]:
    """{pid: inodes of the sockets it holds} of the processes in these cgroups and pid
    namespace."""
    held = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.stat(f"/proc/{pid}/ns/pid")
            if _file_id(ns) != _file_id(pid_namespace):
                continue
            with open(f"/proc/{pid}/cgroup", "rb") as f:
                if f.read() != cgroups:
                    continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                held.setdefault(int(pid), set()).add(int(link[8:-1]))
        held.setdefault(int(pid), set())
    return held


def _peer_abstract_name(sock: int) -> bytes | None:
    """The abstract name a connected unix socket's peer is bound to (None if not one)."""
    buf = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(128)
    if _libc.getpeername(sock, buf, ctypes.byref(size)):
        return None
    raw = buf.raw[: size.value]
    return raw[3:] if len(raw) > 3 and raw[2] == 0 else None


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _socket_netns(sock: int) -> tuple[int, int]:
    """The network namespace the socket was made in, as (st_dev, st_ino)."""
    netns = fcntl.ioctl(sock, SIOCGSKNS)
    try:
        return _file_id(os.fstat(netns))
    finally:
        os.close(netns)


def _ipv4_addresses(sock: int) -> set:
    """SIOCGIFCONF on the caller's socket: the kernel answers for the socket's namespace."""
    size = 64 * _IFREQ_SIZE
    while True:
        buf = ctypes.create_string_buffer(size)
        ifconf = bytearray(struct.pack("=i4xQ", size, ctypes.addressof(buf)))
        fcntl.ioctl(sock, SIOCGIFCONF, ifconf)
        used = struct.unpack_from("=i", ifconf)[0]
        if used < size:
            break
        size *= 2  # maybe cut short: ask again with room
    found = set()
    for offset in range(0, used, _IFREQ_SIZE):
        family = struct.unpack_from("=H", buf.raw, offset + 16)[0]
        if family == AF_INET:
            found.add(ipaddress.IPv4Address(buf.raw[offset + 20 : offset + 24]))
    return found


def _ipv6_addresses(if_inet6: bytes) -> set:
    """/proc/<pid>/net/if_inet6: one address in 32 hex digits at the start of each line."""
    found = set()
    for line in if_inet6.split(b"\n"):
        fields = line.split()
        if fields and len(fields[0]) == 32:
            found.add(_normal_ip(ipaddress.IPv6Address(bytes.fromhex(fields[0].decode()))))
    return found


def _unspecified(addr: bytes) -> bool:
    family = struct.unpack_from("=H", addr)[0]
    if family not in (AF_UNSPEC, AF_INET, AF_INET6):
        return False
    try:
        return _inet_address(AF_INET if family == AF_UNSPEC else family, addr)[0].is_unspecified
    except Denied:
        return False


def _bound_address(sock: int):
    """The socket's bound local address (None if it has none we can read)."""
    buf = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(128)
    if _libc.getsockname(sock, buf, ctypes.byref(size)):
        return None
    family = struct.unpack_from("=H", buf.raw)[0]
    if family not in (AF_INET, AF_INET6):
        return None
    return _inet_address(family, buf.raw[: size.value])[0]


class _EgressHosts:
    """The profile's egress_hosts: "name:port" reaches the addresses NAME resolves to.

    Resolved by the broker itself (dns.py), through the nameservers the runtime fixed at
    create (the operator's cluster_dns, or the pod's resolv.conf as the runtime's caller
    mounts it; Profile.egress_nameservers), from a socket the broker makes in the
    caller's socket's network namespace: the pod's DNS is reached from where the pod
    reaches it. Answers are cached per namespace and name for their TTL, then asked again.
    Loopback, link-local (cloud metadata), multicast and unspecified addresses are never
    allowed by a name, whatever the answer.
    """

    MAX_TTL = 86400

    def __init__(self, profile):
        self.hosts = profile.egress_hosts
        self.servers = profile.egress_nameservers
        self._cache: dict[tuple, tuple[frozenset, float]] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def allows(self, ip, port: int, sock: int, deadline: float) -> bool:
        names = [name for name, allowed in self.hosts if allowed == port]
        if not names or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            return False
        netns = fcntl.ioctl(sock, SIOCGSKNS)
        try:
            st = os.fstat(netns)
            for name in names:
                if ip in self.addresses(netns, (st.st_dev, st.st_ino, name), name, deadline):
                    return True
        finally:
            os.close(netns)
        return False

    def addresses(self, netns: int, key: tuple, name: str, deadline: float) -> frozenset:
        with self._locks_lock:
            lock = self._locks.setdefault(key, threading.Lock())
        # One query per name at a time: the others wait for its answer (or their deadline).
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Denied(f"egress_hosts: {name}: still resolving", errno.ETIMEDOUT)
        try:
            cached = self._cache.get(key)
            if cached is not None and time.monotonic() < cached[1]:
                return cached[0]
            from runtime.security import dns

            if not self.servers:
                raise Denied(f"egress_hosts: {name}: no nameserver to resolve it through")
            try:
                found, ttl = dns.resolve(
                    lambda family, kind: _socket_in_netns(netns, family, kind),
                    self.servers,
                    name,
                    deadline,
                )
            except dns.DnsError as e:
                raise Denied(f"egress_hosts: cannot resolve {name}: {e}") from None
            found = frozenset(_normal_ip(ip) for ip in found)
            self._cache[key] = (found, time.monotonic() + min(ttl, self.MAX_TTL))
            return found
        finally:
            lock.release()


def _socket_in_netns(netns: int, family: int, kind: int):
    """A new socket of the network namespace NETNS (a socket keeps the namespace it was
    made in), made by a short-lived thread that enters it: setns moves only that thread."""
    import socket

    made: list = []

    def make() -> None:
        try:
            if _libc.setns(netns, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            made.append(socket.socket(family, kind | socket.SOCK_CLOEXEC))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            made.append(error)

    thread = threading.Thread(target=make, name="dns-socket", daemon=True)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class _Call:
    """One mediated call: reads the caller's memory, decides, performs on its socket."""

    def __init__(self, broker: Broker, note: Notification, writable: bool = False):
        self.broker, self.note, self.profile = broker, note, broker.profile
        # Read-only unless the call has results to write back (sendmmsg's msg_len).
        mode = os.O_RDWR if writable else os.O_RDONLY
        # Everything of the caller's in /proc is reached through this directory, opened
        # before the validity check below: it stays the caller's for good (once the
        # caller is gone it answers ENOENT/ESRCH), whoever gets the pid number next.
        self.proc = os.open(f"/proc/{note.pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.mem = os.open("mem", mode | os.O_CLOEXEC, dir_fd=self.proc)
        self.fds: list[int] = []
        self.leader_fds = False  # self.pidfd is the thread group leader's (_caller_pidfd)
        self._status: dict[str, list[str]] | None = None
        self.pidfd = self._caller_pidfd(note.pid)
        self.became_caller = False
        self.reserved = 0  # bytes of the broker's copy budget this call holds
        self._own_netns = None  # _socket_namespace_is_the_callers_not_the_hosts, once per call
        self._own = None  # _own_addresses, looked up once per call
        # The container's processes when an abstract name was decided on: its listener
        # is checked against them once connected (_abstract_peer_is_the_containers).
        self._abstract_name_holders: frozenset[int] | None = None
        # The pid may have been reused between the notification and the opens above.
        if not broker._valid(note):
            self.close()
            raise Denied("caller vanished")

    def _caller_pidfd(self, tid: int) -> int:
        """A pidfd for the task that made the call: as often a thread of a threaded program
        (pgbench -j, a JVM, a Go runtime) as its leader, and pidfd_open refuses a thread
        unless asked with PIDFD_THREAD (Linux 6.9)."""
        try:
            return linux.pidfd_open(tid, PIDFD_THREAD)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a kernel without PIDFD_THREAD
                raise
        # Older kernels: the thread group's leader. Its fd table is the caller's unless the
        # thread was cloned without CLONE_FILES: their_fd checks that the socket it gets
        # is the one the caller's fd names.
        self.leader_fds = True
        return linux.pidfd_open(int(self._caller_status()["Tgid"][0]))

    def close(self) -> None:
        self.broker.copies.give(self.reserved)
        self.reserved = 0
        for fd in [self.proc, self.mem, self.pidfd, *self.fds]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        self.proc = self.mem = self.pidfd = -1

    def read(self, addr: int, size: int) -> bytes:
        if size == 0:
            return b""
        if addr == 0:
            raise Denied("NULL pointer", errno.EFAULT)
        try:
            data = os.pread(self.mem, size, addr)
        except OSError:
            raise Denied("bad pointer", errno.EFAULT) from None
        if len(data) != size:
            raise Denied("bad pointer", errno.EFAULT)
        return data

    def read_buffer(self, addr: int, size: int):
        """The caller's bytes in a ctypes buffer, copied once (no intermediate bytes)."""
        buf = ctypes.create_string_buffer(max(1, size))
        if size == 0:
            return buf
        if addr == 0:
            raise Denied("NULL pointer", errno.EFAULT)
        try:
            got = os.preadv(self.mem, [memoryview(buf).cast("B")[:size]], addr)
        except OSError:
            raise Denied("bad pointer", errno.EFAULT) from None
        if got != size:
            raise Denied("bad pointer", errno.EFAULT)
        return buf

    def _reserve(self, size: int) -> None:
        """Take `size` bytes of the broker's copy budget for this call (given back by close)."""
        self.broker.copies.take(size, self.broker.deadline(self.note))
        self.reserved += size

    def write(self, addr: int, data: bytes) -> None:
        os.pwrite(self.mem, data, addr)

    def their_fd(self, fd: int) -> int:
        try:
            ours = linux.pidfd_getfd(self.pidfd, fd)
        except OSError as e:
            raise Denied(f"fd {fd}: {e.strerror}", errno.EBADF) from None
        self.fds.append(ours)
        if self.leader_fds and not self._same_file(ours, fd):
            raise Denied(f"fd {fd}: the caller's fd table is not its leader's", errno.EBADF)
        return ours

    def _same_file(self, ours: int, fd: int) -> bool:
        """Whether OURS is the file the caller's own fd FD names (/proc/<tid>/fd)."""
        try:
            theirs = os.stat(f"fd/{fd}", dir_fd=self.proc)
        except OSError:
            return False
        mine = os.fstat(ours)
        return (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino)

    def sock(self) -> int:
        return self.their_fd(int(self.note.args[0]) & 0xFFFFFFFF)

    def finish_check(self) -> None:
        """Right before the call's side effect: the caller still waits and nobody answered."""
        if not self.broker._valid(self.note):
            raise Denied("caller vanished")
        if not self.broker.claim(self.note):
            raise _Answered()

    def _time_left(self) -> float:
        return self.broker.deadline(self.note) - time.monotonic()

    def _blocking(self, sock: int) -> int:
        """The socket's file status flags if the caller's socket blocks, else -1."""
        flags = fcntl.fcntl(sock, fcntl.F_GETFL)
        return -1 if flags & os.O_NONBLOCK else flags

    def _writable_in_time(self, sock: int) -> bool:
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        while True:
            left = self._time_left()
            if poller.poll(max(0, int(left * 1000 + 0.999))):
                return True
            if left <= 0:
                return False

    def _connect_by_deadline(self, sock: int, addr: bytes) -> int:
        """A blocking connect the caller asked for, finished or undone by the deadline.

        The socket's file description is shared with the caller: it is switched to
        non-blocking only while the caller waits in this very connect. A connect still
        in progress at the deadline is aborted (connect to AF_UNSPEC) before ETIMEDOUT
        is answered, so the caller's socket cannot become connected afterwards.
        """
        buf = ctypes.create_string_buffer(addr, len(addr))
        flags = self._blocking(sock)
        if flags < 0:
            return self._raw(_libc.connect(sock, buf, len(addr)))
        fcntl.fcntl(sock, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        try:
            while True:
                if _libc.connect(sock, buf, len(addr)) == 0:
                    return 0
                err = ctypes.get_errno()
                if err == errno.EINPROGRESS:
                    break
                if err == errno.EAGAIN and self._time_left() > 0:
                    # A unix listener with a full backlog: a blocking connect would wait.
                    time.sleep(min(0.01, self._time_left()))
                    continue
                if err == errno.EAGAIN:
                    raise OSError(errno.ETIMEDOUT, "the broker's deadline passed")
                if err != errno.EINTR:
                    raise OSError(err, os.strerror(err))
            if self._writable_in_time(sock):
                result = ctypes.c_int(0)
                size = ctypes.c_uint32(4)
                _libc.getsockopt(
                    sock, SOL_SOCKET, SO_ERROR, ctypes.byref(result), ctypes.byref(size)
                )
                if result.value:
                    raise OSError(result.value, os.strerror(result.value))
                return 0
            unspec = struct.pack("=H", AF_UNSPEC) + b"\0" * 14
            _libc.connect(sock, unspec, len(unspec))
            raise OSError(errno.ETIMEDOUT, "the broker's deadline passed")
        finally:
            fcntl.fcntl(sock, fcntl.F_SETFL, flags)

    def _send_by_deadline(self, sock: int, flags: int, send) -> int:
        """send(flags) as the caller asked; a blocking one waits for room until the deadline.

        MSG_DONTWAIT per call leaves the shared file description alone. A stream
        socket may report a short count, as a blocking send interrupted by a signal.
        """
        flags &= 0xFFFFFFFF
        if flags & MSG_DONTWAIT or self._blocking(sock) < 0:
            return self._raw(send(flags))
        while True:
            sent = send(flags | MSG_DONTWAIT)
            if sent >= 0:
                return sent
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.EINTR):
                raise OSError(err, os.strerror(err))
            if not self._writable_in_time(sock):
                raise OSError(errno.ETIMEDOUT, "the broker's deadline passed")

    # Address decisions work on the broker's copy of the sockaddr, as the kernel will
    # read it for the caller's socket (`sock`, the broker's copy of the caller's fd).
    def decide(self, addr: bytes, rules: str, sock: int) -> bytes:
        """The address the call may use, or Denied. rules: "connect", "send" or "bind"."""
        try:
            return self._decide_address(addr, rules, sock)
        except Denied as d:
            d.decoded = _describe_address(addr)
            raise

    def _decide_address(self, addr: bytes, rules: str, sock: int) -> bytes:
        if len(addr) < 2:
            raise Denied("short address", errno.EINVAL)
        family = struct.unpack_from("=H", addr)[0]
        if family == AF_UNSPEC and rules == "connect":
            return addr  # every family disconnects (inet_dgram_connect, unix, netlink)
        if family == AF_UNSPEC and rules == "send":
            # udp_sendmsg and raw_sendmsg read an AF_UNSPEC address as AF_INET
            # (rawv6_sendmsg as AF_INET6): decided as the socket's own family.
            family = _socket_option(sock, SO_DOMAIN)
            if family not in (AF_INET, AF_INET6):
                raise Denied("AF_UNSPEC destination on a non-inet socket")
        if family in (AF_INET, AF_INET6):
            ip, port = _inet_address(family, addr)
            if rules == "bind":
                self._decide_bind(ip, port, sock)
            else:
                for destination in self._destinations(ip, sock):
                    self._decide_destination(destination, port, sock)
            return addr
        if family == AF_UNIX:
            return self._unix_address(addr, rules, sock)
        if family == AF_NETLINK:
            # Netlink sockets exist only for the protocols the profile grants (seccomp);
            # what a message may change (CAP_NET_ADMIN over the namespace) the kernel
            # decides, against the caller's credentials (_perform takes them on).
            return addr
        raise Denied(f"address family {family} not allowed")

    def _decide_destination(self, ip, port: int, sock: int) -> None:
        """Loopback and the pod's own addresses first (joined namespaces only), then the
        operator's cluster DNS, then the profile: mode "none" reaches nothing else,
        "namespace" what its egress rules allow (cluster_egress_allows)."""
        if ip.is_loopback and self._socket_namespace_is_the_callers_not_the_hosts(sock):
            return  # the container's own loopback: egress rules govern what leaves
        if self.profile.network_joined and ip in self._own_addresses(sock):
            return
        if self._is_cluster_dns(ip, port, sock):
            return
        if self.profile.network == "none":
            return self._refuse_unless_audited(
                f"{ip} is not loopback or an address of the container's network namespace "
                f"(profile {self.profile.name} has no network)",
                ip,
                port,
                sock,
            )
        if not self._cluster_egress_allows(ip, port, sock):
            return self._refuse_unless_audited(
                f"egress to {ip} port {port} not allowed by profile", ip, port, sock
            )

    def _refuse_unless_audited(
        self, reason: str, ip, port: int, sock: int, egress: bool = True
    ) -> None:
        """Denied, or in audit mode recorded and let through where that stays inside the
        container: its own network namespace's socket (one handed in from the host's
        reaches the host's loopback), and never a destination of egress_deny (the
        profile's "never", such as a metadata service). A bind's address is not a
        destination: egress_deny (which lists 0.0.0.0/8) does not decide it."""
        if (
            self.profile.mode != "audit"
            or not self._socket_namespace_is_the_callers_not_the_hosts(sock)
            or (egress and any(rule.matches(str(ip), port) for rule in self.profile.egress_deny))
        ):
            raise Denied(reason)
        address = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        family = "AF_INET6" if ip.version == 6 else "AF_INET"
        self.broker.record_audited(self.note, reason, {"family": family, "address": address})

    # --- the operator's cluster network and name-based egress (issue 11, item 2) ---

    def _is_cluster_dns(self, ip, port: int, sock: int) -> bool:
        """The operator's cluster DNS service, over TCP or UDP only (names resolve under
        every profile; nothing else of the cluster is reached this way)."""
        cluster = self.profile.cluster_network
        if cluster is None or not cluster.is_dns(ip, port):
            return False
        return _socket_option(sock, SO_PROTOCOL) in (IPPROTO_TCP, IPPROTO_UDP)

    def _cluster_egress_allows(self, ip, port: int, sock: int) -> bool:
        """The profile's egress rules, with the operator's service and pod CIDRs taken out
        of egress_deny (their ports are still the profile's), then egress_hosts."""
        cluster = self.profile.cluster_network
        if cluster is not None and cluster.contains(ip):
            if any(rule.matches(str(ip), port) for rule in self.profile.egress):
                return True
        elif self.profile.egress_allows(str(ip), port):
            return True
        hosts = self.broker.egress_hosts
        return hosts is not None and hosts.allows(ip, port, sock, self.broker.deadline(self.note))

    def _socket_namespace_is_the_callers_not_the_hosts(self, sock: int) -> bool:
        """Whether the socket's network namespace is the caller's own and not the host's.

        Only then does loopback reach just the container (or its pod), so the profile's
        egress rules, which govern what leaves, do not apply (Landlock's port rules still
        do). A socket handed in from another namespace (the host's, over SCM_RIGHTS)
        reaches that namespace's loopback; the host's network shared by the operator is
        never the container's own."""
        if self._own_netns is None:
            theirs = _socket_netns(sock)
            self._own_netns = theirs == self._caller_netns() and theirs != _file_id(
                os.stat("/proc/self/ns/net")
            )
        return self._own_netns

    def _caller_netns(self) -> tuple[int, int]:
        return _file_id(os.stat("ns/net", dir_fd=self.proc))

    def _own_addresses(self, sock: int):
        """Where the caller's socket reaches only its own pod: a set of addresses.

        The addresses configured in the socket's network namespace at this
        moment (an address added or removed later counts from then on), provided that
        namespace is the caller's own and not the broker's (the host's): a socket
        handed in from another namespace reaches that namespace's loopback, not the pod's.
        """
        if self._own is None:
            self._own = frozenset()
            if self._socket_namespace_is_the_callers_not_the_hosts(sock):
                try:
                    if_inet6 = self._proc_read("net/if_inet6")
                except Denied:
                    if_inet6 = b""  # no IPv6 in that namespace (or the caller is gone)
                self._own = frozenset(_ipv4_addresses(sock) | _ipv6_addresses(if_inet6))
        return self._own

    def _decide_bind(self, ip, port: int, sock: int) -> None:
        """The profile's `bind` rules, except on the loopback of the caller's own network
        namespace (issue 14): a listener there is reached only from inside the container
        or its pod, as a connect to it is (_decide_destination). On the host's network
        (shared by the operator) the loopback is the host's: the rules hold."""
        own_loopback = ip.is_loopback and self._socket_namespace_is_the_callers_not_the_hosts(sock)
        if port != 0 and not own_loopback and not self.profile.bind_allows(str(ip), port):
            self._refuse_unless_audited(
                f"bind {ip} port {port} not allowed by profile", ip, port, sock, egress=False
            )
        # The broker binds with its own (host root) privileges: the caller's
        # capability decides, as the kernel would have for the caller.
        if 0 < port < UNPRIVILEGED_PORT_START and not self._caller_has_capability(
            CAP_NET_BIND_SERVICE
        ):
            raise Denied(f"bind port {port} needs CAP_NET_BIND_SERVICE", errno.EACCES)

    @staticmethod
    def _destinations(ip, sock: int) -> list:
        """Where the kernel sends to `ip`: an unspecified address means this host.

        0.0.0.0: the socket's bound address, else 127.0.0.1 (__ip_route_output_key);
        ::  : ::1, or ::ffff:127.0.0.1 on a socket bound to an IPv4-mapped address
        (tcp_v6_connect, ip6_datagram_connect, udpv6_sendmsg). Every candidate must be
        allowed: the socket may be bound by another thread before the call is performed.
        """
        if not ip.is_unspecified:
            return [ip]
        candidates = [ipaddress.IPv4Address("127.0.0.1")]
        if ip.version == 6:
            candidates.append(ipaddress.IPv6Address("::1"))
        bound = _bound_address(sock)
        if bound is not None and not bound.is_unspecified:
            candidates.append(bound)
        return candidates

    def _unix_address(self, addr: bytes, rules: str, sock: int) -> bytes:
        creating = rules == "bind"
        path = addr[2:]
        if not path or path[0] == 0:
            # Abstract (or autobind): looked up in the socket's own network namespace.
            if path and not creating and self.profile.landlock_scope:
                self._abstract_name_is_the_containers(path[1:], rules, sock)
            return addr
        path = path.split(b"\0", 1)[0]
        # A path is resolved inside the container's root, never the broker's.
        if path.startswith(b"/"):
            dirfd = self._proc_dir("root")
            resolve = linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS
            path = path.lstrip(b"/") or b"."
        else:
            dirfd = self._proc_dir("cwd")
            resolve = linux.RESOLVE_BENEATH | linux.RESOLVE_NO_MAGICLINKS
        if creating:
            parent, _, base = path.rpartition(b"/")
            if not base or base in (b".", b".."):
                raise Denied("bad unix socket path", errno.EINVAL)
            target = self._openat2(dirfd, parent or b".", os.O_PATH | os.O_DIRECTORY, resolve)
            new_path = b"/proc/self/fd/%d/%s" % (target, base)
        else:
            target = self._openat2(dirfd, path, os.O_PATH, resolve)
            new_path = b"/proc/self/fd/%d" % target
        if len(new_path) >= 108:
            raise Denied("unix socket path too long", errno.ENAMETOOLONG)
        return struct.pack("=H", AF_UNIX) + new_path + b"\0"

    def _abstract_name_is_the_containers(self, name: bytes, rules: str, sock: int) -> None:
        """Landlock's abstract unix socket scope, kept by the broker.

        The broker connects (or sends) from its own thread, outside the container's
        Landlock domain: the kernel's scope check would see the broker, so host root's
        listener in the container's network namespace (the CVE-2020-15257 class) would be
        reached. Instead every socket bound to the name must be held by a process of the
        container: one in the caller's pid namespace and cgroups.

        This looks before the broker connects, and a name can change hands in between:
        nobody bound is answered ECONNREFUSED here, as the kernel would at this instant
        (performed later, the connect would reach whoever binds the name meanwhile, host
        root included); a stream connect is checked again once connected, against the
        listener it reached (_abstract_peer_is_the_containers). A datagram leaves with
        the send: one sent while the container's socket lets go of the name and host
        root takes it is not caught (docs/security.md).
        """
        # /proc/net/unix prints a NUL of the name as '@' and ends a line at a newline:
        # a name with a newline cannot be told apart, so it is refused.
        if b"\n" in name:
            raise Denied("abstract unix socket name with a newline")
        if _socket_netns(sock) != self._caller_netns():
            raise Denied("abstract unix socket of another network namespace")
        bound = self._sockets_bound_to(name)
        if not bound:
            # The kernel looks the name up for a connect and a datagram's send; a stream
            # socket's send ignores or refuses an address without looking.
            if rules == "connect" or _socket_option(sock, SO_TYPE) == SOCK_DGRAM:
                raise OSError(errno.ECONNREFUSED, "nobody bound to the abstract name")
            return
        sockets_by_pid = _sockets_by_pid(
            self._proc_read("cgroup"), os.stat("ns/pid", dir_fd=self.proc)
        )
        if bound - set().union(*sockets_by_pid.values()):
            raise Denied(
                f"abstract unix socket @{name.decode(errors='replace')} is not the container's"
            )
        self._abstract_name_holders = frozenset(sockets_by_pid)

    def _sockets_bound_to(self, name: bytes) -> set[int]:
        """Inodes of the sockets bound to the abstract name in the caller's namespace."""
        printed = b"@" + name.replace(b"\0", b"@")
        bound = set()
        for line in self._proc_read("net/unix").split(b"\n")[1:]:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7] == printed:
                bound.add(int(fields[6]))
        return bound

    def _abstract_peer_is_the_containers(self, sock: int) -> bool:
        """After a stream connect to an abstract name: whether the listener it reached
        is the container's (connect() shuts the connection down if not).

        SO_PEERCRED names the process that made that very socket listen (the name may
        have changed hands since _abstract_name_is_the_containers looked): it must be
        one of the container's processes seen then. A live process outside them is
        refused. One that has exited (it listened, then forked and left) cannot be
        told apart by its pid: then the name's holders are looked at again, which is
        refused if anything outside the container holds the name now.
        """
        if _socket_option(sock, SO_TYPE) not in (SOCK_STREAM, SOCK_SEQPACKET):
            return True  # a datagram socket's peer carries no credentials: see above
        ucred = ctypes.create_string_buffer(12)
        size = ctypes.c_uint32(12)
        if _libc.getsockopt(sock, SOL_SOCKET, SO_PEERCRED, ucred, ctypes.byref(size)):
            raise OSError(ctypes.get_errno(), "getsockopt SO_PEERCRED")
        pid = struct.unpack_from("=i", ucred.raw)[0]
        if pid in self._abstract_name_holders:
            return True
        if pid > 0 and os.path.exists(f"/proc/{pid}"):
            return False
        name = _peer_abstract_name(sock)
        if name is None:
            return False
        sockets_by_pid = _sockets_by_pid(
            self._proc_read("cgroup"), os.stat("ns/pid", dir_fd=self.proc)
        )
        bound = self._sockets_bound_to(name)
        return bool(bound) and not bound - set().union(*sockets_by_pid.values())

    def _proc_read(self, name: str) -> bytes:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc)
            with open(fd, "rb") as f:
                return f.read()
        except OSError:
            raise Denied("caller vanished") from None

    def _openat2(self, dirfd: int, path: bytes, flags: int, resolve: int) -> int:
        how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
        fd = _libc.syscall(OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            err = ctypes.get_errno()
            raise Denied(f"unix socket path: {os.strerror(err)}", err)
        self.fds.append(fd)
        return fd

    def _caller_status(self) -> dict[str, list[str]]:
        """/proc/<caller>/status, read once: a unix bind reads it before this thread's
        Landlock ruleset (the container's) hides the host's /proc."""
        if self._status is None:
            try:
                fd = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc)
                with open(fd) as f:
                    self._status = {k: v.split() for k, _, v in (line.partition(":") for line in f)}
            except OSError:
                raise Denied("caller vanished") from None
            if not self.broker._valid(self.note):
                raise Denied("caller vanished")
        return self._status

    def _proc_dir(self, name: str) -> int:
        """The caller's root or cwd (an O_PATH fd closed with the call)."""
        try:
            fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.proc)
        except OSError:
            raise Denied("caller vanished") from None
        self.fds.append(fd)
        return fd

    def _caller_has_capability(self, number: int) -> bool:
        return bool(int(self._caller_status()["CapEff"][0], 16) & (1 << number))

    def _become_caller(self) -> None:
        """This thread takes the caller's effective uid and gid (host ids), no groups.

        Raw syscalls: they change only the calling thread (glibc's wrappers would change
        every thread of the broker). The thread exists for this one call.
        """
        if self.became_caller:
            return
        status = self._caller_status()
        uid, gid = int(status["Uid"][1]), int(status["Gid"][1])
        for name, args in (
            ("setgroups", (0, None)),
            ("setresgid", (gid,) * 3),
            ("setresuid", (uid,) * 3),
        ):
            if _libc.syscall(syscalls.number(name), *args) != 0:
                raise Denied(
                    f"cannot take the caller's credentials: {os.strerror(ctypes.get_errno())}"
                )
        self.became_caller = True

    def _perform(self, sock: int, fn):
        """Run fn(), as the caller where the peer or the file system would see who calls.

        Unix sockets: SO_PEERCRED, socket-file permissions and the owner of a bound
        socket file are the caller's, never the broker's (host root). Netlink: the kernel
        handles a message to itself in the sender's context and checks CAP_NET_ADMIN
        against the sending thread, so performed as host root an RTM_NEWADDR would change
        the container's network. Inet sockets carry no credentials; the broker's own
        answer is the policy decision made before.
        """
        if _socket_option(sock, SO_DOMAIN) in (AF_UNIX, AF_NETLINK):
            self._become_caller()
        return fn()

    def _raw(self, result: int) -> int:
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return result

    def connect(self) -> int:
        _, addr_ptr, addrlen = self.note.args[:3]
        sock = self.sock()
        addr = self.decide(self.read(addr_ptr, min(addrlen, 128)), "connect", sock)
        self.finish_check()
        result = self._perform(sock, lambda: self._connect_by_deadline(sock, addr))
        if self._abstract_name_holders is not None:
            try:
                reached_the_containers = self._abstract_peer_is_the_containers(sock)
            except Exception:  # noqa: BLE001 - fail closed: the connection must not stay
                reached_the_containers = False
            if not reached_the_containers:
                # The caller's socket is connected to host root's listener: nothing may
                # pass over it. The listener sees a connection that ends at once.
                _libc.shutdown(sock, SHUT_RDWR)
                raise Denied("abstract unix socket reached is not the container's")
        return result

    def bind(self) -> int:
        _, addr_ptr, addrlen = self.note.args[:3]
        sock = self.sock()
        addr = self.decide(self.read(addr_ptr, min(addrlen, 128)), "bind", sock)
        self.finish_check()
        if addr[:2] == struct.pack("=H", AF_UNIX) and addr[2:3] not in (b"", b"\0"):
            # Binding a path creates a socket file: only where the container itself may
            # write. This thread (and only it: Landlock is per thread) takes on the
            # profile's filesystem rules for the container's root before binding.
            self._caller_status()
            self._landlock_like_the_container()
        buf = ctypes.create_string_buffer(addr, len(addr))
        return self._perform(sock, lambda: self._raw(_libc.bind(sock, buf, len(addr))))

    def _landlock_like_the_container(self) -> None:
        from runtime.security import landlock

        abi = landlock.abi_version()
        if abi < 1:
            if self.profile.landlock_required:
                raise Denied("no Landlock to confine a unix socket bind")
            return
        root = self._proc_dir("root")
        rules = landlock.Ruleset(abi, False, False, False)
        try:
            rules.allow_fd(root, landlock.READ, "/")
            for path in self.profile.writable:
                try:
                    fd = self._openat2(
                        root,
                        path.lstrip("/").encode() or b".",
                        os.O_PATH,
                        linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_SYMLINKS,
                    )
                except Denied:
                    # Not in this rootfs, or reached through the image's symlinks: the
                    # image does not get to move a rule (as in the container's own ruleset).
                    continue
                rules.allow_fd(fd, landlock.READ | landlock.WRITE, path)
            linux.set_no_new_privs()  # this thread only; it ends with the call
            rules.restrict()
        finally:
            rules.close()

    def sendto(self) -> int:
        _, data_ptr, length, flags, addr_ptr, addrlen = self.note.args
        if length > MAX_SEND:
            raise Denied("send too large for the broker", errno.EMSGSIZE)
        sock = self.sock()
        addr = self.decide(self.read(addr_ptr, min(addrlen, 128)), "send", sock)
        self._reserve(length)
        data = self.read(data_ptr, length)
        self.finish_check()
        abuf = ctypes.create_string_buffer(addr, len(addr))
        return self._perform(
            sock,
            lambda: self._send_by_deadline(
                sock, flags, lambda f: _libc.sendto(sock, data, len(data), f, abuf, len(addr))
            ),
        )

    def _copy_msghdr(self, ptr: int, sock: int, limit: int = MAX_SEND):
        """(msghdr, buffers to keep alive, bytes copied): the broker's copy of one message.

        Everything kept for the send (data, iovec array, control) counts against
        `limit` and is taken from the broker's budget before it is copied.
        """
        raw = _Msghdr.from_buffer_copy(self.read(ptr, ctypes.sizeof(_Msghdr)))
        keep = []
        name = b""
        if raw.name and raw.namelen:
            name = self.decide(self.read(raw.name, min(raw.namelen, 128)), "send", sock)
            if raw.control and raw.controllen and _unspecified(name):
                # IP_PKTINFO's source would become the destination (__ip_route_output_key).
                raise Denied("ancillary data with an unspecified destination")
        if raw.iovlen > MAX_IOV:
            raise Denied("too many iovecs", errno.EMSGSIZE)
        theirs = self.read(raw.iov, ctypes.sizeof(_Iovec) * raw.iovlen) if raw.iovlen else b""
        parts = [struct.unpack_from("=QQ", theirs, 16 * i) for i in range(raw.iovlen)]
        controllen = min(raw.controllen, 65536) if raw.control else 0
        cost = sum(size for _, size in parts) + ctypes.sizeof(_Iovec) * raw.iovlen + controllen
        if cost > limit:
            raise Denied("send too large for the broker", errno.EMSGSIZE)
        self._reserve(cost)
        iovs = (_Iovec * max(1, raw.iovlen))()
        for i, (base, size) in enumerate(parts):
            chunk = self.read_buffer(base, size)
            keep.append(chunk)
            iovs[i].base = ctypes.cast(chunk, ctypes.c_void_p)
            iovs[i].len = size
        control = b""
        if controllen:
            control = self._copy_control(self.read(raw.control, controllen))
        msg = _Msghdr()
        if name:
            nbuf = ctypes.create_string_buffer(name, len(name))
            keep.append(nbuf)
            msg.name, msg.namelen = ctypes.cast(nbuf, ctypes.c_void_p), len(name)
        msg.iov, msg.iovlen = ctypes.cast(iovs, ctypes.c_void_p), raw.iovlen
        keep.append(iovs)
        if control:
            cbuf = ctypes.create_string_buffer(control, len(control))
            keep.append(cbuf)
            msg.control, msg.controllen = ctypes.cast(cbuf, ctypes.c_void_p), len(control)
        return msg, keep, cost

    def _copy_control(self, control: bytes) -> bytes:
        """Ancillary data with the caller's fds replaced by the broker's copies of them."""
        out = bytearray()
        offset = 0
        while offset + 16 <= len(control):
            length, level, kind = struct.unpack_from("=Qii", control, offset)
            if length < 16 or offset + length > len(control):
                raise Denied("malformed control message", errno.EINVAL)
            payload = control[offset + 16 : offset + length]
            if level == SOL_SOCKET and kind == SCM_RIGHTS:
                fds = struct.unpack(f"={len(payload) // 4}i", payload[: len(payload) // 4 * 4])
                payload = struct.pack(f"={len(fds)}i", *(self.their_fd(fd) for fd in fds))
            elif level == SOL_SOCKET and kind == SCM_CREDENTIALS:
                # Would be checked against the broker's (host root) credentials.
                raise Denied("SCM_CREDENTIALS through the broker")
            out += struct.pack("=Qii", 16 + len(payload), level, kind) + payload
            out += b"\0" * ((-len(out)) % 8)
            offset += (length + 7) & ~7
        return bytes(out)

    def sendmsg(self) -> int:
        _, msg_ptr, flags = self.note.args[:3]
        sock = self.sock()
        msg, keep, _ = self._copy_msghdr(msg_ptr, sock)
        self.finish_check()
        return self._perform(
            sock,
            lambda: self._send_by_deadline(
                sock, flags, lambda f: _libc.sendmsg(sock, ctypes.byref(msg), f)
            ),
        )

    def sendmmsg(self) -> int:
        _, vec_ptr, vlen, flags = self.note.args[:4]
        vlen = min(vlen & 0xFFFFFFFF, MAX_IOV)
        sock = self.sock()
        entry = ctypes.sizeof(_Msghdr) + 8  # struct mmsghdr: msghdr + unsigned msg_len (padded)
        # Copy (and decide) every message first, with the broker's privileges; then send
        # them, possibly as the caller (see _perform), which cannot copy any more.
        # One call copies at most MAX_SEND in all: the messages beyond are left unsent,
        # as a sendmmsg that sent fewer than asked (the caller sends the rest again).
        copies = []
        left = MAX_SEND
        for i in range(vlen):
            try:
                msg, keep, cost = self._copy_msghdr(vec_ptr + i * entry, sock, left)
            except (Denied, OSError):  # OSError: the kernel's own answer (ECONNREFUSED)
                if not copies:
                    raise
                break
            copies.append((msg, keep))
            left -= cost
        self.finish_check()
        sent = 0
        for i, (msg, _keep) in enumerate(copies):
            try:
                n = self._perform(
                    sock,
                    lambda m=msg: self._send_by_deadline(
                        sock, flags, lambda f: _libc.sendmsg(sock, ctypes.byref(m), f)
                    ),
                )
            except OSError:
                if sent == 0:
                    raise
                break
            self.write(vec_ptr + i * entry + ctypes.sizeof(_Msghdr), struct.pack("=I", n))
            sent += 1
        return sent


# --- The broker process ---


def spawn(
    channel,
    init_pid: int,
    profile,
    *,
    verbose=False,
    container_id="",
    log_path=None,
    records_path=None,
    record_context=None,
) -> int:
    """Fork a detached broker for one container; returns its pid."""
    r, w = os.pipe()
    log_fd = -1
    if log_path is not None:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    middle = os.fork()
    if middle == 0:
        status = 1
        try:
            os.close(r)
            os.setsid()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _run(
                    channel.supervisor_fd,
                    init_pid,
                    profile,
                    verbose,
                    container_id,
                    log_fd,
                    (records_path, record_context),
                )
                os._exit(0)
            os.write(w, str(pid).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    if log_fd >= 0:
        os.close(log_fd)
    os.waitpid(middle, 0)
    data = os.read(r, 32)
    os.close(r)
    channel.close_supervisor_end()
    if not data:
        from runtime.errors import SecurityLayerError

        raise SecurityLayerError("broker: could not start the broker process")
    return int(data)


def _run(
    channel_fd: int,
    init_pid: int,
    profile,
    verbose: bool,
    container_id: str,
    log_fd: int,
    records_to: tuple = (None, None),
) -> None:
    try:
        # Keep only the channel and the log: the broker must not hold the container's
        # stdio, the sync socket or anything else of the process that forked it.
        # (Both go high first, so moving one to 3 or 4 cannot clobber the other.)
        channel_high = fcntl.fcntl(channel_fd, fcntl.F_DUPFD_CLOEXEC, 100)
        log_high = fcntl.fcntl(log_fd, fcntl.F_DUPFD_CLOEXEC, 100) if log_fd >= 0 else -1
        os.dup2(channel_high, 3)
        log = 2
        if log_high >= 0:
            os.dup2(log_high, 4)
            log = 4
        linux.close_range(5 if log == 4 else 4)
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        if null > 2:
            os.close(null)
        title = ctypes.create_string_buffer(b"zviz-broker")  # must outlive the prctl call
        linux.prctl(linux.PR_SET_NAME, ctypes.addressof(title))
        heartbeat_fd = _fork_warden(profile)
        message = os.read(3, 256)
        if not message:
            return  # the container went away before starting
        listener_number = json.loads(message)["listener_fd"]
        pidfd = linux.pidfd_open(init_pid)
        listener = linux.pidfd_getfd(pidfd, listener_number)
        os.close(pidfd)
        # The warden's clock starts before the container can make a call.
        os.write(heartbeat_fd, b".")
        os.write(3, b"ok")
        os.close(3)
        records_path, record_context = records_to
        broker = Broker(
            listener,
            profile,
            verbose=verbose,
            container_id=container_id,
            log_fd=log,
            heartbeat_fd=heartbeat_fd,
            # Opened here, after close_range: the file is the broker's only other fd.
            records=denials.RecordFile(records_path) if records_path else None,
            record_context=record_context,
        )
        broker.serve()
    except Exception as e:  # noqa: BLE001
        try:
            os.write(2, f"zviz-broker: {type(e).__name__}: {e}\n".encode())
        except OSError:
            pass


def _fork_warden(profile) -> int:
    """Fork the warden; returns the broker's end of the heartbeat pipe.

    The warden is the broker's child, forked before the broker holds the listener (it
    must never hold it: killing the broker has to close the listener). It exits when
    the broker does (end of file on the pipe); without a heartbeat for the profile's
    broker.timeout it SIGKILLs the broker (held by pidfd: no pid reuse), so calls the
    stalled broker never received fail with ENOSYS instead of waiting.
    """
    timeout = float(getattr(profile, "broker_timeout", DEFAULT_TIMEOUT))
    beats, beat = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    broker_pidfd = linux.pidfd_open(os.getpid())
    # The broker reaps nothing: its only child, the warden, is reaped by the kernel.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    if os.fork() != 0:
        os.close(beats)
        os.close(broker_pidfd)
        return beat
    status = 0
    try:
        os.close(beat)
        # Nothing of the broker's but the pipe and the pidfd (no channel, no log).
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd > 2 and fd not in (beats, broker_pidfd):
                try:
                    os.close(fd)
                except OSError:
                    pass
        title = ctypes.create_string_buffer(b"zviz-warden")
        linux.prctl(linux.PR_SET_NAME, ctypes.addressof(title))
        poller = select.poll()
        poller.register(beats, select.POLLIN)
        # No deadline before the first beat: between `create` and `start` the broker
        # waits for the listener, for as long as the container is not started, and
        # no call can be pending before the broker serves.
        limit = -1
        while True:
            if not poller.poll(limit):
                linux.pidfd_send_signal(broker_pidfd, signal.SIGKILL)
                break
            try:
                if not os.read(beats, 4096):
                    break  # the broker exited
            except BlockingIOError:
                pass
            limit = int(timeout * 1000)
    except BaseException:  # noqa: BLE001 - the warden never runs the broker's code
        status = 1
    finally:
        os._exit(status)
