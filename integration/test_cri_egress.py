"""Egress the way clusters need it (issue 11, item 2), through containerd's CRI plugin.

The harness is test_cri's (integration/cni_node.py: pods on 10.211.0.0/24, the service
host at SERVICE_IP:8080, dnsmasq at DNS_IP answering svc.test -> SERVICE_IP), with two
zviz RuntimeClass handlers:

    zviz          no cluster settings; the operator's profile directory holds
                  `web-egress` (web-server plus egress_hosts = ["svc.test:8080"])
    zviz-cluster  cluster_dns = DNS_IP:53 and the service host's address as the
                  cluster's service CIDR
    zviz-moving   cluster_dns = MOVING_DNS_IP:53, a DNS server the test controls
                  (tests/fake_dns.py, on a host of its own on the bridge), and
                  the profile `moving-egress` (egress_hosts = ["moving.test:8080"])

and `pod_annotations = ["io.zviz.*"]`, so a pod picks its profile with io.zviz.profile
among those the operator allows. runc is the reference where a cell makes sense for it.
"""

import asyncio
import os
import re
import shutil
import tempfile

import pytest

from integration.cni_node import (
    DNS_IP,
    GATEWAY,
    SERVICE_IP,
    SERVICE_NAME,
    SERVICE_PORT,
    SERVICE_REPLY,
)
from integration.ids import session_tag
from integration.test_cri import HTTP_GET, cri_node, handler_configs, pod, run
from tests.fake_dns import TYPE_A, FakeDns

PROFILE_ANNOTATION = "io.zviz.profile"
MOVING_NAME = "moving.test"
EGRESS_PROFILE = f"""
[profile]
name = "web-egress"
extends = "web-server"
description = "web-server whose only private destination is what svc.test resolves to"

[network]
egress_hosts = ["{SERVICE_NAME}:{SERVICE_PORT}"]
"""
MOVING_PROFILE = f"""
[profile]
name = "moving-egress"
extends = "web-server"

[network]
egress_hosts = ["{MOVING_NAME}:{SERVICE_PORT}"]
"""
METADATA_IP = "169.254.169.254"
MOVING_DNS_IP = "10.211.0.252"


@pytest.fixture(scope="module")
def cri(tmp_path_factory):
    # Profile files load only from root-owned directories nobody else can write: not /tmp.
    profiles = tempfile.mkdtemp(prefix=f"zviz-zeg-profiles-{session_tag()}-", dir="/run")
    try:
        for name, text in (("web-egress", EGRESS_PROFILE), ("moving-egress", MOVING_PROFILE)):
            with open(os.path.join(profiles, f"{name}.toml"), "w") as f:
                f.write(text)
        allowed = '["ci-runner", "web-server", "web-egress", "moving-egress"]'
        texts = {
            "zviz": f'profile_dirs = ["{profiles}"]\nallowed_annotation_profiles = {allowed}\n',
            "zviz-cluster": f'allowed_annotation_profiles = {allowed}\ncluster_dns = ["{DNS_IP}:53"]\n'
            f'cluster_service_cidrs = ["{SERVICE_IP}/32"]\n',
            "zviz-moving": f'profile_dirs = ["{profiles}"]\nallowed_annotation_profiles = {allowed}\n'
            f'cluster_dns = ["{MOVING_DNS_IP}:53"]\n',
        }
        handlers = handler_configs(tmp_path_factory, texts)
        with cri_node(
            tmp_path_factory, cri_handlers=handlers, cri_pod_annotations=("io.zviz.*",)
        ) as harness:
            host = harness.node._host("zegdns", MOVING_DNS_IP)
            harness.moving_dns = FakeDns(MOVING_DNS_IP, 53, host.path)
            try:
                yield harness
            finally:
                harness.moving_dns.close()
    finally:
        shutil.rmtree(profiles, ignore_errors=True)


def _connect(host: str, port: int) -> str:
    """A TCP connect and HTTP GET from the container, with nc's own error on failure."""
    return HTTP_GET.format(path="/", host=host, port=port) + " 2>&1; echo exit=$?"


async def _in_pod(cri, handler, tmp_path, profile, script):
    annotations = {PROFILE_ANNOTATION: profile} if profile else {}
    async with pod(cri, handler, tmp_path, annotations=annotations) as the_pod:
        container = await the_pod.start_container("app", "exec sleep 300")
        outputs = []
        for step in script:
            code, out, err = await the_pod.exec(container, step)
            outputs.append(out + err)
        return outputs


def _reached(out: str) -> bool:
    return out.rstrip().endswith("exit=0") and SERVICE_REPLY.decode() in out


def _refused_by_broker(out: str) -> bool:
    return "exit=0" not in out and "not permitted" in out


def test_web_server_reaches_the_operators_services_and_dns_but_no_other_private_address(
    cri, tmp_path
):
    outputs = run(
        _in_pod(
            cri,
            "zviz-cluster",
            tmp_path,
            "web-server",
            [
                _connect(SERVICE_IP, SERVICE_PORT),
                f"nslookup {SERVICE_NAME} 2>&1",
                _connect(DNS_IP, SERVICE_PORT),
                _connect(GATEWAY, SERVICE_PORT),
                _connect(METADATA_IP, 80),
            ],
        )
    )
    service, lookup, dns_host, gateway, metadata = outputs
    assert _reached(service), service
    assert f"Address: {SERVICE_IP}" in lookup.splitlines(), lookup
    # The DNS host outside port 53, the gateway, cloud metadata: private or link-local,
    # not named by the operator: the broker refuses them (EPERM, never sent).
    for out in (dns_host, gateway, metadata):
        assert _refused_by_broker(out), out


def test_web_server_without_the_operators_cluster_reaches_no_private_address(cri, tmp_path):
    # The same pod under the handler that names no cluster: the service host is just
    # another private address.
    (service,) = run(
        _in_pod(cri, "zviz", tmp_path, "web-server", [_connect(SERVICE_IP, SERVICE_PORT)])
    )
    assert _refused_by_broker(service), service


@pytest.mark.parametrize("handler", ["runc", "zviz"])
def test_egress_hosts_reach_what_the_name_resolves_to_and_nothing_else(cri, tmp_path, handler):
    # web-egress names svc.test:8080; the broker resolves it through the pod's DNS config
    # (the resolv.conf containerd mounts, nameserver DNS_IP) and allows that address and
    # port only. The container first points its own resolv.conf elsewhere, if it can: the
    # broker's nameserver was fixed at create, from the host's side.
    script = [
        "echo nameserver 127.0.0.1 > /etc/resolv.conf 2>&1; echo exit=$?",
        _connect(SERVICE_IP, SERVICE_PORT),
        _connect(SERVICE_IP, 80),
        _connect(DNS_IP, SERVICE_PORT),
        _connect(GATEWAY, SERVICE_PORT),
    ]
    profile = "web-egress" if handler == "zviz" else None
    dns_log = os.path.join(cri.node.workdir, "dnsmasq.log")
    seen = os.path.getsize(dns_log)
    _, service, other_port, dns_host, gateway = run(
        _in_pod(cri, handler, tmp_path, profile, script)
    )
    assert _reached(service), service
    if handler == "runc":
        # The reference: nothing listens on those, the hosts answer "refused".
        for out in (other_port, dns_host, gateway):
            assert "exit=0" not in out and "refused" in out, out
        return
    for out in (other_port, dns_host, gateway):
        assert _refused_by_broker(out), out
    # The broker's own queries reached the pod's DNS server, from the pod's network (the
    # container itself cannot reach DNS_IP under this handler: no cluster_dns).
    with open(dns_log) as f:
        f.seek(seen)
        log = f.read()
    assert re.search(rf"query\[A\] {re.escape(SERVICE_NAME)} from 10\.211\.0\.", log), log[-2000:]


def test_egress_hosts_follow_the_name_when_its_ttl_runs_out(cri, tmp_path):
    # moving.test -> the service host, TTL 3 s. One exec (one broker, one cache): two
    # connects at once (one A query: the second is answered from the cache), then, after
    # the test moved the name to an address where nothing is and the TTL ran out, a third
    # connect to the old address: asked again, refused.
    dns = cri.moving_dns
    dns.names[MOVING_NAME] = [(SERVICE_IP, 3)]
    dns.queries.clear()
    connect = _connect(SERVICE_IP, SERVICE_PORT)
    script = f"{connect}; echo ---; {connect}; echo ---; sleep 7; {connect}"

    async def scenario():
        annotations = {PROFILE_ANNOTATION: "moving-egress"}
        async with pod(cri, "zviz-moving", tmp_path, annotations=annotations) as the_pod:
            container = await the_pod.start_container("app", "exec sleep 300")

            async def move_later():
                await asyncio.sleep(4)
                dns.names[MOVING_NAME] = [("10.211.0.251", 3)]

            (_, out, err), _ = await asyncio.gather(the_pod.exec(container, script), move_later())
            return out + err

    first, second, third = run(scenario()).split("---")
    assert _reached(first), first
    assert _reached(second), second
    assert _refused_by_broker(third), third
    assert dns.queries.get((MOVING_NAME, TYPE_A)) == 2, dns.queries
