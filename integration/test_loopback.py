"""Loopback inside a container or a pod works under every profile (issue 14, item 3).

A server and its client in one container, or a sidecar and its app in two containers of
one pod, talk over 127.0.0.1 and ::1 on whatever port they pick: that loopback is the
container's (or the pod's) own network namespace, and the broker's rules govern what
leaves it. Each case runs under runc too, the reference that must pass. Before the fix,
web-server refused the bind on any port outside its `bind` list ("bind 127.0.0.1 port
18601 not allowed by profile"). That a non-loopback bind on such a port stays refused is
pinned in integration/security/test_loopback_bind.py.

hostile-tenant too (it had no inet sockets at all before: `socket: errno 1` in both
tests below); `test_every_profile_has_inet_sockets` keeps it so.
"""

import os
import shutil
import subprocess

import pytest

from integration.ids import tagged, unique_id
from integration.security.conftest import build_broker_probe
from runtime.security import profiles as profile_registry

# Listed by no built-in profile's `bind`/`tcp_bind`, and above 1024 (no capability asked).
PORT = 18601
LOOPBACKS = ["127.0.0.1", "::1"]
RUNTIMES = ["runc", "zviz"]

PROFILES = profile_registry.list_profiles()


@pytest.fixture(scope="module")
def broker_probe() -> str:
    return build_broker_probe()


class Runner:
    """Runs a probe bundle under runc or under zviz with a profile, one root each."""

    def __init__(self, zviz_bin, runc_bin, base, make_bundle, probe):
        self.binaries = {"zviz": zviz_bin, "runc": runc_bin}
        self.roots = {name: os.path.join(base, tagged(f"{name}-root")) for name in RUNTIMES}
        self.make_bundle, self.probe = make_bundle, probe

    def bundle(self, args, podnet=None) -> str:
        bundle = self.make_bundle(["/bprobe", *args])
        shutil.copy2(self.probe, os.path.join(bundle, "rootfs", "bprobe"))
        return podnet.join(bundle) if podnet is not None else bundle

    def command(self, runtime, profile, bundle, container_id) -> list[str]:
        cmd = [self.binaries[runtime], "--root", self.roots[runtime], "run"]
        if runtime == "zviz":
            cmd += ["--profile", profile]
        return [*cmd, "--bundle", bundle, container_id]

    def delete(self, runtime, container_id) -> None:
        subprocess.run(
            [self.binaries[runtime], "--root", self.roots[runtime], "delete", "-f", container_id],
            capture_output=True,
        )

    def run(self, runtime, profile, args, podnet=None) -> subprocess.CompletedProcess:
        container_id = unique_id("zlo")
        try:
            return subprocess.run(
                self.command(runtime, profile, self.bundle(args, podnet), container_id),
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
        finally:
            self.delete(runtime, container_id)


@pytest.fixture
def runner(zviz_bin, runc_bin, tmp_path, make_bundle, broker_probe):
    return Runner(zviz_bin, runc_bin, str(tmp_path), make_bundle, broker_probe)


def _line(output: str, word: str) -> str:
    return next((line for line in output.splitlines() if line.startswith(word)), "")


@pytest.mark.parametrize("address", LOOPBACKS)
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("profile", PROFILES)
def test_a_server_and_its_client_in_one_container(runner, profile, runtime, address):
    result = runner.run(runtime, profile, ["tcp_self", address, str(PORT)])
    assert _line(result.stdout, "OK tcp_self"), result.stdout + result.stderr
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("address", LOOPBACKS)
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("profile", PROFILES)
def test_a_sidecar_and_its_app_in_one_pod(runner, podnet, profile, runtime, address):
    """Two containers joining the pod's network namespace by path: the app listens on the
    pod's loopback, the sidecar in the other container connects to it."""
    server_id = unique_id("zlo-srv")
    server = subprocess.Popen(
        runner.command(
            runtime, profile, runner.bundle(["tcp_serve", address, str(PORT)], podnet), server_id
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        client = runner.run(runtime, profile, ["tcp_client", address, str(PORT)], podnet)
        if client.returncode != 0:
            runner.delete(runtime, server_id)  # nobody will connect: do not wait 30 s
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        runner.delete(runtime, server_id)
    assert _line(client.stdout, "OK tcp_client"), client.stdout + client.stderr
    assert _line(out, "OK tcp_serve") == (
        f"OK tcp_serve {address}:{PORT}: got from-the-other-container"
    ), out + err


def test_every_profile_has_inet_sockets():
    """Loopback TCP and UDP under every built-in, hostile-tenant included (issue 14 item
    3): a profile dropping them would fail the tests above only when they run."""
    for name in PROFILES:
        families = profile_registry.load_profile(name).socket_families
        assert {"AF_INET", "AF_INET6"} <= set(families), (name, families)
