"""Where a mediated call's address leads: the policy's decisions applied to the broker's
copy of the sockaddr, as the kernel will read it for the caller's socket.

`decide` returns the address the broker performs the call with (a unix path becomes
the broker's fd of the file it names in the container's root), or raises. The facts
the policy asks are looked up here (SocketFacts), once per call.
"""

import errno
import os
import stat
import struct

from runtime import linux
from runtime.security.broker import policy, sockets
from runtime.security.broker.policy import AF_INET, AF_INET6, AF_UNIX
from runtime.security.broker.sockets import SO_DOMAIN, SO_PROTOCOL, SO_TYPE
from runtime.security.broker.verdict import Denied


class SocketFacts:
    """What the policy asks about one call's socket and its caller, each looked up when
    first asked and kept for the call."""

    def __init__(self, call, sock: int):
        self.call, self.sock = call, sock
        self._own_netns = None
        self._own_addresses = None
        # The container's processes when an abstract name was decided on: a stream
        # connect's listener is checked against them once connected (peer_is_the_containers).
        self.abstract_name_holders: frozenset[int] | None = None
        # The last look at an abstract name ({inode: (type, listening)}) and at where the
        # container's processes hold their sockets: what _hold_the_receiver takes hold of.
        self.named_seen: dict[int, tuple[int, bool]] = {}
        self.container_holdings: dict[int, dict[int, int]] = {}
        self.held_names: set[bytes] = set()  # abstract names whose receiver the call holds

    def socket_family(self) -> int:
        return sockets.socket_option(self.sock, SO_DOMAIN)

    def socket_protocol(self) -> int:
        return sockets.socket_option(self.sock, SO_PROTOCOL)

    def socket_type(self) -> int:
        return sockets.socket_option(self.sock, SO_TYPE)

    def bound_address(self):
        return sockets.bound_address(self.sock)

    def caller_has_capability(self, number: int) -> bool:
        return self.call.caller_has_capability(number)

    def own_namespace(self) -> bool:
        """Whether the socket's network namespace is the caller's own and not the host's.

        Only then does loopback reach just the container (or its pod), so the profile's
        egress rules, which govern what leaves, do not apply (Landlock's port rules still
        do). A socket handed in from another namespace (the host's, over SCM_RIGHTS)
        reaches that namespace's loopback; the host's network shared by the operator is
        never the container's own."""
        if self._own_netns is None:
            theirs = sockets.socket_netns(self.sock)
            self._own_netns = theirs == self.call.caller_netns() and theirs != sockets.file_id(
                os.stat("/proc/self/ns/net")
            )
        return self._own_netns

    def own_addresses(self):
        """Where the caller's socket reaches only its own pod: a set of addresses.

        The addresses configured in the socket's network namespace at this
        moment (an address added or removed later counts from then on), provided that
        namespace is the caller's own and not the broker's (the host's): a socket
        handed in from another namespace reaches that namespace's loopback, not the pod's.
        """
        if self._own_addresses is None:
            self._own_addresses = frozenset()
            if self.own_namespace():
                try:
                    if_inet6 = self.call.proc_read("net/if_inet6")
                except Denied:
                    if_inet6 = b""  # no IPv6 in that namespace (or the caller is gone)
                self._own_addresses = frozenset(
                    sockets.ipv4_addresses(self.sock) | policy.ipv6_addresses(if_inet6)
                )
        return self._own_addresses

    def egress_hosts_allow(self, ip, port: int) -> bool:
        hosts = self.call.broker.egress_hosts
        return hosts is not None and hosts.allows(
            ip, port, self.sock, self.call.broker.deadline(self.call.note)
        )

    def socket_in_callers_namespace(self) -> bool:
        return sockets.socket_netns(self.sock) == self.call.caller_netns()

    def sockets_bound_to(self, name: bytes) -> set[int]:
        """Inodes of the sockets bound to the abstract name in the caller's namespace."""
        return set(self.sockets_named(name))

    def sockets_named(self, name: bytes) -> dict[int, tuple[int, bool]]:
        """{inode: (socket type, listening)} of the sockets showing the abstract name in the caller's
        namespace (bound to it, or accepted from a listener bound to it)."""
        self.named_seen = sockets.unix_sockets_named(self.call.proc_read("net/unix"), name)
        return self.named_seen

    def container_sockets(self) -> set[int]:
        """Inodes of the sockets the container's processes hold; the processes are kept
        as the name's possible holders (abstract_name_holders), with where they hold
        each socket (container_holdings)."""
        by_pid = self.container_sockets_by_pid()
        self.abstract_name_holders = frozenset(by_pid)
        self.container_holdings = by_pid
        return set().union(*by_pid.values())

    def container_sockets_by_pid(self) -> dict[int, dict[int, int]]:
        return sockets.sockets_by_pid(
            self.call.proc_read("cgroup"), os.stat("ns/pid", dir_fd=self.call.proc)
        )


def facts_of(call, sock: int) -> SocketFacts:
    if call.facts is None or call.facts.sock != sock:
        call.facts = SocketFacts(call, sock)
    return call.facts


def decide(call, addr: bytes, rules: str, sock: int) -> bytes:
    """The address the call may use, or Denied. rules: "connect", "send" or "bind"."""
    try:
        return _decide(call, addr, rules, sock)
    except Denied as d:
        d.decoded = policy.describe_address(addr)
        raise


def _decide(call, addr: bytes, rules: str, sock: int) -> bytes:
    facts = facts_of(call, sock)
    family, decision = policy.address_family(policy.family_of(addr), rules, facts)
    call.apply(decision)
    if family in (AF_INET, AF_INET6):
        ip, port = policy.inet_address(family, addr)
        if rules == "bind":
            call.apply(policy.bind_address(call.profile, ip, port, facts))
            call.apply(policy.privileged_port(port, facts))
        else:
            for destination in policy.destinations(ip, facts.bound_address()):
                call.apply(policy.destination(call.profile, destination, port, facts))
    elif family == AF_UNIX:
        return _unix_address(call, addr, rules, facts)
    return addr


def _unix_address(call, addr: bytes, rules: str, facts: SocketFacts) -> bytes:
    creating = rules == "bind"
    path = addr[2:]
    if not path or path[0] == 0:
        # Abstract (or autobind): looked up in the socket's own network namespace.
        if policy.abstract_name_is_scoped(call.profile, rules, path):
            _abstract_name_is_the_containers(call, path[1:], rules, facts)
        return addr
    path = path.split(b"\0", 1)[0]
    # A path is resolved inside the container's root, never the broker's.
    if path.startswith(b"/"):
        dirfd = call.proc_dir("root")
        resolve = linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS
        path = path.lstrip(b"/") or b"."
    else:
        dirfd = call.proc_dir("cwd")
        resolve = linux.RESOLVE_BENEATH | linux.RESOLVE_NO_MAGICLINKS
    if creating:
        parent, _, base = path.rpartition(b"/")
        if not base or base in (b".", b".."):
            raise Denied("bad unix socket path", errno.EINVAL)
        target = call.openat2(dirfd, parent or b".", os.O_PATH | os.O_DIRECTORY, resolve)
        new_path = b"/proc/self/fd/%d/%s" % (target, base)
    else:
        target = call.openat2(dirfd, path, os.O_PATH, resolve)
        new_path = b"/proc/self/fd/%d" % target
    if len(new_path) >= 108:
        raise Denied("unix socket path too long", errno.ENAMETOOLONG)
    return struct.pack("=H", AF_UNIX) + new_path + b"\0"


# Rounds of deciding and holding an abstract name before the broker gives up on a name
# whose sockets keep changing (answered ECONNREFUSED, as a send to a name let go).
HOLD_ROUNDS = 3


def _abstract_name_is_the_containers(call, name: bytes, rules: str, facts: SocketFacts) -> None:
    """policy.abstract_name on this call, then the receiving socket held.

    The broker connects (or sends) from its own thread, outside the container's
    Landlock domain: the kernel's scope check would see the broker, so it keeps the
    scope itself. It looks before it performs, and the kernel looks the name up again
    when the broker performs: in between the container's socket may let go of the name
    and host root take it. So before a connect, or a datagram's send, the broker holds
    the receiving socket it decided on (_hold_the_receiver) until the call is answered:
    a socket held stays bound to its name, so nobody can take the name meanwhile and
    the kernel's lookup finds that very socket. (A datagram carries no peer credentials
    to check after it left; a stream connect is also checked once connected,
    peer_is_the_containers.)
    """
    if name in facts.held_names:
        return  # a sendmmsg's earlier message to the name: its receiver is held already
    for _ in range(HOLD_ROUNDS):
        decision = policy.abstract_name(name, rules, facts)
        call.apply(decision)
        if decision != policy.ALLOW or not facts.named_seen:
            return  # nobody bound (a stream socket's send does not look the name up)
        sock_type = facts.socket_type()
        if rules != "connect" and sock_type != sockets.SOCK_DGRAM:
            return  # a stream or seqpacket send goes to its peer, whatever the address
        if _hold_the_receiver(call, name, sock_type, facts):
            facts.held_names.add(name)
            return
    raise OSError(errno.ECONNREFUSED, "the abstract name's sockets kept changing hands")


def _hold_the_receiver(call, name: bytes, sock_type: int, facts: SocketFacts) -> bool:
    """Hold (with pidfd_getfd, from the container's process holding it) the receiving
    socket the policy saw bound to the name; then whether the name still leads only to
    what is held (policy.receiver_held). Held sockets are the call's fds, closed when
    it ends."""
    receivers = policy.receivers(facts.named_seen, sock_type)
    held = set()
    for pid, holdings in facts.container_holdings.items():
        for inode, fd in holdings.items():
            if inode in receivers and inode not in held and _hold(call, pid, fd, inode, name):
                held.add(inode)
    return policy.receiver_held(facts.sockets_named(name), held, sock_type)


def _hold(call, pid: int, fd: int, inode: int, name: bytes) -> bool:
    """Whether the broker now holds the socket INODE bound to NAME, taken from fd FD of
    PID (which may have closed or replaced it since it was seen there)."""
    try:
        pidfd = linux.pidfd_open(pid)
    except OSError:
        return False
    try:
        ours = linux.pidfd_getfd(pidfd, fd)
    except OSError:
        return False
    finally:
        os.close(pidfd)
    call.fds.append(ours)
    st = os.fstat(ours)
    return (
        stat.S_ISSOCK(st.st_mode) and st.st_ino == inode and sockets.abstract_name_of(ours) == name
    )


def peer_is_the_containers(facts: SocketFacts) -> bool:
    """After a stream connect to an abstract name: whether the listener it reached
    is the container's (the connect handler shuts the connection down if not).

    This looks after the connect as policy.abstract_name looked before it: a name can
    change hands in between. SO_PEERCRED names the process that made that very socket
    listen: it must be one of the container's processes seen then. A live process
    outside them is refused. One that has exited (it listened, then forked and left)
    cannot be told apart by its pid: then the name's holders are looked at again, which
    is refused if anything outside the container holds the name now.
    """
    sock = facts.sock
    if facts.socket_type() not in (sockets.SOCK_STREAM, sockets.SOCK_SEQPACKET):
        return True  # a datagram's receiver was held instead (_hold_the_receiver)
    pid = sockets.peer_pid(sock)
    if pid in facts.abstract_name_holders:
        return True
    if pid > 0 and os.path.exists(f"/proc/{pid}"):
        return False
    name = sockets.peer_abstract_name(sock)
    if name is None:
        return False
    sockets_by_pid = facts.container_sockets_by_pid()
    bound = facts.sockets_bound_to(name)
    return bool(bound) and not bound - set().union(*sockets_by_pid.values())
