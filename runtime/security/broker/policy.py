"""The broker's decisions: pure functions of the profile and a call's decoded arguments.

No syscalls here. What a rule needs to know about the caller's socket and its network
namespace (whether it is the caller's own, its addresses, the socket's family, protocol
and type, who holds an abstract name, what egress_hosts' names resolve to, the caller's
capabilities) comes in as `facts`, asked only when the rule gets there (the broker's
are addresses.SocketFacts; tests pass a plain object). Each decision is a Decision:
allow, refuse (a denial record), fail (the kernel's own answer, no record) or audit
(refused by the profile, let through in audit mode and recorded).
"""

import errno
import ipaddress
import struct
from dataclasses import dataclass, field

from runtime.security.broker.verdict import Denied

AF_UNSPEC, AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 0, 1, 2, 10, 16
IPPROTO_TCP, IPPROTO_UDP = 6, 17
SOCK_DGRAM = 2
CAP_NET_BIND_SERVICE = 10
# Below this port a bind needs CAP_NET_BIND_SERVICE (the kernel default of
# net.ipv4.ip_unprivileged_port_start; zviz does not change it in containers).
UNPRIVILEGED_PORT_START = 1024

ALLOW_KIND, REFUSE_KIND, FAIL_KIND, AUDIT_KIND = "allow", "refuse", "fail", "audit"


@dataclass(frozen=True)
class Decision:
    kind: str
    reason: str = ""
    errno: int = 0
    decoded: dict = field(default_factory=dict)  # an audited address, as records show it


ALLOW = Decision(ALLOW_KIND)


def refuse(reason: str, err: int = errno.EPERM) -> Decision:
    return Decision(REFUSE_KIND, reason, err)


def fail(reason: str, err: int) -> Decision:
    """The kernel's own answer at this instant (no denial record)."""
    return Decision(FAIL_KIND, reason, err)


# --- addresses as the kernel reads them ---


def family_of(addr: bytes) -> int:
    if len(addr) < 2:
        raise Denied("short address", errno.EINVAL)
    return struct.unpack_from("=H", addr)[0]


def normal_ip(ip):
    """An IPv4-mapped IPv6 address is the IPv4 address it carries: the kernel sends
    there over IPv4 (udpv6_sendmsg, tcp_v6_connect), so the IPv4 rules decide."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def inet_address(family: int, addr: bytes):
    """(ip, port) of a sockaddr_in/sockaddr_in6 as the kernel reads it."""
    if family == AF_INET and len(addr) >= 8:
        ip = ipaddress.IPv4Address(addr[4:8])
    elif family == AF_INET6 and len(addr) >= 24:
        ip = normal_ip(ipaddress.IPv6Address(addr[8:24]))
    else:
        raise Denied("short address", errno.EINVAL)
    return ip, struct.unpack_from("!H", addr, 2)[0]


def unspecified(addr: bytes) -> bool:
    family = struct.unpack_from("=H", addr)[0]
    if family not in (AF_UNSPEC, AF_INET, AF_INET6):
        return False
    try:
        return inet_address(AF_INET if family == AF_UNSPEC else family, addr)[0].is_unspecified
    except Denied:
        return False


def destinations(ip, bound) -> list:
    """Where the kernel sends to `ip`: an unspecified address means this host.

    0.0.0.0: the socket's bound address (`bound`, None if it has none), else 127.0.0.1
    (__ip_route_output_key); ::  : ::1, or ::ffff:127.0.0.1 on a socket bound to an
    IPv4-mapped address (tcp_v6_connect, ip6_datagram_connect, udpv6_sendmsg). Every
    candidate must be allowed: the socket may be bound by another thread before the
    call is performed.
    """
    if not ip.is_unspecified:
        return [ip]
    candidates = [ipaddress.IPv4Address("127.0.0.1")]
    if ip.version == 6:
        candidates.append(ipaddress.IPv6Address("::1"))
    if bound is not None and not bound.is_unspecified:
        candidates.append(bound)
    return candidates


def ipv6_addresses(if_inet6: bytes) -> set:
    """/proc/<pid>/net/if_inet6: one address in 32 hex digits at the start of each line."""
    found = set()
    for line in if_inet6.split(b"\n"):
        fields = line.split()
        if fields and len(fields[0]) == 32:
            found.add(normal_ip(ipaddress.IPv6Address(bytes.fromhex(fields[0].decode()))))
    return found


_FAMILY_NAMES = {
    AF_UNSPEC: "AF_UNSPEC",
    AF_UNIX: "AF_UNIX",
    AF_INET: "AF_INET",
    AF_INET6: "AF_INET6",
    AF_NETLINK: "AF_NETLINK",
}


def describe_address(addr: bytes) -> dict:
    """A sockaddr as a denial record shows it: family, and address:port or path."""
    if len(addr) < 2:
        return {}
    family = struct.unpack_from("=H", addr)[0]
    described = {"family": _FAMILY_NAMES.get(family, str(family))}
    try:
        if family in (AF_INET, AF_INET6):
            ip, port = inet_address(family, addr)
            described["address"] = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        elif family == AF_UNIX:
            path = addr[2:].split(b"\0", 1)[0] if addr[2:3] != b"\0" else b"@" + addr[3:]
            described["address"] = path.decode(errors="replace")
    except (ValueError, struct.error):
        pass
    return described


# --- the rules ---


def address_family(family: int, rules: str, facts) -> tuple[int, Decision]:
    """(the family the kernel reads the address as, the decision on the family).

    rules: "connect", "send" or "bind". An allowed inet, unix or netlink address is
    decided further by its own rules; AF_UNSPEC on a connect is a disconnect.
    """
    if family == AF_UNSPEC and rules == "connect":
        return family, ALLOW  # every family disconnects (inet_dgram_connect, unix, netlink)
    if family == AF_UNSPEC and rules == "send":
        # udp_sendmsg and raw_sendmsg read an AF_UNSPEC address as AF_INET
        # (rawv6_sendmsg as AF_INET6): decided as the socket's own family.
        family = facts.socket_family()
        if family not in (AF_INET, AF_INET6):
            return family, refuse("AF_UNSPEC destination on a non-inet socket")
    if family in (AF_INET, AF_INET6, AF_UNIX):
        return family, ALLOW
    if family == AF_NETLINK:
        # Netlink sockets exist only for the protocols the profile grants (seccomp);
        # what a message may change (CAP_NET_ADMIN over the namespace) the kernel
        # decides, against the caller's credentials (the broker takes them on).
        return family, ALLOW
    return family, refuse(f"address family {family} not allowed")


def destination(profile, ip, port: int, facts) -> Decision:
    """Loopback and the pod's own addresses first (joined namespaces only), then the
    operator's cluster DNS, then the profile: mode "none" reaches nothing else,
    "namespace" what its egress rules allow (cluster_egress_allows)."""
    if ip.is_loopback and facts.own_namespace():
        return ALLOW  # the container's own loopback: egress rules govern what leaves
    if profile.network_joined and ip in facts.own_addresses():
        return ALLOW
    if is_cluster_dns(profile, ip, port, facts):
        return ALLOW
    if profile.network == "none":
        return refuse_unless_audited(
            profile,
            f"{ip} is not loopback or an address of the container's network namespace "
            f"(profile {profile.name} has no network)",
            ip,
            port,
            facts,
        )
    if not cluster_egress_allows(profile, ip, port, facts):
        return refuse_unless_audited(
            profile, f"egress to {ip} port {port} not allowed by profile", ip, port, facts
        )
    return ALLOW


def refuse_unless_audited(
    profile, reason: str, ip, port: int, facts, egress: bool = True
) -> Decision:
    """Refused, or in audit mode recorded and let through where that stays inside the
    container: its own network namespace's socket (one handed in from the host's
    reaches the host's loopback), and never a destination of egress_deny (the
    profile's "never", such as a metadata service). A bind's address is not a
    destination: egress_deny (which lists 0.0.0.0/8) does not decide it."""
    if (
        profile.mode != "audit"
        or not facts.own_namespace()
        or (egress and any(rule.matches(str(ip), port) for rule in profile.egress_deny))
    ):
        return refuse(reason)
    address = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    family = "AF_INET6" if ip.version == 6 else "AF_INET"
    return Decision(AUDIT_KIND, reason, decoded={"family": family, "address": address})


def is_cluster_dns(profile, ip, port: int, facts) -> bool:
    """The operator's cluster DNS service, over TCP or UDP only (names resolve under
    every profile; nothing else of the cluster is reached this way)."""
    cluster = profile.cluster_network
    if cluster is None or not cluster.is_dns(ip, port):
        return False
    return facts.socket_protocol() in (IPPROTO_TCP, IPPROTO_UDP)


def cluster_egress_allows(profile, ip, port: int, facts) -> bool:
    """The profile's egress rules, with the operator's service and pod CIDRs taken out
    of egress_deny (their ports are still the profile's), then egress_hosts."""
    cluster = profile.cluster_network
    if cluster is not None and cluster.contains(ip):
        if any(rule.matches(str(ip), port) for rule in profile.egress):
            return True
    elif profile.egress_allows(str(ip), port):
        return True
    return bool(profile.egress_hosts) and facts.egress_hosts_allow(ip, port)


def egress_host_names(egress_hosts, ip, port: int) -> list[str]:
    """The names of egress_hosts ("name", port) whose answers may allow `ip` on `port`.
    Loopback, link-local (cloud metadata), multicast and unspecified addresses are never
    allowed by a name, whatever the answer."""
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return []
    return [name for name, allowed in egress_hosts if allowed == port]


def bind_address(profile, ip, port: int, facts) -> Decision:
    """The profile's `bind` rules, except on the loopback of the caller's own network
    namespace (issue 14): a listener there is reached only from inside the container
    or its pod, as a connect to it is (destination). On the host's network (shared by
    the operator) the loopback is the host's: the rules hold."""
    own_loopback = ip.is_loopback and facts.own_namespace()
    if port != 0 and not own_loopback and not profile.bind_allows(str(ip), port):
        return refuse_unless_audited(
            profile, f"bind {ip} port {port} not allowed by profile", ip, port, facts, egress=False
        )
    return ALLOW


def privileged_port(port: int, facts) -> Decision:
    """The broker binds with its own (host root) privileges: the caller's capability
    decides, as the kernel would have for the caller."""
    if 0 < port < UNPRIVILEGED_PORT_START and not facts.caller_has_capability(CAP_NET_BIND_SERVICE):
        return refuse(f"bind port {port} needs CAP_NET_BIND_SERVICE", errno.EACCES)
    return ALLOW


def abstract_name_is_scoped(profile, rules: str, name: bytes) -> bool:
    """Whether Landlock's abstract unix socket scope, kept by the broker, decides this
    name: a connect or send to a name (autobind and binds create, they reach nobody)."""
    return bool(name) and rules != "bind" and profile.landlock_scope


def abstract_name(name: bytes, rules: str, facts) -> Decision:
    """Landlock's abstract unix socket scope, kept by the broker: every socket bound to
    the name must be held by a process of the container (one in the caller's pid
    namespace and cgroups), in the caller's own network namespace.

    Nobody bound is answered ECONNREFUSED, as the kernel would at this instant (the
    broker makes sure that what it then reaches is what it looked at: addresses.py).
    """
    # /proc/net/unix prints a NUL of the name as '@' and ends a line at a newline:
    # a name with a newline cannot be told apart, so it is refused.
    if b"\n" in name:
        return refuse("abstract unix socket name with a newline")
    if not facts.socket_in_callers_namespace():
        return refuse("abstract unix socket of another network namespace")
    bound = facts.sockets_bound_to(name)
    if not bound:
        # The kernel looks the name up for a connect and a datagram's send; a stream
        # socket's send ignores or refuses an address without looking.
        if rules == "connect" or facts.socket_type() == SOCK_DGRAM:
            return fail("nobody bound to the abstract name", errno.ECONNREFUSED)
        return ALLOW
    if bound - facts.container_sockets():
        return refuse(
            f"abstract unix socket @{name.decode(errors='replace')} is not the container's"
        )
    return ALLOW


def receivers(named: dict[int, tuple[int, bool]], sock_type: int) -> set[int]:
    """The sockets showing an abstract name that a connect or a datagram from a socket
    of SOCK_TYPE can reach.

    named: {inode: (socket type, listening)} of what shows the name. The kernel looks an
    abstract name up among sockets of the caller's type only (it hashes the name with
    the type). A datagram socket shows a name only while bound to it; a stream or
    seqpacket socket also shows its listener's name once accepted from it, and only a
    listening one takes a connection (the others answer ECONNREFUSED).
    """
    return {
        inode
        for inode, (kind, listening) in named.items()
        if kind == sock_type and (kind == SOCK_DGRAM or listening)
    }


def receiver_held(named: dict[int, tuple[int, bool]], held: set[int], sock_type: int) -> bool:
    """Whether the call can reach only a socket the broker holds: after the broker took
    hold of the receiving socket(s) it decided on (held), the receivers showing the
    name now (named) must all be held. A socket held stays bound to its name, so nobody
    can take the name before the call, and the kernel's lookup finds that socket. One
    not held is another socket, bound since the broker looked (the name was let go)."""
    now = receivers(named, sock_type)
    return bool(now) and now <= held
