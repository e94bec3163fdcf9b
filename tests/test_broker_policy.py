"""The broker's policy (runtime/security/broker/policy.py): every decision branch, without
root, a kernel or a container: a profile and the facts a rule asks, as plain objects.

The broker performing these decisions on real sockets is tested in
tests/test_security_broker.py and integration/security/test_broker_decisions.py.
"""

import dataclasses
import errno
import ipaddress
import struct

import pytest

from runtime.security.broker import policy
from runtime.security.broker.policy import (
    AF_INET,
    AF_INET6,
    AF_NETLINK,
    AF_UNIX,
    AF_UNSPEC,
    ALLOW,
    AUDIT_KIND,
    FAIL_KIND,
    IPPROTO_TCP,
    IPPROTO_UDP,
    REFUSE_KIND,
    SOCK_DGRAM,
)
from runtime.security.broker.verdict import Denied
from runtime.security.cluster import ClusterNetwork
from runtime.security.profiles import load_profile

SOCK_STREAM = 1
IPPROTO_SCTP = 132


class Facts:
    """The facts a rule may ask; one it was not given fails the test (asked too early)."""

    def __init__(self, **given):
        self.given = given
        self.asked = []

    def __getattr__(self, name):
        if name not in self.given:
            raise AssertionError(f"the policy asked {name} it did not need")

        def answer(*args):
            self.asked.append(name)
            value = self.given[name]
            return value(*args) if callable(value) else value

        return answer


def ip(text):
    return ipaddress.ip_address(text)


def web(**changes):
    return dataclasses.replace(load_profile("web-server"), **changes)


def inet4(address: str, port: int) -> bytes:
    return struct.pack("=H", AF_INET) + struct.pack("!H", port) + ip(address).packed + bytes(8)


def inet6(address: str, port: int) -> bytes:
    return (
        struct.pack("=HHI", AF_INET6, 0, 0)[:2]
        + struct.pack("!HI", port, 0)
        + (ip(address).packed + bytes(4))
    )


# --- families ---


def test_af_unspec_connect_is_a_disconnect_and_allowed():
    assert policy.address_family(AF_UNSPEC, "connect", Facts()) == (AF_UNSPEC, ALLOW)


def test_af_unspec_send_is_decided_as_the_sockets_inet_family():
    assert policy.address_family(AF_UNSPEC, "send", Facts(socket_family=AF_INET6)) == (
        AF_INET6,
        ALLOW,
    )


def test_af_unspec_send_on_a_non_inet_socket_is_refused():
    family, decision = policy.address_family(AF_UNSPEC, "send", Facts(socket_family=AF_UNIX))
    assert decision == policy.refuse("AF_UNSPEC destination on a non-inet socket")


def test_af_unspec_bind_is_an_unknown_family():
    assert policy.address_family(AF_UNSPEC, "bind", Facts())[1] == policy.refuse(
        "address family 0 not allowed"
    )


@pytest.mark.parametrize("family", [AF_INET, AF_INET6, AF_UNIX, AF_NETLINK])
def test_known_families_go_on_to_their_own_rules(family):
    for rules in ("connect", "send", "bind"):
        assert policy.address_family(family, rules, Facts()) == (family, ALLOW)


def test_other_families_are_refused():
    decision = policy.address_family(17, "connect", Facts())[1]  # AF_PACKET
    assert decision.kind == REFUSE_KIND and decision.reason == "address family 17 not allowed"
    assert decision.errno == errno.EPERM


# --- addresses as the kernel reads them ---


def test_short_addresses_are_einval():
    for short in (b"", b"\x02"):
        with pytest.raises(Denied) as refused:
            policy.family_of(short)
        assert refused.value.errno == errno.EINVAL
    with pytest.raises(Denied, match="short address"):
        policy.inet_address(AF_INET, inet4("192.0.2.1", 80)[:6])
    with pytest.raises(Denied, match="short address"):
        policy.inet_address(AF_INET6, inet6("2001:db8::1", 80)[:20])


def test_inet_addresses_and_ipv4_mapped_ones_decided_as_ipv4():
    assert policy.inet_address(AF_INET, inet4("192.0.2.1", 8080)) == (ip("192.0.2.1"), 8080)
    assert policy.inet_address(AF_INET6, inet6("2001:db8::1", 443)) == (ip("2001:db8::1"), 443)
    assert policy.inet_address(AF_INET6, inet6("::ffff:127.0.0.1", 53)) == (ip("127.0.0.1"), 53)


def test_unspecified_destinations():
    assert policy.unspecified(inet4("0.0.0.0", 53))
    assert policy.unspecified(struct.pack("=H", AF_UNSPEC) + inet4("0.0.0.0", 53)[2:])
    assert policy.unspecified(inet6("::", 53))
    assert not policy.unspecified(inet4("192.0.2.1", 53))
    assert not policy.unspecified(struct.pack("=H", AF_UNIX) + b"/x\0")
    assert not policy.unspecified(inet4("0.0.0.0", 53)[:6])  # too short to read: not one


def test_an_unspecified_destination_is_every_address_it_may_mean():
    assert policy.destinations(ip("192.0.2.1"), None) == [ip("192.0.2.1")]
    assert policy.destinations(ip("0.0.0.0"), None) == [ip("127.0.0.1")]
    assert policy.destinations(ip("::"), None) == [ip("127.0.0.1"), ip("::1")]
    assert policy.destinations(ip("0.0.0.0"), ip("10.1.2.3")) == [ip("127.0.0.1"), ip("10.1.2.3")]
    assert policy.destinations(ip("0.0.0.0"), ip("0.0.0.0")) == [ip("127.0.0.1")]


def test_ipv6_addresses_of_if_inet6():
    text = (
        b"00000000000000000000000000000001 01 80 10 80       lo\n"
        b"20010db8000000000000000000000001 02 40 00 80     eth0\n"
        b"short line\n\n"
    )
    assert policy.ipv6_addresses(text) == {ip("::1"), ip("2001:db8::1")}


def test_describe_address():
    assert policy.describe_address(inet4("192.0.2.1", 80)) == {
        "family": "AF_INET",
        "address": "192.0.2.1:80",
    }
    assert policy.describe_address(struct.pack("=H", AF_UNIX) + b"\0name") == {
        "family": "AF_UNIX",
        "address": "@name",
    }
    assert policy.describe_address(struct.pack("=H", 17)) == {"family": "17"}
    assert policy.describe_address(b"") == {}


# --- destinations ---


def test_loopback_of_the_callers_own_namespace_is_allowed():
    assert policy.destination(web(), ip("127.0.0.1"), 9999, Facts(own_namespace=True)) == ALLOW


def test_loopback_of_another_namespace_is_decided_by_the_rules():
    facts = Facts(own_namespace=False)
    decision = policy.destination(web(), ip("127.0.0.1"), 80, facts)
    assert decision == policy.refuse("egress to 127.0.0.1 port 80 not allowed by profile")


def test_the_pods_own_addresses_are_allowed_only_in_a_joined_namespace():
    pod = ip("10.88.0.5")
    facts = Facts(own_namespace=True, own_addresses={pod})
    assert policy.destination(web(network_joined=True), pod, 9999, facts) == ALLOW
    # Not joined: the container's namespace holds nobody else; the rules decide.
    refused = policy.destination(web(), pod, 9999, Facts(own_namespace=True))
    assert refused.kind == REFUSE_KIND


def test_cluster_dns_over_tcp_or_udp_only():
    # On a port the profile's egress rules do not open (5353).
    cluster = ClusterNetwork.parse(service_cidrs=["10.96.0.0/12"], dns=["10.96.0.10:5353"])
    profile = web(cluster_network=cluster)
    dns = ip("10.96.0.10")
    for protocol in (IPPROTO_TCP, IPPROTO_UDP):
        facts = Facts(own_namespace=False, socket_protocol=protocol)
        assert policy.destination(profile, dns, 5353, facts) == ALLOW
    sctp = Facts(own_namespace=False, socket_protocol=IPPROTO_SCTP)
    assert policy.destination(profile, dns, 5353, sctp).kind == REFUSE_KIND
    # Another port of the DNS service is the service CIDR's: the egress rules decide.
    assert policy.destination(profile, dns, 80, Facts(own_namespace=False)) == ALLOW
    assert policy.destination(profile, dns, 22, Facts(own_namespace=False)).kind == REFUSE_KIND


def test_network_none_reaches_nothing_else():
    profile = load_profile("ci-runner")
    decision = policy.destination(profile, ip("192.0.2.1"), 80, Facts(own_namespace=True))
    assert decision == policy.refuse(
        "192.0.2.1 is not loopback or an address of the container's network namespace "
        "(profile ci-runner has no network)"
    )


def test_egress_rules_allow_their_ports_and_refuse_egress_deny():
    facts = Facts(own_namespace=False)
    assert policy.destination(web(), ip("192.0.2.1"), 443, facts) == ALLOW
    assert policy.destination(web(), ip("2001:db8::1"), 443, facts) == ALLOW
    assert policy.destination(web(), ip("192.0.2.1"), 22, facts) == policy.refuse(
        "egress to 192.0.2.1 port 22 not allowed by profile"
    )
    assert policy.destination(web(), ip("10.0.0.1"), 443, facts).kind == REFUSE_KIND


def test_the_operators_cluster_cidrs_are_taken_out_of_egress_deny_ports_kept():
    profile = web(cluster_network=ClusterNetwork.parse(pod_cidrs=["10.244.0.0/16"]))
    facts = Facts(own_namespace=False)
    assert policy.destination(profile, ip("10.244.1.1"), 443, facts) == ALLOW
    assert policy.destination(profile, ip("10.244.1.1"), 22, facts).kind == REFUSE_KIND
    assert policy.destination(profile, ip("10.1.1.1"), 443, facts).kind == REFUSE_KIND


def test_egress_hosts_are_asked_last():
    profile = web(egress_hosts=(("svc.test", 8081),))
    resolved = Facts(own_namespace=False, egress_hosts_allow=lambda ip, port: port == 8081)
    assert policy.destination(profile, ip("192.0.2.7"), 8081, resolved) == ALLOW
    assert resolved.asked[-1] == "egress_hosts_allow"
    assert policy.destination(profile, ip("192.0.2.7"), 8082, resolved).kind == REFUSE_KIND
    # Without egress_hosts nothing is resolved (Facts fails if asked).
    assert policy.destination(web(), ip("192.0.2.7"), 8081, Facts(own_namespace=False)).kind == (
        REFUSE_KIND
    )


def test_egress_host_names_never_allow_loopback_link_local_multicast_or_unspecified():
    hosts = (("a.test", 80), ("b.test", 443), ("c.test", 80))
    assert policy.egress_host_names(hosts, ip("192.0.2.1"), 80) == ["a.test", "c.test"]
    assert policy.egress_host_names(hosts, ip("192.0.2.1"), 8080) == []
    for never in ("127.0.0.1", "169.254.169.254", "224.0.0.1", "0.0.0.0", "::1", "fe80::1"):
        assert policy.egress_host_names(hosts, ip(never), 80) == []


# --- audit mode ---


def test_audit_mode_lets_a_refusal_through_recorded_in_the_callers_own_namespace():
    decision = policy.destination(web(mode="audit"), ip("192.0.2.1"), 22, Facts(own_namespace=True))
    assert decision.kind == AUDIT_KIND
    assert decision.reason == "egress to 192.0.2.1 port 22 not allowed by profile"
    assert decision.decoded == {"family": "AF_INET", "address": "192.0.2.1:22"}
    v6 = policy.destination(web(mode="audit"), ip("2001:db8::1"), 22, Facts(own_namespace=True))
    assert v6.decoded == {"family": "AF_INET6", "address": "[2001:db8::1]:22"}


def test_audit_mode_still_refuses_another_namespaces_socket_and_egress_deny():
    audit = web(mode="audit")
    assert policy.destination(audit, ip("192.0.2.1"), 22, Facts(own_namespace=False)) == (
        policy.refuse("egress to 192.0.2.1 port 22 not allowed by profile")
    )
    metadata = policy.destination(audit, ip("169.254.169.254"), 80, Facts(own_namespace=True))
    assert metadata.kind == REFUSE_KIND


# --- binds ---


def test_bind_rules():
    own = Facts(own_namespace=True)
    assert policy.bind_address(web(), ip("0.0.0.0"), 8080, own) == ALLOW
    assert policy.bind_address(web(), ip("0.0.0.0"), 0, Facts()) == ALLOW  # any free port
    assert policy.bind_address(web(), ip("127.0.0.1"), 7777, own) == ALLOW  # own loopback
    assert policy.bind_address(web(), ip("0.0.0.0"), 7777, own) == policy.refuse(
        "bind 0.0.0.0 port 7777 not allowed by profile"
    )
    hosts_loopback = Facts(own_namespace=False)
    assert policy.bind_address(web(), ip("127.0.0.1"), 7777, hosts_loopback).kind == REFUSE_KIND
    audited = policy.bind_address(web(mode="audit"), ip("192.0.2.1"), 7777, own)
    assert audited.kind == AUDIT_KIND and audited.reason.startswith("bind 192.0.2.1 port 7777")
    # A bind's address is no destination: egress_deny (web-server's lists 0.0.0.0/8)
    # does not keep it refused in audit mode, as it does a connect.
    wildcard = policy.bind_address(web(mode="audit"), ip("0.0.0.0"), 7777, own)
    assert wildcard.kind == AUDIT_KIND
    connect = policy.destination(web(mode="audit"), ip("0.0.0.0"), 7777, own)
    assert connect.kind == REFUSE_KIND


def test_a_privileged_port_needs_the_callers_capability():
    without = Facts(caller_has_capability=lambda number: False)
    with_it = Facts(caller_has_capability=lambda number: number == policy.CAP_NET_BIND_SERVICE)
    assert policy.privileged_port(80, without) == policy.refuse(
        "bind port 80 needs CAP_NET_BIND_SERVICE", errno.EACCES
    )
    assert policy.privileged_port(80, with_it) == ALLOW
    assert policy.privileged_port(0, Facts()) == ALLOW
    assert policy.privileged_port(1024, Facts()) == ALLOW


# --- abstract unix names ---


def test_abstract_scope_decides_connects_and_sends_to_a_name():
    assert policy.abstract_name_is_scoped(web(), "connect", b"\0name")
    assert policy.abstract_name_is_scoped(web(), "send", b"\0name")
    assert not policy.abstract_name_is_scoped(web(), "bind", b"\0name")
    assert not policy.abstract_name_is_scoped(web(), "connect", b"")  # autobind
    assert not policy.abstract_name_is_scoped(web(landlock_scope=False), "connect", b"\0n")


def test_an_abstract_name_with_a_newline_is_refused():
    assert policy.abstract_name(b"a\nb", "connect", Facts()) == policy.refuse(
        "abstract unix socket name with a newline"
    )


def test_an_abstract_name_of_another_network_namespace_is_refused():
    facts = Facts(socket_in_callers_namespace=False)
    assert policy.abstract_name(b"n", "connect", facts) == policy.refuse(
        "abstract unix socket of another network namespace"
    )


def test_an_unbound_abstract_name_fails_as_the_kernel_would():
    facts = Facts(socket_in_callers_namespace=True, sockets_bound_to=set())
    refused = policy.abstract_name(b"n", "connect", facts)
    assert refused.kind == FAIL_KIND and refused.errno == errno.ECONNREFUSED
    dgram = Facts(socket_in_callers_namespace=True, sockets_bound_to=set(), socket_type=SOCK_DGRAM)
    assert policy.abstract_name(b"n", "send", dgram).errno == errno.ECONNREFUSED
    # A stream socket's send does not look the name up.
    stream = Facts(
        socket_in_callers_namespace=True, sockets_bound_to=set(), socket_type=SOCK_STREAM
    )
    assert policy.abstract_name(b"n", "send", stream) == ALLOW


def test_an_abstract_name_is_the_containers_only_if_it_holds_every_socket_bound_to_it():
    ours = Facts(
        socket_in_callers_namespace=True, sockets_bound_to={11}, container_sockets={11, 12}
    )
    assert policy.abstract_name(b"n", "connect", ours) == ALLOW
    theirs = Facts(
        socket_in_callers_namespace=True, sockets_bound_to={11, 13}, container_sockets={11}
    )
    assert policy.abstract_name(b"n", "send", theirs) == policy.refuse(
        "abstract unix socket @n is not the container's"
    )


def test_a_datagram_reaches_only_a_receiver_the_broker_holds():
    # {inode: (type, listening)} showing the name after the broker took hold of `held`.
    dgram = (SOCK_DGRAM, False)
    assert policy.receiver_held({11: dgram}, {11}, SOCK_DGRAM)
    # Let go and taken by another socket since the look: not the one held.
    assert not policy.receiver_held({12: dgram}, {11}, SOCK_DGRAM)
    # Let go and nobody took it (yet): nothing held keeps the name.
    assert not policy.receiver_held({}, {11}, SOCK_DGRAM)
    assert not policy.receiver_held({}, set(), SOCK_DGRAM)
    # Stream sockets showing the same name are not looked up by a datagram.
    named = {11: dgram, 20: (SOCK_STREAM, True), 21: (SOCK_STREAM, False)}
    assert policy.receivers(named, SOCK_DGRAM) == {11}
    assert policy.receiver_held(named, {11}, SOCK_DGRAM)
    assert not policy.receiver_held({20: (SOCK_STREAM, True)}, {20}, SOCK_DGRAM)


def test_a_connect_reaches_only_a_listener_the_broker_holds():
    listener, accepted = (SOCK_STREAM, True), (SOCK_STREAM, False)
    named = {20: listener, 21: accepted, 22: accepted}
    # Accepted connections show their listener's name; only the listener takes a connect.
    assert policy.receivers(named, SOCK_STREAM) == {20}
    assert policy.receiver_held(named, {20}, SOCK_STREAM)
    assert not policy.receiver_held(named, {21, 22}, SOCK_STREAM)
    # The listener let go of the name: accepted ones alone lead nowhere (ECONNREFUSED).
    assert not policy.receiver_held({21: accepted}, {21}, SOCK_STREAM)
    # Another type's listener of the same name is not looked up.
    assert not policy.receiver_held({30: (5, True)}, {30}, SOCK_STREAM)
    assert policy.receiver_held({30: (5, True)}, {30}, 5)  # SOCK_SEQPACKET
