"""One handler per mediated call: copy the arguments out of the caller's memory, decide
on the copy (addresses.py, policy.py), perform the call on the caller's socket with the
copy, and return the Verdict. A refusal on the way is raised (Denied, or OSError for the
kernel's own answer); the core turns it into the verdict (core.verdict_of).

The table HANDLERS is what a profile's `mediate` may name (profiles.MEDIATED_SYSCALLS).
"""

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from runtime import linux
from runtime.security.broker import addresses, policy
from runtime.security.broker.policy import AF_UNIX
from runtime.security.broker.sockets import SOL_SOCKET
from runtime.security.broker.verdict import Denied, Verdict

SCM_RIGHTS, SCM_CREDENTIALS = 1, 2
SHUT_RDWR = 2
# The most bytes the broker copies for one send: a datagram's ceiling, with room.
MAX_SEND = 4 << 20
MAX_IOV = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sendmsg.restype = ctypes.c_ssize_t
_libc.sendto.restype = ctypes.c_ssize_t


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


def connect(call) -> Verdict:
    _, addr_ptr, addrlen = call.note.args[:3]
    sock = call.sock()
    addr = addresses.decide(call, call.read(addr_ptr, min(addrlen, 128)), "connect", sock)
    call.finish_check()
    result = call.perform(sock, lambda: call.connect_by_deadline(sock, addr))
    facts = addresses.facts_of(call, sock)
    if facts.abstract_name_holders is not None:
        try:
            reached_the_containers = addresses.peer_is_the_containers(facts)
        except Exception:  # noqa: BLE001 - fail closed: the connection must not stay
            reached_the_containers = False
        if not reached_the_containers:
            # The caller's socket is connected to host root's listener: nothing may
            # pass over it. The listener sees a connection that ends at once.
            _libc.shutdown(sock, SHUT_RDWR)
            raise Denied("abstract unix socket reached is not the container's")
    return Verdict.performed(result, call.audits)


def bind(call) -> Verdict:
    _, addr_ptr, addrlen = call.note.args[:3]
    sock = call.sock()
    addr = addresses.decide(call, call.read(addr_ptr, min(addrlen, 128)), "bind", sock)
    call.finish_check()
    if addr[:2] == struct.pack("=H", AF_UNIX) and addr[2:3] not in (b"", b"\0"):
        # Binding a path creates a socket file: only where the container itself may
        # write. This thread (and only it: Landlock is per thread) takes on the
        # profile's filesystem rules for the container's root before binding.
        call.caller_status()
        _landlock_like_the_container(call)
    buf = ctypes.create_string_buffer(addr, len(addr))
    result = call.perform(sock, lambda: call.raw(_libc.bind(sock, buf, len(addr))))
    return Verdict.performed(result, call.audits)


def _landlock_like_the_container(call) -> None:
    from runtime.security import landlock

    abi = landlock.abi_version()
    if abi < 1:
        if call.profile.landlock_required:
            raise Denied("no Landlock to confine a unix socket bind")
        return
    root = call.proc_dir("root")
    rules = landlock.Ruleset(abi, False, False, False)
    try:
        rules.allow_fd(root, landlock.READ, "/")
        for path in call.profile.writable:
            try:
                fd = call.openat2(
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


def sendto(call) -> Verdict:
    _, data_ptr, length, flags, addr_ptr, addrlen = call.note.args
    if length > MAX_SEND:
        raise Denied("send too large for the broker", errno.EMSGSIZE)
    sock = call.sock()
    addr = addresses.decide(call, call.read(addr_ptr, min(addrlen, 128)), "send", sock)
    call.reserve(length)
    data = call.read(data_ptr, length)
    call.finish_check()
    abuf = ctypes.create_string_buffer(addr, len(addr))
    result = call.perform(
        sock,
        lambda: call.send_by_deadline(
            sock, flags, lambda f: _libc.sendto(sock, data, len(data), f, abuf, len(addr))
        ),
    )
    return Verdict.performed(result, call.audits)


def _copy_msghdr(call, ptr: int, sock: int, limit: int = MAX_SEND):
    """(msghdr, buffers to keep alive, bytes copied): the broker's copy of one message.

    Everything kept for the send (data, iovec array, control) counts against
    `limit` and is taken from the broker's budget before it is copied.
    """
    raw = _Msghdr.from_buffer_copy(call.read(ptr, ctypes.sizeof(_Msghdr)))
    keep = []
    name = b""
    if raw.name and raw.namelen:
        name = addresses.decide(call, call.read(raw.name, min(raw.namelen, 128)), "send", sock)
        if raw.control and raw.controllen and policy.unspecified(name):
            # IP_PKTINFO's source would become the destination (__ip_route_output_key).
            raise Denied("ancillary data with an unspecified destination")
    if raw.iovlen > MAX_IOV:
        raise Denied("too many iovecs", errno.EMSGSIZE)
    theirs = call.read(raw.iov, ctypes.sizeof(_Iovec) * raw.iovlen) if raw.iovlen else b""
    parts = [struct.unpack_from("=QQ", theirs, 16 * i) for i in range(raw.iovlen)]
    controllen = min(raw.controllen, 65536) if raw.control else 0
    cost = sum(size for _, size in parts) + ctypes.sizeof(_Iovec) * raw.iovlen + controllen
    if cost > limit:
        raise Denied("send too large for the broker", errno.EMSGSIZE)
    call.reserve(cost)
    iovs = (_Iovec * max(1, raw.iovlen))()
    for i, (base, size) in enumerate(parts):
        chunk = call.read_buffer(base, size)
        keep.append(chunk)
        iovs[i].base = ctypes.cast(chunk, ctypes.c_void_p)
        iovs[i].len = size
    control = b""
    if controllen:
        control = _copy_control(call, call.read(raw.control, controllen))
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


def _copy_control(call, control: bytes) -> bytes:
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
            payload = struct.pack(f"={len(fds)}i", *(call.their_fd(fd) for fd in fds))
        elif level == SOL_SOCKET and kind == SCM_CREDENTIALS:
            # Would be checked against the broker's (host root) credentials.
            raise Denied("SCM_CREDENTIALS through the broker")
        out += struct.pack("=Qii", 16 + len(payload), level, kind) + payload
        out += b"\0" * ((-len(out)) % 8)
        offset += (length + 7) & ~7
    return bytes(out)


def sendmsg(call) -> Verdict:
    _, msg_ptr, flags = call.note.args[:3]
    sock = call.sock()
    msg, keep, _ = _copy_msghdr(call, msg_ptr, sock)
    call.finish_check()
    result = call.perform(
        sock,
        lambda: call.send_by_deadline(
            sock, flags, lambda f: _libc.sendmsg(sock, ctypes.byref(msg), f)
        ),
    )
    return Verdict.performed(result, call.audits)


def sendmmsg(call) -> Verdict:
    _, vec_ptr, vlen, flags = call.note.args[:4]
    vlen = min(vlen & 0xFFFFFFFF, MAX_IOV)
    sock = call.sock()
    entry = ctypes.sizeof(_Msghdr) + 8  # struct mmsghdr: msghdr + unsigned msg_len (padded)
    # Copy (and decide) every message first, with the broker's privileges; then send
    # them, possibly as the caller (see _perform), which cannot copy any more.
    # One call copies at most MAX_SEND in all: the messages beyond are left unsent,
    # as a sendmmsg that sent fewer than asked (the caller sends the rest again).
    copies = []
    left = MAX_SEND
    for i in range(vlen):
        try:
            msg, keep, cost = _copy_msghdr(call, vec_ptr + i * entry, sock, left)
        except (Denied, OSError):  # OSError: the kernel's own answer (ECONNREFUSED)
            if not copies:
                raise
            break
        copies.append((msg, keep))
        left -= cost
    call.finish_check()
    sent = 0
    for i, (msg, _keep) in enumerate(copies):
        try:
            n = call.perform(
                sock,
                lambda m=msg: call.send_by_deadline(
                    sock, flags, lambda f: _libc.sendmsg(sock, ctypes.byref(m), f)
                ),
            )
        except OSError:
            if sent == 0:
                raise
            break
        call.write(vec_ptr + i * entry + ctypes.sizeof(_Msghdr), struct.pack("=I", n))
        sent += 1
    return Verdict.performed(sent, call.audits)


@dataclass(frozen=True)
class Handler:
    perform: Callable[..., Verdict]
    # Whether the call has results to write back into the caller's memory (its memory
    # is opened read-only otherwise).
    writes_back: bool = False


HANDLERS = {
    "connect": Handler(connect),
    "bind": Handler(bind),
    "sendto": Handler(sendto),
    "sendmsg": Handler(sendmsg),
    "sendmmsg": Handler(sendmmsg, writes_back=True),
}
