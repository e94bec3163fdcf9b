"""A small DNS client for the broker's name-based egress (profile `egress_hosts`).

Standard library only: A and AAAA questions over UDP (TCP when the answer is cut
short), one server at a time. The broker asks on its own socket, never the container's:

- the query has a random 16-bit ID and goes out from a socket connected to the server,
  bound by the kernel to a random source port, so only datagrams from the server's
  address and port reach it (a connected UDP socket drops the rest);
- a reply counts only with the query's ID, the QR bit, the same one question (name,
  type, class) and RCODE 0 or NXDOMAIN; anything else is ignored and the wait goes on
  until the deadline.

What the reply says is then the server's word: which server is asked is the runtime's
decision, never the container's (docs/security.md, "Name-based egress").
"""

import ipaddress
import os
import select
import socket
import struct
import time

TYPE_A, TYPE_AAAA, TYPE_CNAME = 1, 28, 5
CLASS_IN = 1
_HEADER = struct.Struct("!HHHHHH")
FLAG_QR, FLAG_TC, FLAG_RD = 0x8000, 0x0200, 0x0100
RCODE_NXDOMAIN = 3
MAX_NAME = 253
# The longest chain of CNAMEs followed inside one answer.
MAX_CNAMES = 8


class DnsError(Exception):
    pass


def valid_name(name: str) -> bool:
    """A host name as the profile may write it: LDH labels, dots between, no trailing dot."""
    if not name or len(name) > MAX_NAME or name.endswith("."):
        return False
    for label in name.split("."):
        if not 0 < len(label) <= 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            return False
    return True


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.lower().split("."):
        out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\0"


def build_query(query_id: int, name: str, qtype: int) -> bytes:
    header = _HEADER.pack(query_id, FLAG_RD, 1, 0, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)


def _read_name(message: bytes, offset: int) -> tuple[str, int]:
    """(name, offset after it) with compression pointers followed (at most 32 jumps)."""
    labels = []
    end = None
    for _ in range(32):
        if offset >= len(message):
            raise DnsError("name runs past the message")
        length = message[offset]
        if length & 0xC0 == 0xC0:
            if offset + 2 > len(message):
                raise DnsError("short compression pointer")
            if end is None:
                end = offset + 2
            offset = struct.unpack_from("!H", message, offset)[0] & 0x3FFF
            continue
        if length & 0xC0:
            raise DnsError("unknown label type")
        offset += 1
        if length == 0:
            return ".".join(labels).lower(), end if end is not None else offset
        labels.append(message[offset : offset + length].decode("ascii", "replace"))
        offset += length
    raise DnsError("too many compression pointers")


def parse_reply(message: bytes, query_id: int, name: str, qtype: int):
    """The addresses and their smallest TTL in a reply to (QUERY_ID, NAME, QTYPE).

    None if the message is not that reply (the caller keeps waiting); DnsError if it is
    the reply but unusable. CNAMEs inside the answer are followed from NAME.
    """
    if len(message) < _HEADER.size:
        return None
    ident, flags, qdcount, ancount, _, _ = _HEADER.unpack_from(message)
    if ident != query_id or not flags & FLAG_QR or qdcount != 1:
        return None
    try:
        qname, offset = _read_name(message, _HEADER.size)
    except DnsError:
        return None
    if offset + 4 > len(message):
        return None
    if qname != name.lower() or struct.unpack_from("!HH", message, offset) != (qtype, CLASS_IN):
        return None
    offset += 4
    rcode = flags & 0xF
    if rcode == RCODE_NXDOMAIN:
        return set(), 0
    if rcode != 0:
        raise DnsError(f"server answered rcode {rcode}")
    if flags & FLAG_TC:
        raise DnsError("truncated")
    records = []
    for _ in range(ancount):
        owner, offset = _read_name(message, offset)
        if offset + 10 > len(message):
            raise DnsError("short record")
        rtype, rclass, ttl, length = struct.unpack_from("!HHIH", message, offset)
        offset += 10
        data_at = offset
        offset += length
        if offset > len(message):
            raise DnsError("short record data")
        records.append((owner, rtype, rclass, ttl, data_at, length))
    wanted = {name.lower()}
    ttls = []
    # CNAMEs first, in as many rounds as the chain is long (servers put them in order,
    # but the order is not promised).
    for _ in range(MAX_CNAMES):
        grown = False
        for owner, rtype, rclass, ttl, data_at, _length in records:
            if rtype == TYPE_CNAME and rclass == CLASS_IN and owner in wanted:
                target, _ = _read_name(message, data_at)
                if target not in wanted:
                    wanted.add(target)
                    ttls.append(ttl)
                    grown = True
        if not grown:
            break
    addresses = set()
    size = 4 if qtype == TYPE_A else 16
    for owner, rtype, rclass, ttl, data_at, length in records:
        if rtype == qtype and rclass == CLASS_IN and owner in wanted and length == size:
            addresses.add(ipaddress.ip_address(message[data_at : data_at + size]))
            ttls.append(ttl)
    return addresses, min(ttls) if addresses else 0


def _exchange_udp(sock: socket.socket, query: bytes, query_id, name, qtype, deadline: float):
    sock.send(query)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DnsError("no answer in time")
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            continue
        try:
            message = sock.recv(65535)
        except ConnectionRefusedError:
            raise DnsError("server refused (ICMP port unreachable)") from None
        result = parse_reply(message, query_id, name, qtype)
        if result is not None:
            return result


def _exchange_tcp(sock: socket.socket, query: bytes, query_id, name, qtype, deadline: float):
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(struct.pack("!H", len(query)) + query)
    data = b""
    while len(data) < 2 or len(data) < 2 + struct.unpack_from("!H", data)[0]:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(65537)
        if not chunk:
            raise DnsError("connection closed before the answer")
        data += chunk
    result = parse_reply(data[2 : 2 + struct.unpack_from("!H", data)[0]], query_id, name, qtype)
    if result is None:
        raise DnsError("the TCP answer is not the reply to the question")
    return result


def query(make_socket, server: tuple[str, int], name: str, qtype: int, deadline: float):
    """(addresses, ttl) for NAME/QTYPE from SERVER; make_socket(family, type) makes the
    broker's socket (in the namespace the answer is for)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    query_id = struct.unpack("!H", os.urandom(2))[0]
    message = build_query(query_id, name, qtype)
    with make_socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(server)
        try:
            return _exchange_udp(sock, message, query_id, name, qtype, deadline)
        except DnsError as e:
            if str(e) != "truncated":
                raise
    with make_socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect(server)
        return _exchange_tcp(sock, message, query_id, name, qtype, deadline)


# How long one server gets before the next one is asked (within the caller's deadline).
SERVER_TIMEOUT = 2.0


def resolve(make_socket, servers, name: str, deadline: float):
    """(addresses, ttl): A and AAAA of NAME from the first of SERVERS that answers both."""
    errors = []
    for server in servers:
        until = min(deadline, time.monotonic() + SERVER_TIMEOUT)
        try:
            v4, ttl4 = query(make_socket, server, name, TYPE_A, until)
            v6, ttl6 = query(make_socket, server, name, TYPE_AAAA, until)
        except (DnsError, OSError) as e:
            errors.append(f"{server[0]}:{server[1]}: {e}")
            continue
        ttls = [t for t, found in ((ttl4, v4), (ttl6, v6)) if found]
        return v4 | v6, min(ttls) if ttls else 0
    raise DnsError("; ".join(errors) or "no nameserver")


def nameservers(resolv_conf: bytes) -> list[tuple[str, int]]:
    """The `nameserver` lines of a resolv.conf, as (address, 53)."""
    found = []
    for line in resolv_conf.decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(fields[1].split("%")[0])
            except ValueError:
                continue
            found.append((str(ip), 53))
    return found
