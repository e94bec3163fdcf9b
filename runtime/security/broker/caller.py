"""One mediated call seen from the broker: the caller's memory, fds, /proc and
credentials, and the call performed on the caller's socket by the call's deadline.

Everything of the caller's is reached through the fds opened when the call is taken
(its /proc directory, its memory, a pidfd): they stay the caller's for good, whoever
gets its pid number next. What the call does with them is its handler's (handlers.py).
"""

import ctypes
import errno
import fcntl
import os
import select
import struct
import time

from runtime import linux
from runtime.security import syscalls
from runtime.security.broker import policy, sockets
from runtime.security.broker.policy import AF_NETLINK, AF_UNIX, AF_UNSPEC
from runtime.security.broker.sockets import SO_DOMAIN, SO_ERROR, SOL_SOCKET
from runtime.security.broker.verdict import Answered, Audit, Denied

MSG_DONTWAIT = 0x40
# pidfd_open's flag for a pidfd naming one thread, not its group (Linux 6.9; == O_EXCL).
PIDFD_THREAD = os.O_EXCL
OPENAT2 = 437

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Call:
    """One mediated call: reads the caller's memory, holds its fds, performs on its socket."""

    def __init__(self, broker, note, writable: bool = False):
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
        # What the policy asked about the call's socket, once per call (addresses.py).
        self.facts = None
        # Refusals audit mode let through: recorded however the call ends.
        self.audits: list[Audit] = []
        # The pid may have been reused between the notification and the opens above.
        if not broker.valid(note):
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
        return linux.pidfd_open(int(self.caller_status()["Tgid"][0]))

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

    def reserve(self, size: int) -> None:
        """Take `size` bytes of the broker's copy budget for this call (given back by close)."""
        self.broker.copies.take(size, self.broker.deadline(self.note))
        self.reserved += size

    def write(self, addr: int, data: bytes) -> None:
        os.pwrite(self.mem, data, addr)

    def apply(self, decision: policy.Decision) -> None:
        """A policy decision taken: a refusal raised (Denied, or the kernel's own error as
        OSError), an audited one kept for the record."""
        if decision.kind == policy.REFUSE_KIND:
            raise Denied(decision.reason, decision.errno)
        if decision.kind == policy.FAIL_KIND:
            raise OSError(decision.errno, decision.reason)
        if decision.kind == policy.AUDIT_KIND:
            self.audits.append(Audit(decision.reason, decision.decoded))

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
        if not self.broker.valid(self.note):
            raise Denied("caller vanished")
        if not self.broker.claim(self.note):
            raise Answered()

    def time_left(self) -> float:
        return self.broker.deadline(self.note) - time.monotonic()

    def _blocking(self, sock: int) -> int:
        """The socket's file status flags if the caller's socket blocks, else -1."""
        flags = fcntl.fcntl(sock, fcntl.F_GETFL)
        return -1 if flags & os.O_NONBLOCK else flags

    def _writable_in_time(self, sock: int) -> bool:
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        while True:
            left = self.time_left()
            if poller.poll(max(0, int(left * 1000 + 0.999))):
                return True
            if left <= 0:
                return False

    def connect_by_deadline(self, sock: int, addr: bytes) -> int:
        """A blocking connect the caller asked for, finished or undone by the deadline.

        The socket's file description is shared with the caller: it is switched to
        non-blocking only while the caller waits in this very connect. A connect still
        in progress at the deadline is aborted (connect to AF_UNSPEC) before ETIMEDOUT
        is answered, so the caller's socket cannot become connected afterwards.
        """
        buf = ctypes.create_string_buffer(addr, len(addr))
        flags = self._blocking(sock)
        if flags < 0:
            return self.raw(_libc.connect(sock, buf, len(addr)))
        fcntl.fcntl(sock, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        try:
            while True:
                if _libc.connect(sock, buf, len(addr)) == 0:
                    return 0
                err = ctypes.get_errno()
                if err == errno.EINPROGRESS:
                    break
                if err == errno.EAGAIN and self.time_left() > 0:
                    # A unix listener with a full backlog: a blocking connect would wait.
                    time.sleep(min(0.01, self.time_left()))
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

    def send_by_deadline(self, sock: int, flags: int, send) -> int:
        """send(flags) as the caller asked; a blocking one waits for room until the deadline.

        MSG_DONTWAIT per call leaves the shared file description alone. A stream
        socket may report a short count, as a blocking send interrupted by a signal.
        """
        flags &= 0xFFFFFFFF
        if flags & MSG_DONTWAIT or self._blocking(sock) < 0:
            return self.raw(send(flags))
        while True:
            sent = send(flags | MSG_DONTWAIT)
            if sent >= 0:
                return sent
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.EINTR):
                raise OSError(err, os.strerror(err))
            if not self._writable_in_time(sock):
                raise OSError(errno.ETIMEDOUT, "the broker's deadline passed")

    def caller_netns(self) -> tuple[int, int]:
        return sockets.file_id(os.stat("ns/net", dir_fd=self.proc))

    def proc_read(self, name: str) -> bytes:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc)
            with open(fd, "rb") as f:
                return f.read()
        except OSError:
            raise Denied("caller vanished") from None

    def openat2(self, dirfd: int, path: bytes, flags: int, resolve: int) -> int:
        how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
        fd = _libc.syscall(OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            err = ctypes.get_errno()
            raise Denied(f"unix socket path: {os.strerror(err)}", err)
        self.fds.append(fd)
        return fd

    def caller_status(self) -> dict[str, list[str]]:
        """/proc/<caller>/status, read once: a unix bind reads it before this thread's
        Landlock ruleset (the container's) hides the host's /proc."""
        if self._status is None:
            try:
                fd = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc)
                with open(fd) as f:
                    self._status = {k: v.split() for k, _, v in (line.partition(":") for line in f)}
            except OSError:
                raise Denied("caller vanished") from None
            if not self.broker.valid(self.note):
                raise Denied("caller vanished")
        return self._status

    def proc_dir(self, name: str) -> int:
        """The caller's root or cwd (an O_PATH fd closed with the call)."""
        try:
            fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.proc)
        except OSError:
            raise Denied("caller vanished") from None
        self.fds.append(fd)
        return fd

    def caller_has_capability(self, number: int) -> bool:
        return bool(int(self.caller_status()["CapEff"][0], 16) & (1 << number))

    def _become_caller(self) -> None:
        """This thread takes the caller's effective uid and gid (host ids), no groups.

        Raw syscalls: they change only the calling thread (glibc's wrappers would change
        every thread of the broker). The thread exists for this one call.
        """
        if self.became_caller:
            return
        status = self.caller_status()
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

    def perform(self, sock: int, fn):
        """Run fn(), as the caller where the peer or the file system would see who calls.

        Unix sockets: SO_PEERCRED, socket-file permissions and the owner of a bound
        socket file are the caller's, never the broker's (host root). Netlink: the kernel
        handles a message to itself in the sender's context and checks CAP_NET_ADMIN
        against the sending thread, so performed as host root an RTM_NEWADDR would change
        the container's network. Inet sockets carry no credentials; the broker's own
        answer is the policy decision made before.
        """
        if sockets.socket_option(sock, SO_DOMAIN) in (AF_UNIX, AF_NETLINK):
            self._become_caller()
        return fn()

    def raw(self, result: int) -> int:
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return result
