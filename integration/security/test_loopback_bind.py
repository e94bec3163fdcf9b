"""The loopback exemption for bind (issue 14, item 3) opens the loopback only.

web-server's broker lets a container bind 127.0.0.1/::1 on any port: that loopback is
the container's or its pod's own network namespace. Everything else the profile's `bind`
rules still decide: the unspecified address (a listener on every address of the
namespace), the pod's own addresses, and the loopback of the host's network namespace
when the operator shares it. And where no broker sees the bind, Landlock's `tcp_bind`
refuses an unlisted port on every address, the loopback included (fail closed).

These pass before and after the exemption: they pin what it must not open. Port 18602
is in no built-in profile's `bind` list; runc binds it (the probe works).
"""

import copy
import os
import shutil

import pytest

from integration.podnet import POD_IP, POD_IP6
from integration.security.conftest import HOST_NETWORK_FLAG, on_the_hosts_network
from runtime.security import landlock
from tools.mkbundle import default_config

PORT = 18602


def run(probes, broker_probe, runtime, profile, address, *, config=None, flags=()):
    def install(rootfs):
        shutil.copy2(broker_probe, os.path.join(rootfs, "bprobe"))

    return probes.run(
        runtime,
        profile,
        ["/bprobe", "tcp_self", address, str(PORT)],
        config=config,
        image_change=install,
        flags=list(flags),
    )


def bind_refusal(result) -> str:
    """The probe's BLOCKED line when its bind was refused, else everything it printed."""
    for line in result.stdout.splitlines():
        if line.startswith("BLOCKED") and ": bind: " in line:
            return line
    return result.stdout + result.stderr


def in_the_pod(podnet) -> dict:
    linux = copy.deepcopy(default_config(["true"])["linux"])
    for ns in linux["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = podnet.pod_path
    return {"linux": linux}


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_web_server_binds_every_address_only_on_its_listed_ports(probes, broker_probe, address):
    under_runc = run(probes, broker_probe, "runc", None, address)
    assert under_runc.stdout.startswith("OK tcp_self"), under_runc.stdout + under_runc.stderr
    result = run(probes, broker_probe, "zviz", "web-server", address)
    assert "errno 1 " in bind_refusal(result), bind_refusal(result)


@pytest.mark.parametrize("address", [POD_IP, POD_IP6])
def test_web_server_binds_the_pods_address_only_on_its_listed_ports(
    probes, broker_probe, podnet, address
):
    config = in_the_pod(podnet)
    under_runc = run(probes, broker_probe, "runc", None, address, config=config)
    assert under_runc.stdout.startswith("OK tcp_self"), under_runc.stdout + under_runc.stderr
    result = run(probes, broker_probe, "zviz", "web-server", address, config=config)
    assert "errno 1 " in bind_refusal(result), bind_refusal(result)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_web_server_on_the_hosts_network_binds_its_loopback_only_on_listed_ports(
    probes, broker_probe, address
):
    """The host's loopback is not the container's own: a listener there would serve the
    host (and be reached by every other container sharing the host's network)."""
    result = run(
        probes,
        broker_probe,
        "zviz",
        "web-server",
        address,
        config=on_the_hosts_network(),
        flags=[HOST_NETWORK_FLAG],
    )
    assert "errno 1 " in bind_refusal(result), bind_refusal(result)


def test_without_a_broker_landlock_keeps_the_loopback_to_the_listed_ports(
    probes, broker_probe, tmp_path
):
    """A profile that lists tcp_bind but mediates no bind has no broker to tell addresses
    apart: Landlock refuses the unlisted port on the loopback too (EACCES)."""
    if landlock.abi_version() < 4:
        pytest.skip(f"Landlock ABI {landlock.abi_version()} has no TCP port rules (ABI 4)")
    profile = tmp_path / "web-no-broker.toml"
    profile.write_text(
        """
[profile]
name = "web-no-broker"
extends = "web-server"
[network]
mediate = []
egress = []
egress_deny = []
bind = []
tcp_bind = [8080]
"""
    )
    result = run(probes, broker_probe, "zviz", str(profile), "127.0.0.1")
    assert "errno 13 " in bind_refusal(result), bind_refusal(result)
