"""A DNS server the tests control: UDP, A and AAAA records from a dict they change.

Runs on a thread of the test process, with its socket made in a network namespace the
test names (a socket keeps the namespace it was made in): a host on the CNI harness's
bridge, or a pod's own namespace (as a server a container could start there).
"""

import ipaddress
import socket
import struct

from tests.served_socket import ServedSocket
from tools.netns import socket_in

TYPE_A, TYPE_AAAA = 1, 28


def _question(query: bytes) -> tuple[str, int, int]:
    """(name, qtype, offset after the question) of a query without compression."""
    labels, offset = [], 12
    while query[offset]:
        length = query[offset]
        labels.append(query[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    qtype = struct.unpack_from("!H", query, offset + 1)[0]
    return ".".join(labels).lower(), qtype, offset + 5


class FakeDns:
    """Answers NAMES[name] = (ip, ttl) (an A or an AAAA by the address), NXDOMAIN for
    other names; counts the questions it got in QUERIES[(name, qtype)]."""

    def __init__(self, netns_path: str, address: str, port: int = 53):
        self.names: dict[str, tuple[str, int]] = {}
        self.queries: dict[tuple[str, int], int] = {}
        sock = socket_in(netns_path, socket.SOCK_DGRAM)
        sock.bind((address, port))
        self.served = ServedSocket(sock, self._answer)

    def _answer(self, sock: socket.socket) -> None:
        query, peer = sock.recvfrom(512)
        if not query:
            return  # shut down by close()
        try:
            name, qtype, end = _question(query)
        except (IndexError, struct.error):
            return  # not a question this server reads
        self.queries[(name, qtype)] = self.queries.get((name, qtype), 0) + 1
        record = self.names.get(name)
        answers, rcode = b"", 0 if record else 3
        if record:
            ip = ipaddress.ip_address(record[0])
            if (qtype, ip.version) in ((TYPE_A, 4), (TYPE_AAAA, 6)):
                answers = b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, record[1], len(ip.packed))
                answers += ip.packed
        ident = struct.unpack_from("!H", query)[0]
        header = struct.pack("!HHHHHH", ident, 0x8580 | rcode, 1, 1 if answers else 0, 0, 0)
        try:
            sock.sendto(header + query[12:end] + answers, peer)
        except OSError:
            pass  # the asker is gone: a test that timed out

    def close(self) -> None:
        self.served.close()
