"""Where a mediated call's address leads: the policy's decisions applied to the broker's
copy of the sockaddr, as the kernel will read it for the caller's socket.

`decide` returns the address the broker performs the call with (a unix path becomes
the broker's fd of the file it names in the container's root), or raises. The facts
the policy asks are looked up here (SocketFacts), once per call.
"""

import errno
import os
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
        printed = b"@" + name.replace(b"\0", b"@")
        bound = set()
        for line in self.call.proc_read("net/unix").split(b"\n")[1:]:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7] == printed:
                bound.add(int(fields[6]))
        return bound

    def container_sockets(self) -> set[int]:
        """Inodes of the sockets the container's processes hold; the processes are kept
        as the name's possible holders (abstract_name_holders)."""
        by_pid = self.container_sockets_by_pid()
        self.abstract_name_holders = frozenset(by_pid)
        return set().union(*by_pid.values())

    def container_sockets_by_pid(self) -> dict[int, set[int]]:
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
            call.apply(policy.abstract_name(path[1:], rules, facts))
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
        return True  # a datagram socket's peer carries no credentials (docs/security.md)
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
