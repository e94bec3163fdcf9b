"""Name-based egress cannot be steered from inside the pod (issue 11, item 2).

`egress_hosts = ["svc.test:8080"]` (profile web-egress, integration/test_cri_egress.py)
allows what svc.test resolves to. An attacker in the pod runs DNS servers of its own in
the pod's network namespace, at 127.0.0.1:53 and at the pod's address :53 (here the test
process, root on the host, stronger than a container), answering svc.test with another
host on the subnet (the DNS host, DNS_IP). The container sees those forged answers
itself; the broker never asks those servers (its nameserver was fixed at create from the
resolv.conf containerd mounts) and keeps refusing DNS_IP.
"""

import os
import time
import uuid

from integration import test_cri_egress
from integration.cni_node import DNS_IP, SERVICE_IP, SERVICE_NAME, SERVICE_PORT
from integration.test_cri import run
from integration.test_cri_egress import (
    PROFILE_ANNOTATION,
    _connect,
    _reached,
    _refused_by_broker,
    pod,
)
from tests.fake_dns import TYPE_A, FakeDns

cri = test_cri_egress.cri  # that module's node: handlers, profile directory, DNS hosts

MARKER = "ZVIZ_EGRESS_PROBE"


def _pid_with(marker: str) -> int:
    """The host pid of the process whose environment holds MARKER (waited for: the
    container's PID 1 may not have exec'd its command yet when StartContainer returns)."""
    needle = marker.encode() + b"\0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle in f.read() + b"\0":
                        return int(pid)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no process with {marker}")


def test_dns_servers_inside_the_pod_cannot_steer_the_brokers_resolution(cri, tmp_path):
    marker = f"{MARKER}={uuid.uuid4().hex}"
    fakes = []

    async def scenario():
        annotations = {PROFILE_ANNOTATION: "web-egress"}
        async with pod(cri, "zviz", tmp_path, annotations=annotations) as the_pod:
            container = await the_pod.start_container(
                "app", "exec sleep 300", envs=[tuple(marker.split("="))]
            )
            netns = f"/proc/{_pid_with(marker)}/ns/net"
            for address in ("127.0.0.1", await the_pod.ip()):
                fake = FakeDns(address, 53, netns)
                fake.names[SERVICE_NAME] = [(DNS_IP, 300)]
                fakes.append(fake)
            _, lookup, _ = await the_pod.exec(container, f"nslookup {SERVICE_NAME} 127.0.0.1 2>&1")
            asked = [dict(fake.queries) for fake in fakes]
            outputs = []
            for host in (DNS_IP, SERVICE_IP):
                _, out, err = await the_pod.exec(container, _connect(host, SERVICE_PORT))
                outputs.append(out + err)
            return lookup, asked, outputs

    try:
        lookup, asked, (forged, genuine) = run(scenario())
    finally:
        for fake in fakes:
            fake.close()
    # The forged server is live and the container believes it ...
    assert f"Address: {DNS_IP}" in lookup.splitlines(), lookup
    # ... the broker does not: the forged address stays refused, the real one is reached,
    assert _refused_by_broker(forged), forged
    assert _reached(genuine), genuine
    # and the pod's servers were asked nothing more than the container's own lookup.
    assert [dict(fake.queries) for fake in fakes] == asked
    assert asked[0].get((SERVICE_NAME, TYPE_A)) == 1, asked
