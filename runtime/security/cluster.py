"""The operator's view of the cluster network, for the broker's egress decisions.

Set in the shim's config (cluster_service_cidrs, cluster_pod_cidrs, cluster_dns), passed
to the runtime with the container, kept in its state (an exec decides the same) and
read by the broker:

- cluster DNS (`cluster_dns`, "ip" or "ip:port", port 53 by default): reachable over TCP
  and UDP at exactly those addresses and ports, under every profile, "none" included,
  so names resolve in a pod whose profile has no network;
- service and pod CIDRs: under a profile with egress rules, these addresses are taken
  out of the profile's `egress_deny` (the private ranges), so the profile's egress
  ports reach Services and pods; the ports stay the profile's.

Loopback, link-local (cloud metadata), multicast and unspecified addresses are never
cluster addresses: a config naming one is refused.
"""

import ipaddress

from runtime.errors import InvalidArgument

DNS_PORT = 53
# Never made reachable by the operator's cluster settings.
_NEVER = tuple(
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
) + tuple(ipaddress.ip_network(n) for n in ("::/128", "::1/128", "fe80::/10", "ff00::/8"))


def _overlaps_never(network) -> bool:
    return any(network.version == n.version and network.overlaps(n) for n in _NEVER)


def _normal(ip):
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


class ClusterNetwork:
    __slots__ = ("service_cidrs", "pod_cidrs", "dns")

    def __init__(self, service_cidrs=(), pod_cidrs=(), dns=()):
        self.service_cidrs = tuple(service_cidrs)
        self.pod_cidrs = tuple(pod_cidrs)
        self.dns = tuple(dns)  # ((ip_address, port), ...)

    @classmethod
    def parse(
        cls, service_cidrs=(), pod_cidrs=(), dns=(), where: str = "cluster"
    ) -> "ClusterNetwork":
        nets = {}
        for key, values in (
            ("cluster_service_cidrs", service_cidrs),
            ("cluster_pod_cidrs", pod_cidrs),
        ):
            parsed = []
            for value in values or ():
                try:
                    network = ipaddress.ip_network(value, strict=False)
                except ValueError as e:
                    raise InvalidArgument(f"{where}: {key}: {e}") from None
                if _overlaps_never(network):
                    raise InvalidArgument(
                        f"{where}: {key}: {value} overlaps loopback, link-local, multicast or "
                        "unspecified addresses, which stay refused"
                    )
                parsed.append(network)
            nets[key] = parsed
        servers = []
        for value in dns or ():
            ip, port = parse_host_port(value, f"{where}: cluster_dns", DNS_PORT)
            if any(ip in n for n in _NEVER if n.version == ip.version):
                raise InvalidArgument(f"{where}: cluster_dns: {value} is not a cluster address")
            servers.append((ip, port))
        return cls(nets["cluster_service_cidrs"], nets["cluster_pod_cidrs"], servers)

    def __bool__(self) -> bool:
        return bool(self.service_cidrs or self.pod_cidrs or self.dns)

    def is_dns(self, ip, port: int) -> bool:
        return (_normal(ip), port) in self.dns

    def contains(self, ip) -> bool:
        ip = _normal(ip)
        return any(
            ip.version == n.version and ip in n for n in (*self.service_cidrs, *self.pod_cidrs)
        )

    def to_state(self) -> dict:
        return {
            "serviceCidrs": [str(n) for n in self.service_cidrs],
            "podCidrs": [str(n) for n in self.pod_cidrs],
            "dns": [_join(ip, port) for ip, port in self.dns],
        }

    @classmethod
    def from_state(cls, data: dict | None) -> "ClusterNetwork":
        data = data or {}
        return cls.parse(data.get("serviceCidrs"), data.get("podCidrs"), data.get("dns"), "state")


def _join(ip, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_host_port(value: str, where: str, default_port: int | None = None):
    """(ip_address, port) of "ip", "ip:port" or "[v6]:port"."""
    host, port = value, default_port
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidArgument(f"{where}: {value!r} is not an address")
        if rest:
            port = _port(rest[1:], value, where)
    elif value.count(":") == 1:
        host, rest = value.split(":")
        port = _port(rest, value, where)
    if port is None:
        raise InvalidArgument(f"{where}: {value!r} needs a port")
    try:
        return _normal(ipaddress.ip_address(host)), port
    except ValueError:
        raise InvalidArgument(f"{where}: {value!r} is not an IP address") from None


def _port(text: str, value: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidArgument(f"{where}: {value!r}: the port must be 1-65535")
    return int(text)
