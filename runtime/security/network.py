"""Network setup inside a fresh network namespace: loopback up, nothing else.

A plain SIOCSIFFLAGS ioctl rather than pyroute2: pyroute2 costs ~130 ms of import
on the container start path, for one flag on one interface (and `_socket` rather than
`socket`, ~1.5 ms less).
"""

import _socket
import fcntl
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        ifreq = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))
    finally:
        s.close()


def interfaces() -> list[str]:
    return [name for _, name in _socket.if_nameindex()]
