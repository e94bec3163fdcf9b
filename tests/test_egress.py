"""Issue 11 item 2: the operator's cluster network and name-based egress, below the
container: the DNS client against a real UDP server on loopback (forged replies
ignored, TTLs honoured), the cluster settings' checks, the profile key."""

import ipaddress
import socket
import struct
import time
from types import SimpleNamespace

import pytest

from runtime.errors import InvalidArgument
from runtime.security import dns
from runtime.security.broker.egress_hosts import EgressHosts
from runtime.security.cluster import ClusterNetwork
from runtime.security.profiles import _build
from shim import config as shim_config
from tests.fake_dns import FakeDns, reply
from tests.privileges import opens_a_sockets_netns
from tests.served_socket import ServedSocket


@pytest.fixture
def fake_dns():
    server = FakeDns()
    yield server
    server.close()


def _hosts(server, hosts=(("svc.test", 8080),)):
    profile = SimpleNamespace(egress_hosts=hosts, egress_nameservers=(server.address,))
    return EgressHosts(profile)


@opens_a_sockets_netns
def test_a_name_allows_exactly_its_addresses_on_its_port(fake_dns):
    fake_dns.names["svc.test"] = [("10.211.0.250", 60)]
    hosts = _hosts(fake_dns)
    with socket.socket() as sock:
        deadline = time.monotonic() + 5
        assert hosts.allows(ipaddress.ip_address("10.211.0.250"), 8080, sock.fileno(), deadline)
        assert not hosts.allows(ipaddress.ip_address("10.211.0.251"), 8080, sock.fileno(), deadline)
        assert not hosts.allows(ipaddress.ip_address("10.211.0.250"), 443, sock.fileno(), deadline)
    assert sum(fake_dns.queries.values()) == 2  # A and AAAA once: the answer is cached for its TTL


@opens_a_sockets_netns
def test_an_expired_answer_is_asked_again_and_followed(fake_dns):
    fake_dns.names["svc.test"] = [("10.211.0.250", 1)]
    hosts = _hosts(fake_dns)
    old, new = ipaddress.ip_address("10.211.0.250"), ipaddress.ip_address("10.211.0.251")
    with socket.socket() as sock:
        assert hosts.allows(old, 8080, sock.fileno(), time.monotonic() + 5)
        fake_dns.names["svc.test"] = [("10.211.0.251", 1)]
        assert hosts.allows(old, 8080, sock.fileno(), time.monotonic() + 5)  # still cached
        time.sleep(1.1)
        assert hosts.allows(new, 8080, sock.fileno(), time.monotonic() + 5)
        assert not hosts.allows(old, 8080, sock.fileno(), time.monotonic() + 5)


@opens_a_sockets_netns
def test_forged_replies_are_ignored(fake_dns):
    fake_dns.names["svc.test"] = [("10.211.0.250", 60)]
    fake_dns.forge_first = True
    hosts = _hosts(fake_dns)
    with socket.socket() as sock:
        deadline = time.monotonic() + 5
        assert not hosts.allows(ipaddress.ip_address("10.66.66.66"), 8080, sock.fileno(), deadline)
        assert hosts.allows(ipaddress.ip_address("10.211.0.250"), 8080, sock.fileno(), deadline)


def test_a_reply_from_another_port_never_reaches_the_query():
    # The broker's socket is connected to the server: a datagram from anywhere else is
    # dropped by the kernel, so a guessed ID from another sender counts for nothing.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    address = silent.getsockname()
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def forge(sock):
        query, peer = sock.recvfrom(512)
        if query:
            forger.sendto(reply(query, [("10.66.66.66", 60)]), peer)

    with forger, ServedSocket(silent, forge):
        with pytest.raises(dns.DnsError, match="no answer in time"):
            dns.query(socket.socket, address, "svc.test", dns.TYPE_A, time.monotonic() + 1)


def test_link_local_and_loopback_answers_are_never_allowed(fake_dns):
    fake_dns.names["meta.test"] = [("169.254.169.254", 60), ("127.0.0.1", 60)]
    hosts = _hosts(fake_dns, (("meta.test", 80),))
    with socket.socket() as sock:
        for ip in ("169.254.169.254", "127.0.0.1"):
            assert not hosts.allows(
                ipaddress.ip_address(ip), 80, sock.fileno(), time.monotonic() + 5
            )


@opens_a_sockets_netns
def test_an_unknown_name_allows_nothing(fake_dns):
    hosts = _hosts(fake_dns, (("nx.test", 80),))
    with socket.socket() as sock:
        assert not hosts.allows(
            ipaddress.ip_address("10.0.0.1"), 80, sock.fileno(), time.monotonic() + 5
        )


def test_cname_chains_are_followed_within_the_answer():
    query = dns.build_query(7, "a.test", dns.TYPE_A)
    cname = dns.encode_name("b.test")
    reply = (
        struct.pack("!HHHHHH", 7, 0x8180, 1, 2, 0, 0)
        + query[12:]
        + b"\xc0\x0c"
        + struct.pack("!HHIH", dns.TYPE_CNAME, 1, 30, len(cname))
        + cname
        + dns.encode_name("b.test")
        + struct.pack("!HHIH", dns.TYPE_A, 1, 10, 4)
        + bytes([10, 1, 2, 3])
    )
    assert dns.parse_reply(reply, 7, "a.test", dns.TYPE_A) == (
        {ipaddress.ip_address("10.1.2.3")},
        10,
    )
    assert dns.parse_reply(reply, 8, "a.test", dns.TYPE_A) is None


def test_cluster_settings_refuse_link_local_and_loopback():
    for bad in (["169.254.0.0/16"], ["10.0.0.0/1"], ["fe80::/64"], ["127.0.0.0/8"]):
        with pytest.raises(InvalidArgument, match="stay refused"):
            ClusterNetwork.parse(service_cidrs=bad)
    with pytest.raises(InvalidArgument, match="not a cluster address"):
        ClusterNetwork.parse(dns=["169.254.169.254"])
    cluster = ClusterNetwork.parse(
        ["10.96.0.0/12"], ["10.244.0.0/16"], ["10.96.0.10", "[fd00::a]:5353"]
    )
    assert cluster.is_dns(ipaddress.ip_address("10.96.0.10"), 53)
    assert not cluster.is_dns(ipaddress.ip_address("10.96.0.10"), 80)
    assert cluster.is_dns(ipaddress.ip_address("fd00::a"), 5353)
    assert cluster.contains(ipaddress.ip_address("::ffff:10.244.1.1"))
    assert not cluster.contains(ipaddress.ip_address("10.211.0.250"))
    assert ClusterNetwork.from_state(cluster.to_state()).to_state() == cluster.to_state()


def test_the_shim_config_names_the_cluster(tmp_path):
    path = tmp_path / "shim.toml"
    path.write_text('cluster_dns = ["10.96.0.10:53"]\ncluster_service_cidrs = ["10.96.0.0/12"]\n')
    cluster = shim_config.load_config(str(path)).cluster_network()
    assert cluster.is_dns(ipaddress.ip_address("10.96.0.10"), 53)
    path.write_text('cluster_pod_cidrs = ["169.254.0.0/16"]\n')
    with pytest.raises(shim_config.ConfigError, match="cluster_pod_cidrs"):
        shim_config.load_config(str(path))
    assert shim_config.ShimConfig().cluster_network() is None


def _profile(network: dict):
    return _build({"profile": {"name": "t"}, "network": network}, "t.toml")


def test_egress_hosts_in_a_profile():
    mediate = ["connect", "sendto", "sendmsg", "sendmmsg"]
    profile = _profile(
        {"mode": "namespace", "mediate": mediate, "egress_hosts": ["Pkg.Example.com:443"]}
    )
    assert profile.egress_hosts == (("pkg.example.com", 443),)
    for bad in ("pkg.example.com", "pkg.example.com:0", "-x.com:443", "a..b:443"):
        with pytest.raises(InvalidArgument, match="egress_hosts"):
            _profile({"mode": "namespace", "mediate": mediate, "egress_hosts": [bad]})
    with pytest.raises(InvalidArgument, match="egress_hosts"):
        _profile({"mode": "none", "egress_hosts": ["a.test:80"]})
    with pytest.raises(InvalidArgument, match="mediate must list"):
        _profile({"mode": "namespace", "mediate": ["bind"], "egress_hosts": ["a.test:80"]})
