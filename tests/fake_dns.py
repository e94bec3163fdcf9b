"""A DNS server the tests control: UDP, A and AAAA records from a dict they change.

Runs on a thread of the test process (tests/served_socket.py). Its socket is made on
this namespace's loopback (the broker's DNS client, tests/test_egress.py) or in a
network namespace the test names, since a socket keeps the namespace it was made in: a
host on the CNI harness's bridge, or a pod's own namespace (as a server a container
could start there). It reads questions with its own code, not runtime/security/dns.py's,
so that a fault there cannot hide itself.
"""

import ipaddress
import socket
import struct

from tests.served_socket import ServedSocket
from tools.netns import socket_in

TYPE_A, TYPE_AAAA = 1, 28
NXDOMAIN = 3
# Forged replies FORGE_FIRST sends: addresses the true answer never holds.
FORGED_ANSWERS = [("10.66.66.66", 300), ("fd00::66", 300)]
FORGED_NAME = "evil.test"


def _question(query: bytes) -> tuple[str, int, int]:
    """(name, qtype, offset after the question) of a query without compression."""
    labels, offset = [], 12
    while query[offset]:
        length = query[offset]
        labels.append(query[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    qtype = struct.unpack_from("!H", query, offset + 1)[0]
    return ".".join(labels).lower(), qtype, offset + 5


def _encode_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def reply(query: bytes, answers, *, rcode: int = 0, query_id=None, qname=None) -> bytes:
    """The reply to QUERY with the A or AAAA records among ANSWERS [(ip, ttl)] (those of
    the question's type); QUERY_ID or QNAME forge it."""
    _, qtype, end = _question(query)
    question = query[12:end]
    if qname is not None:
        question = _encode_name(qname) + question[-4:]
    ident = struct.unpack_from("!H", query)[0] if query_id is None else query_id
    records = []
    for ip, ttl in answers:
        ip = ipaddress.ip_address(ip)
        if (qtype, ip.version) in ((TYPE_A, 4), (TYPE_AAAA, 6)):
            fixed = struct.pack("!HHIH", qtype, 1, ttl, len(ip.packed))
            records.append(b"\xc0\x0c" + fixed + ip.packed)
    header = struct.pack("!HHHHHH", ident, 0x8580 | rcode, 1, len(records), 0, 0)
    return header + question + b"".join(records)


class FakeDns:
    """Answers NAMES[name] = [(ip, ttl), ...], NXDOMAIN for other names; counts the
    questions it got in QUERIES[(name, qtype)]. With FORGE_FIRST, two forged replies
    (another ID; another question) go out before each true one. ADDRESS: where it is."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0, netns_path: str | None = None):
        self.names: dict[str, list[tuple[str, int]]] = {}
        self.queries: dict[tuple[str, int], int] = {}
        self.forge_first = False
        if netns_path is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        else:
            sock = socket_in(netns_path, socket.SOCK_DGRAM)
        sock.bind((address, port))
        self.address = sock.getsockname()
        self.served = ServedSocket(sock, self._answer)

    def _answer(self, sock: socket.socket) -> None:
        query, peer = sock.recvfrom(512)
        if not query:
            return  # shut down by close()
        try:
            name, qtype, _ = _question(query)
        except (IndexError, struct.error):
            return  # not a question this server reads
        self.queries[(name, qtype)] = self.queries.get((name, qtype), 0) + 1
        answers = self.names.get(name)  # None: no such name; []: no records
        try:
            if self.forge_first:
                ident = struct.unpack_from("!H", query)[0] ^ 1
                sock.sendto(reply(query, FORGED_ANSWERS, query_id=ident), peer)
                sock.sendto(reply(query, FORGED_ANSWERS, qname=FORGED_NAME), peer)
            rcode = NXDOMAIN if answers is None else 0
            sock.sendto(reply(query, answers or [], rcode=rcode), peer)
        except OSError:
            pass  # the asker is gone: a test that timed out

    def close(self) -> None:
        self.served.close()
