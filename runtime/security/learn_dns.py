"""Profile learning: which name an address the workload reached came from (egress_hosts).

While a learning run lasts, a packet socket in the container's network namespace (made
by the learn command, outside the container) sees the DNS traffic of that namespace:
the container's UDP questions to port 53 and their answers. An answer counts only when
it matches a question seen going out (same ID, same name, from the address and port the
question went to): the A and AAAA addresses it carries are then known as that question's
name (CNAMEs followed by the server count for the name asked, as the broker resolves an
egress_hosts name). learn.plan then writes an endpoint reached at such an address as
`egress_hosts = ["name:port"]` instead of an address rule.

Only a container in a network namespace of its own or its pod's (never the host's); UDP
only (an answer over TCP is not read: its endpoint stays an address rule).
"""

import ipaddress
import select
import socket
import struct
import threading

from runtime.security import dns

ETH_P_ALL = 0x0003
MAX_NAMES = 4096
MAX_PENDING = 4096


def _udp(packet: bytes):
    """(source ip, source port, destination ip, destination port, payload) of an IPv4 or
    IPv6 UDP packet (no extension headers), else None."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20 and packet[9] == 17:
        header = (packet[0] & 0x0F) * 4
        source, destination = packet[12:16], packet[16:20]
    elif version == 6 and len(packet) >= 40 and packet[6] == 17:
        header = 40
        source, destination = packet[8:24], packet[24:40]
    else:
        return None
    if len(packet) < header + 8:
        return None
    sport, dport = struct.unpack_from("!HH", packet, header)
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    return str(src), sport, str(dst), dport, packet[header + 8 :]


def _question(message: bytes):
    """(id, is a reply, name, offset after the one question) of a DNS message, else None."""
    if len(message) < 12:
        return None
    query_id, flags, questions = struct.unpack_from("!HHH", message)
    if questions != 1:
        return None
    try:
        name, offset = dns._read_name(message, 12)
    except (dns.DnsError, IndexError, UnicodeDecodeError):
        return None
    return query_id, bool(flags & dns.FLAG_QR), name.lower().rstrip("."), offset + 4


def answers(message: bytes, offset: int) -> list[str]:
    """The A and AAAA addresses in a reply's answer section."""
    count = struct.unpack_from("!H", message, 6)[0]
    found = []
    try:
        for _ in range(count):
            _, offset = dns._read_name(message, offset)
            kind, _, _, length = struct.unpack_from("!HHIH", message, offset)
            offset += 10
            data = message[offset : offset + length]
            offset += length
            if (kind, length) in ((dns.TYPE_A, 4), (dns.TYPE_AAAA, 16)):
                found.append(str(ipaddress.ip_address(data)))
    except (dns.DnsError, IndexError, struct.error, UnicodeDecodeError):
        pass  # a cut-short answer: what was read so far
    return found


class DnsNames:
    """Names of addresses, from one network namespace's DNS traffic (see the module)."""

    def __init__(self):
        self.names: dict[str, str] = {}  # address -> the question's name
        self._asked: dict[tuple, str] = {}  # (server ip, server port, id, name) -> name
        # Where the questions went: reached because of resolv.conf, not of an answer.
        self.servers: set[tuple[str, int]] = set()

    def packet(self, data: bytes) -> None:
        udp = _udp(data)
        if udp is None:
            return
        src, sport, dst, dport, payload = udp
        if dport != 53 and sport != 53:
            return
        question = _question(payload)
        if question is None:
            return
        query_id, reply, name, offset = question
        if not reply and dport == 53:
            if len(self._asked) < MAX_PENDING:
                self._asked[(dst, dport, query_id, name)] = name
                self.servers.add((dst, dport))
            return
        if reply and sport == 53 and (src, sport, query_id, name) in self._asked:
            if not dns.valid_name(name):
                return
            for address in answers(payload, offset):
                if len(self.names) < MAX_NAMES:
                    self.names.setdefault(address, name)


class NamespaceWatch:
    """A packet socket in the network namespace at NETNS_PATH, read on a thread into a
    DnsNames until `stop()`."""

    def __init__(self, netns_path: str):
        from runtime import linux

        made: list = []

        def make() -> None:
            # setns moves only this short-lived thread; the socket keeps the namespace.
            try:
                with open(netns_path, "rb") as ns:
                    linux.setns(ns.fileno(), linux.NAMESPACE_FLAGS["network"])
                made.append(
                    socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
                )
            except OSError as error:
                made.append(error)

        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if isinstance(made[0], OSError):
            raise made[0]
        self.sock = made[0]
        self.sock.setblocking(False)
        self.dns = DnsNames()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="learn-dns", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            while ready:
                try:
                    data = self.sock.recv(65535)
                except BlockingIOError:
                    break
                except OSError:
                    return
                # Seen leaving and arriving (twice on lo): DnsNames keeps each once.
                self.dns.packet(data)

    def stop(self) -> DnsNames:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return self.dns
