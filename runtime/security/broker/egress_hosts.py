"""egress_hosts: the names a profile reaches, resolved by the broker (issue 11, item 2)."""

import ctypes
import errno
import fcntl
import os
import threading
import time

from runtime.security.broker import policy
from runtime.security.broker.verdict import Denied

CLONE_NEWNET = 0x40000000
SIOCGSKNS = 0x894C  # linux/sockios.h: a socket's network namespace, as a new fd

_libc = ctypes.CDLL(None, use_errno=True)


class EgressHosts:
    """The profile's egress_hosts: "name:port" reaches the addresses NAME resolves to.

    Resolved by the broker itself (dns.py), through the nameservers the runtime fixed at
    create (the operator's cluster_dns, or the pod's resolv.conf as the runtime's caller
    mounts it; Profile.egress_nameservers), from a socket the broker makes in the
    caller's socket's network namespace: the pod's DNS is reached from where the pod
    reaches it. Answers are cached per namespace and name for their TTL, then asked again.
    Which names an address may be allowed by is the policy's (policy.egress_host_names).
    """

    MAX_TTL = 86400

    def __init__(self, profile):
        self.hosts = profile.egress_hosts
        self.servers = profile.egress_nameservers
        self._cache: dict[tuple, tuple[frozenset, float]] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def allows(self, ip, port: int, sock: int, deadline: float) -> bool:
        names = policy.egress_host_names(self.hosts, ip, port)
        if not names:
            return False
        netns = fcntl.ioctl(sock, SIOCGSKNS)
        try:
            st = os.fstat(netns)
            for name in names:
                if ip in self.addresses(netns, (st.st_dev, st.st_ino, name), name, deadline):
                    return True
        finally:
            os.close(netns)
        return False

    def addresses(self, netns: int, key: tuple, name: str, deadline: float) -> frozenset:
        with self._locks_lock:
            lock = self._locks.setdefault(key, threading.Lock())
        # One query per name at a time: the others wait for its answer (or their deadline).
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Denied(f"egress_hosts: {name}: still resolving", errno.ETIMEDOUT)
        try:
            cached = self._cache.get(key)
            if cached is not None and time.monotonic() < cached[1]:
                return cached[0]
            from runtime.security import dns

            if not self.servers:
                raise Denied(f"egress_hosts: {name}: no nameserver to resolve it through")
            try:
                found, ttl = dns.resolve(
                    lambda family, kind: socket_in_netns(netns, family, kind),
                    self.servers,
                    name,
                    deadline,
                )
            except dns.DnsError as e:
                raise Denied(f"egress_hosts: cannot resolve {name}: {e}") from None
            found = frozenset(policy.normal_ip(ip) for ip in found)
            self._cache[key] = (found, time.monotonic() + min(ttl, self.MAX_TTL))
            return found
        finally:
            lock.release()


def socket_in_netns(netns: int, family: int, kind: int):
    """A new socket of the network namespace NETNS (a socket keeps the namespace it was
    made in), made by a short-lived thread that enters it: setns moves only that thread."""
    import socket

    made: list = []

    def make() -> None:
        try:
            if _libc.setns(netns, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            made.append(socket.socket(family, kind | socket.SOCK_CLOEXEC))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            made.append(error)

    thread = threading.Thread(target=make, name="dns-socket", daemon=True)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]
