"""The broker decides on what the kernel will do (issue 10, items 2-5), in real containers.

Each test drives probes/broker_probe.c under a web-server profile whose rules refuse the
loopback: a call the broker lets through to it prints ESCAPED. Where the test is about
the loopback being refused, the container is on the host's network: in a namespace of
its own the loopback is the container's and the broker lets it through (issue 14).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from integration.ids import unique_id
from integration.security.conftest import HOST_NETWORK_FLAG, on_the_hosts_network
from runtime.security import landlock

PORT = 18517


def no_loopback_profile(tmp_path) -> str:
    """web-server with one port open everywhere but on the loopback."""
    path = tmp_path / "web-no-loopback.toml"
    path.write_text(
        f"""
[profile]
name = "web-no-loopback"
extends = "web-server"
[network]
egress_deny = ["127.0.0.0/8", "::1/128"]
egress = [{{ cidr = "0.0.0.0/0", ports = [{PORT}] }}, {{ cidr = "::/0", ports = [{PORT}] }}]
bind = [{{ cidr = "0.0.0.0/0", ports = [{PORT}] }}, {{ cidr = "::/0", ports = [{PORT}] }}]
tcp_bind = [{PORT}]
tcp_connect = [{PORT}]
"""
    )
    return str(path)


def run(probes, broker_probe, profile, script, *, cid=None, config=None, host_network=False):
    def install(rootfs):
        shutil.copy2(broker_probe, os.path.join(rootfs, "bprobe"))

    if host_network:
        config = {**(config or {}), **on_the_hosts_network()}
    return probes.run(
        "zviz",
        profile,
        ["/bin/sh", "-c", script],
        cid=cid or unique_id("zviz-broker"),
        config=config,
        image_change=install,
        flags=[HOST_NETWORK_FLAG] if host_network else [],
    )


def verdicts(result) -> dict[str, str]:
    """{probe's what: its line} for every ESCAPED/BLOCKED/OK line."""
    found = {}
    for line in result.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("ESCAPED", "BLOCKED", "OK", "ERROR", "DONE"):
            found[rest.split(": ", 1)[0]] = line
    return found


def test_udp_with_af_unspec_is_decided_as_af_inet(probes, broker_probe, tmp_path):
    def script(ip):
        return "; ".join(
            f"/bprobe udp_unspec {mode} {ip} {PORT}" for mode in ("sendto", "sendmsg", "sendmmsg")
        )

    profile = no_loopback_profile(tmp_path)
    # The host's loopback (not the container's own): refused by the profile's rules.
    refused = run(probes, broker_probe, profile, script("127.0.0.1"), host_network=True)
    # An allowed IPv4 address is let through: the kernel, not the broker, answers (no
    # route in the container's own network namespace; nothing leaves the machine).
    allowed = run(probes, broker_probe, profile, script("192.0.2.1"))
    for mode in ("sendto", "sendmsg", "sendmmsg"):
        loopback = verdicts(refused).get(f"udp_unspec {mode} 127.0.0.1:{PORT}", "")
        assert loopback.startswith("BLOCKED") and "errno 1 " in loopback, refused.stdout
        public = verdicts(allowed).get(f"udp_unspec {mode} 192.0.2.1:{PORT}", "")
        assert "errno 101 " in public, allowed.stdout + allowed.stderr


def test_unspecified_destination_is_decided_as_the_loopback(probes, broker_probe, tmp_path):
    script = f"/bprobe connect_any 4 {PORT}; /bprobe connect_any 6 {PORT}"
    result = run(probes, broker_probe, no_loopback_profile(tmp_path), script, host_network=True)
    found = verdicts(result)
    for name in (f"connect_any 0.0.0.0 port {PORT}", f"connect_any [::] port {PORT}"):
        line = found.get(name, "")
        assert line.startswith("BLOCKED") and "errno 1 " in line, result.stdout + result.stderr


def _container_pid(zviz: str, root: str, cid: str, deadline: float) -> int:
    while time.monotonic() < deadline:
        state = subprocess.run([zviz, "--root", root, "state", cid], capture_output=True)
        if state.returncode == 0:
            data = json.loads(state.stdout)
            if data.get("pid") and data.get("status") == "running":
                return data["pid"]
        time.sleep(0.05)
    raise AssertionError(f"container {cid} did not start")


HOST_LISTENER = """
import socket, sys
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(b"\\0" + sys.argv[1].encode())
server.listen(4)
server.settimeout(30)
datagrams = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
datagrams.bind(b"\\0" + sys.argv[1].encode() + b"-dgram")
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(b"host-root\\n")
    conn.close()
"""


def test_abstract_socket_of_host_root_in_the_netns_stays_out_of_reach(
    probes, broker_probe, tmp_path
):
    """The CVE-2020-15257 class: host root listens on an abstract name inside the
    container's network namespace; Landlock's scope refuses the container that name,
    the broker must not connect it on the container's behalf."""
    if landlock.abi_version() < 6:
        pytest.skip("Landlock ABI < 6: no abstract unix socket scope to compare with")
    cid = unique_id("zviz-broker-abstract")
    host_name = unique_id("zviz-broker-host")
    own_name = unique_id("zviz-broker-own")
    script = (
        f"/bprobe abstract_own {own_name}; sleep 0.5; /bprobe abstract {host_name}; "
        f"/bprobe abstract_dgram {host_name}-dgram"
    )
    results = {}
    container = threading.Thread(
        target=lambda: results.update(
            run=run(probes, broker_probe, no_loopback_profile(tmp_path), script, cid=cid)
        )
    )
    container.start()
    listener = None
    try:
        root = os.path.join(probes.base, "root-zviz")
        pid = _container_pid(probes.zviz, root, cid, time.monotonic() + 60)
        listener = subprocess.Popen(
            [
                "nsenter",
                f"--net=/proc/{pid}/ns/net",
                sys.executable,
                "-c",
                HOST_LISTENER,
                host_name,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert listener.stdout.readline().strip() == "ready"
    finally:
        container.join()
        if listener is not None:
            listener.kill()
            listener.wait()
    result = results["run"]
    found = verdicts(result)
    assert found.get(f"abstract_own @{own_name}", "").startswith("OK"), result.stdout
    for what in (f"abstract @{host_name}", f"abstract_dgram @{host_name}-dgram"):
        host = found.get(what, "")
        assert host.startswith("BLOCKED") and "errno 1 " in host, result.stdout + result.stderr


def _vm_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _broker_of(cid: str) -> list[int]:
    from integration.leaks import processes_named
    from integration.security.test_layers import _holds_listener

    return [pid for pid in processes_named("zviz-broker", cid) if _holds_listener(pid)]


def _run_watching_the_broker(probes, broker_probe, tmp_path, cid: str, script: str):
    """Runs the script in a container limited to 64 MiB; returns (result, {broker pid:
    (VmRSS when first seen, last VmHWM, its /proc/<pid>/cgroup)})."""
    config = {"linux": _default_linux()}
    config["linux"]["resources"]["memory"] = {"limit": 64 << 20}
    seen = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            for pid in _broker_of(cid):
                try:
                    with open(f"/proc/{pid}/cgroup") as f:
                        cgroups = f.read()
                except OSError:
                    continue
                first = seen.get(pid, (_vm_kib(pid, "VmRSS"),))[0]
                seen[pid] = (first, _vm_kib(pid, "VmHWM") or first, cgroups)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run(
            probes, broker_probe, no_loopback_profile(tmp_path), script, cid=cid, config=config
        )
    finally:
        done.set()
        watcher.join()
    assert seen, "no broker seen"
    return result, seen


def test_broker_copies_are_bounded(probes, broker_probe, tmp_path):
    """One sendmmsg of 64 x 4 MiB (or 256 x 1 MiB) from a container limited to 64 MiB:
    the broker's copies must stay within a few MiB, not the 256 MiB the call names."""
    cid = unique_id("zviz-broker-mem")
    script = (
        f"sleep 1; /bprobe sendmmsg_big 192.0.2.1 {PORT} 64 4194304; "
        f"/bprobe sendmmsg_big 192.0.2.1 {PORT} 256 1048576; sleep 1"
    )
    result, seen = _run_watching_the_broker(probes, broker_probe, tmp_path, cid, script)
    assert result.stdout.count("DONE sendmmsg_big") == 2, result.stdout + result.stderr
    growth = max(peak - first for first, peak, _ in seen.values())
    assert growth < 32 << 10, f"the broker grew by {growth} KiB for one call"


def test_broker_is_charged_to_the_containers_memory_cgroup(probes, broker_probe, tmp_path):
    with open("/proc/self/cgroup") as f:
        if not any(line.split(":")[1] == "memory" for line in f):
            pytest.skip("no cgroup v1 memory hierarchy: on v2 the broker stays outside")
    cid = unique_id("zviz-broker-memcg")
    result, seen = _run_watching_the_broker(probes, broker_probe, tmp_path, cid, "sleep 1")
    assert result.returncode == 0, result.stderr
    for _, _, cgroups in seen.values():
        memory = [line.split(":", 2)[2] for line in cgroups.splitlines() if ":memory:" in line]
        assert memory and memory[0].endswith("/" + cid), cgroups
        # Only the memory controller: the container's pids and freezer leave it alone.
        pids = [line.split(":", 2)[2] for line in cgroups.splitlines() if ":pids:" in line]
        assert not pids or cid not in pids[0], cgroups


def _default_linux():
    from tools.mkbundle import default_config

    return default_config(["true"], terminal=False)["linux"]  # a fresh dict each call


@pytest.mark.parametrize("profile", ["ci-runner", "web-server"])
def test_inet_protocols_the_broker_cannot_see_do_not_open(probes, broker_probe, profile):
    """SCTP connects and binds through setsockopt and picks destinations in control
    messages, past every mediated call; UDP-Lite and the like are kernel code nobody
    needs. A real container: SCTP and UDP-Lite refused with EPERM (before the fix
    UDP-Lite opened, and SCTP answered EPROTONOSUPPORT only because this kernel lacks
    it), TCP still opens."""
    script = "; ".join(
        f"/bprobe socket_proto {sock_type} {protocol}"
        for sock_type, protocol in ((1, 132), (5, 132), (2, 136), (1, 6))
    )
    result = run(probes, broker_probe, profile, script)
    lines = verdicts(result)
    for refused in ("1/132", "5/132", "2/136"):
        assert lines[f"socket_proto {refused}"].startswith("BLOCKED"), result.stdout
        assert "errno 1 " in lines[f"socket_proto {refused}"], result.stdout
    assert lines["socket_proto 1/6"].startswith("ESCAPED"), result.stdout + result.stderr


HOST_FLAPPER = """
import socket, sys, time
name, seconds = b"\\0" + sys.argv[1].encode(), float(sys.argv[2])
held = accepted = 0
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(name)
    except OSError:
        server.close()  # the container holds it: try again at once
        continue
    server.listen(64)
    server.setblocking(False)
    held += 1
    hold_until = time.monotonic() + 0.001
    while time.monotonic() < hold_until:
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            continue
        accepted += 1
        try:
            conn.sendall(b"host-root\\n")
        except OSError:
            pass
        conn.close()
    server.close()
    time.sleep(0.0005)
print(f"held {held} accepted {accepted}", flush=True)
"""


def test_abstract_name_rebound_between_the_check_and_the_connect_stays_out_of_reach(
    probes, broker_probe, tmp_path
):
    """The broker's check (who holds the name) and its connect are two steps: host root
    taking the name in between (free at the check, or held by the container and let go)
    must not be reached. Host root binds and lets go of the name in a loop inside the
    container's network namespace while the container connects in a loop and a child of
    it holds and lets go of the same name."""
    if landlock.abi_version() < 6:
        pytest.skip("Landlock ABI < 6: no abstract unix socket scope to compare with")
    cid = unique_id("zviz-broker-race")
    name = unique_id("zviz-broker-race")
    seconds = 6
    results = {}
    container = threading.Thread(
        target=lambda: results.update(
            run=run(
                probes,
                broker_probe,
                no_loopback_profile(tmp_path),
                f"sleep 2; /bprobe abstract_race {name} {seconds}",
                cid=cid,
            )
        )
    )
    container.start()
    flapper = None
    try:
        root = os.path.join(probes.base, "root-zviz")
        pid = _container_pid(probes.zviz, root, cid, time.monotonic() + 60)
        flapper = subprocess.Popen(
            [
                "nsenter",
                f"--net=/proc/{pid}/ns/net",
                sys.executable,
                "-c",
                HOST_FLAPPER,
                name,
                str(seconds + 2),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert flapper.stdout.readline().strip() == "ready"
    finally:
        container.join()
        if flapper is not None:
            host_side = flapper.communicate(timeout=30)[0]
    result = results["run"]
    race = verdicts(result).get(f"abstract_race @{name}", "")
    shown = result.stdout + result.stderr + host_side
    counts = re.search(r"(\d+) connects, (\d+) reached host root, (\d+) own", race)
    assert counts, shown
    connects, reached_host, own = map(int, counts.groups())
    # The race was run: host root held the name, and the container still reached its own
    # listener (the name is not simply refused), never host root's.
    assert int(host_side.split()[1]) > 0, shown
    assert own > 0 and connects > own, shown
    assert reached_host == 0 and race.startswith("BLOCKED"), shown
    # Not even a connection host root accepted and the broker then shut down: the broker
    # holds the listener it decided on until the connect is answered.
    assert re.search(r"accepted 0$", host_side.strip()), shown
    print(race, host_side)


HOST_DATAGRAM_FLAPPER = """
import socket, sys, time
name, seconds = b"\\0" + sys.argv[1].encode(), float(sys.argv[2])
held = received = 0
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        receiver.bind(name)
    except OSError:
        receiver.close()  # the container holds it: try again at once
        continue
    receiver.setblocking(False)
    held += 1
    hold_until = time.monotonic() + 0.001
    while time.monotonic() < hold_until:
        try:
            if receiver.recv(64).startswith(b"container"):
                received += 1
        except BlockingIOError:
            pass
    receiver.close()
    time.sleep(0.0005)
print(f"held {held} received {received}", flush=True)
"""


@pytest.mark.parametrize("mode", ["sendto", "sendmsg", "sendmmsg", "connect"])
def test_abstract_datagram_name_rebound_between_the_check_and_the_send_stays_out_of_reach(
    probes, broker_probe, tmp_path, mode
):
    """A datagram carries no peer credentials: nothing can be checked after it left. The
    broker's check (who holds the name) and its send (or datagram connect) must reach
    the socket it checked. Host root binds and lets go of the name in a loop inside the
    container's network namespace while the container sends to it in a loop and a child
    of it holds and lets go of the same name; what host root receives escaped."""
    cid = unique_id("zviz-broker-dgram-race")
    name = unique_id("zviz-broker-dgram-race")
    seconds = 6
    results = {}
    container = threading.Thread(
        target=lambda: results.update(
            run=run(
                probes,
                broker_probe,
                no_loopback_profile(tmp_path),
                f"sleep 2; /bprobe abstract_dgram_race {name} {seconds} {mode}",
                cid=cid,
            )
        )
    )
    container.start()
    flapper = None
    host_side = ""
    try:
        root = os.path.join(probes.base, "root-zviz")
        pid = _container_pid(probes.zviz, root, cid, time.monotonic() + 60)
        flapper = subprocess.Popen(
            [
                "nsenter",
                f"--net=/proc/{pid}/ns/net",
                sys.executable,
                "-c",
                HOST_DATAGRAM_FLAPPER,
                name,
                str(seconds + 2),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert flapper.stdout.readline().strip() == "ready"
    finally:
        container.join()
        if flapper is not None:
            host_side = flapper.communicate(timeout=30)[0]
    result = results["run"]
    race = verdicts(result).get(f"abstract_dgram_race {mode} @{name}", "")
    shown = result.stdout + result.stderr + host_side
    counts = re.search(r"(\d+) sends, (\d+) sent, (-?\d+) own", race)
    host = re.search(r"held (\d+) received (\d+)", host_side)
    assert counts and host, shown
    sends, sent, own = map(int, counts.groups())
    held, reached_host = map(int, host.groups())
    # The race was run: host root held the name, and the container still reached its own
    # receiver (the name is not simply refused), never host root's.
    assert held > 0 and sends > sent, shown
    assert own > 0, shown
    assert reached_host == 0, shown
    print(race, host_side)
