"""What the kernel says about a socket and the processes holding sockets: the broker's
syscalls and /proc reads for the facts its policy asks (addresses.SocketFacts)."""

import ctypes
import fcntl
import ipaddress
import os
import struct

from runtime.security.broker import policy
from runtime.security.broker.policy import AF_INET, AF_INET6

SOL_SOCKET, SO_TYPE, SO_ERROR, SO_PEERCRED, SO_PROTOCOL, SO_DOMAIN = 1, 3, 4, 17, 38, 39
SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 1, 2, 5
SO_ACCEPTCON = 1 << 16  # linux/net.h __SO_ACCEPTCON: /proc/net/unix's flag of a listener
SIOCGSKNS = 0x894C  # linux/sockios.h: a socket's network namespace, as a new fd
SIOCGIFCONF = 0x8912  # the IPv4 addresses of the socket's network namespace
_IFREQ_SIZE = 40  # struct ifreq on 64-bit: name[16] + the sockaddr union, padded

_libc = ctypes.CDLL(None, use_errno=True)


def socket_option(sock: int, option: int) -> int:
    value = ctypes.c_int(0)
    size = ctypes.c_uint32(4)
    if _libc.getsockopt(sock, SOL_SOCKET, option, ctypes.byref(value), ctypes.byref(size)):
        raise OSError(ctypes.get_errno(), "getsockopt")
    return value.value


def sockets_by_pid(cgroups: bytes, pid_namespace: os.stat_result) -> dict[int, dict[int, int]]:
    """{pid: {inode of a socket it holds: the fd number it holds it at}} of the processes
    in these cgroups and pid namespace."""
    held = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.stat(f"/proc/{pid}/ns/pid")
            if file_id(ns) != file_id(pid_namespace):
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
                held.setdefault(int(pid), {})[int(link[8:-1])] = int(fd)
        held.setdefault(int(pid), {})
    return held


def abstract_name_of(sock: int) -> bytes | None:
    """The abstract name a unix socket is bound to (None if not one)."""
    buf = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(128)
    if _libc.getsockname(sock, buf, ctypes.byref(size)):
        return None
    raw = buf.raw[: size.value]
    return raw[3:] if len(raw) > 3 and raw[2] == 0 else None


def unix_sockets_named(proc_net_unix: bytes, name: bytes) -> dict[int, tuple[int, bool]]:
    """{inode: (socket type, listening)} of the lines of /proc/net/unix showing the
    abstract name."""
    printed = b"@" + name.replace(b"\0", b"@")
    named = {}
    for line in proc_net_unix.split(b"\n")[1:]:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == printed:
            named[int(fields[6])] = (int(fields[4], 16), bool(int(fields[3], 16) & SO_ACCEPTCON))
    return named


def peer_pid(sock: int) -> int:
    """SO_PEERCRED's pid: the process that made the peer socket listen (or connect)."""
    ucred = ctypes.create_string_buffer(12)
    size = ctypes.c_uint32(12)
    if _libc.getsockopt(sock, SOL_SOCKET, SO_PEERCRED, ucred, ctypes.byref(size)):
        raise OSError(ctypes.get_errno(), "getsockopt SO_PEERCRED")
    return struct.unpack_from("=i", ucred.raw)[0]


def peer_abstract_name(sock: int) -> bytes | None:
    """The abstract name a connected unix socket's peer is bound to (None if not one)."""
    buf = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(128)
    if _libc.getpeername(sock, buf, ctypes.byref(size)):
        return None
    raw = buf.raw[: size.value]
    return raw[3:] if len(raw) > 3 and raw[2] == 0 else None


def file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def socket_netns(sock: int) -> tuple[int, int]:
    """The network namespace the socket was made in, as (st_dev, st_ino)."""
    netns = fcntl.ioctl(sock, SIOCGSKNS)
    try:
        return file_id(os.fstat(netns))
    finally:
        os.close(netns)


def ipv4_addresses(sock: int) -> set:
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


def bound_address(sock: int):
    """The socket's bound local address (None if it has none we can read)."""
    buf = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(128)
    if _libc.getsockname(sock, buf, ctypes.byref(size)):
        return None
    family = struct.unpack_from("=H", buf.raw)[0]
    if family not in (AF_INET, AF_INET6):
        return None
    return policy.inet_address(family, buf.raw[: size.value])[0]
