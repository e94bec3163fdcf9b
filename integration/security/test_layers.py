"""Each security layer in a real container started by `zviz run`."""

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time

from integration.ids import unique_id
from integration.leaks import processes_named
from integration.security.conftest import HOST_NETWORK_FLAG, on_the_hosts_network
from runtime import procstat
from runtime.security import capabilities, profiles, seccomp
from tools.mkbundle import default_config


def loopback_web_profile(tmp_path, allowed_port: int) -> str:
    path = tmp_path / "web-loopback.toml"
    path.write_text(
        f"""
[profile]
name = "web-loopback"
extends = "web-server"
[network]
egress_deny = []
egress = [{{ cidr = "127.0.0.1/32", ports = [{allowed_port}] }}]
bind = [
    {{ cidr = "0.0.0.0/0", ports = [{allowed_port}, {allowed_port + 1}] }},
    {{ cidr = "::/0", ports = [{allowed_port}, {allowed_port + 1}] }},
]
tcp_bind = [{allowed_port}, {allowed_port + 1}]
tcp_connect = [{allowed_port}, {allowed_port + 1}]
"""
    )
    return str(path)


def sh(probes, profile, script, *, verbose=False, config=None, cid=None, host_network=False):
    """host_network: on the host's network namespace, where the loopback is not the
    container's own, so the broker's egress rules decide it (issue 14)."""
    flags = []
    if host_network:
        config = {**(config or {}), **on_the_hosts_network()}
        flags.append(HOST_NETWORK_FLAG)
    return probes.run(
        "zviz",
        profile,
        ["/bin/sh", "-c", script],
        verbose=verbose,
        config=config,
        cid=cid,
        flags=flags,
    )


def test_allowed_syscalls_work_denied_ones_return_eperm(probes):
    ok = sh(
        probes, "ci-runner", "echo hello > /tmp/f && cat /tmp/f && ls / > /dev/null && echo done"
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["hello", "done"]
    denied = probes.run("zviz", "ci-runner", ["/probe", "mount"])
    assert "BLOCKED mount" in denied.stdout and "errno 1 " in denied.stdout


def test_status_shows_every_layer(probes):
    result = sh(
        probes,
        "ci-runner",
        "grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status; cat /proc/self/uid_map",
    )
    assert result.returncode == 0, result.stderr
    status = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    # Nothing beyond what the kernel confines to the user namespace (the default config
    # asks for CAP_KILL of those), and nothing inheritable or ambient.
    confined = capabilities.mask(capabilities.CONFINED_TO_USER_NAMESPACE)
    for key in ("CapPrm", "CapEff", "CapBnd"):
        assert int(status[key], 16) & ~confined == 0, (key, status[key])
    assert int(status["CapEff"], 16) == 1 << 5  # CAP_KILL
    for key in ("CapInh", "CapAmb"):
        assert int(status[key], 16) == 0, (key, status[key])
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    uid_map = [line.split() for line in result.stdout.splitlines() if ":" not in line]
    assert uid_map == [["0", "100000", "65536"]]


def test_new_privileges_only_where_the_profile_allows_them(probes):
    """config.json's `noNewPrivileges: false` is honoured only under a profile with
    capabilities.allow_new_privileges (development): Landlock and seccomp then come
    before the capability drop (they need CAP_SYS_ADMIN without no_new_privs), and all
    three are still in place. Every other profile sets no_new_privs anyway."""
    process = default_config(args=["/bin/sh", "-c", "x"])["process"]
    script = "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; /probe mount"
    process.update(args=["/bin/sh", "-c", script], noNewPrivileges=False)
    asked = set(process["capabilities"]["effective"])
    results = {}
    # --verbose: a notify listener is handed to the broker before the drop.
    for profile, verbose in (("development", False), ("development", True), ("ci-runner", False)):
        result = probes.run(
            "zviz", profile, process["args"], config={"process": process}, verbose=verbose
        )
        assert result.returncode == 0, result.stderr
        status = dict(line.split(":\t", 1) for line in result.stdout.splitlines() if ":\t" in line)
        assert status["Seccomp"].strip() == "2", (profile, result.stdout)
        assert "BLOCKED mount" in result.stdout, (profile, result.stdout)
        results[profile, verbose] = status
    assert results["development", True] == results["development", False]
    assert results["development", False]["NoNewPrivs"].strip() == "0"
    # The drop after the filters left exactly what was asked for (the ceiling keeps all).
    effective = int(results["development", False]["CapEff"], 16)
    assert effective == capabilities.mask(asked), (hex(effective), sorted(asked))
    assert results["ci-runner", False]["NoNewPrivs"].strip() == "1"


def test_only_loopback_without_network(probes):
    result = sh(
        probes, "ci-runner", "cat /proc/net/dev | tail -n +3 | cut -d: -f1; ip -o link | wc -l"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "lo"
    assert [w for w in result.stdout.split() if not w.isdigit()] == ["lo"]


def test_af_packet_fails_and_af_inet_works_under_web_server(probes, tmp_path):
    packet = probes.run("zviz", "web-server", ["/probe", "packet_socket"])
    assert "BLOCKED packet_socket" in packet.stdout, packet.stdout + packet.stderr
    port = 18080
    profile = loopback_web_profile(tmp_path, port)
    inet = sh(
        probes,
        profile,
        # the listener may not be up yet on a loaded machine: retry the connect, not a sleep
        f"nc -l -p {port} > /tmp/got & for i in $(seq 100); do "
        f"echo hi | nc 127.0.0.1 {port} && break; sleep 0.1; done; wait; cat /tmp/got",
    )
    assert inet.returncode == 0, inet.stderr
    assert inet.stdout.strip() == "hi"


def test_landlock_denies_write_outside_the_writable_set(probes):
    config = {"root": {"path": "rootfs", "readonly": False}}
    result = sh(
        probes,
        "ci-runner",
        "echo x > /tmp/ok && echo tmp-ok; echo x > /etc/nope || echo etc-denied; ls /etc/nope 2>&1 || true",
        config=config,
    )
    assert "tmp-ok" in result.stdout and "etc-denied" in result.stdout, (
        result.stdout + result.stderr
    )
    assert "Permission denied" in result.stderr or "Permission denied" in result.stdout


def test_a_user_namespace_joined_by_path_must_obey_the_profile(probes):
    # A user namespace whose root is host root (`unshare --map-root-user` run by root):
    # joining it would make the container's root host uid 0 again.
    holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "sleep", "60"])
    try:
        for _ in range(100):
            with open(f"/proc/{holder.pid}/uid_map") as f:
                if f.read().split()[:2] == ["0", "0"]:
                    break
            time.sleep(0.02)
        linux = default_config(["true"], terminal=False)["linux"]
        linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "user"]
        linux["namespaces"].append({"type": "user", "path": f"/proc/{holder.pid}/ns/user"})
        result = sh(probes, "ci-runner", "id -u", config={"linux": linux})
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1, result.stdout
    assert "the user namespace joined maps host uid 0 (0 0 1)" in result.stderr


def test_broker_allows_connect_to_allowed_port_denies_another(probes, tmp_path):
    port = 18090
    profile = loopback_web_profile(tmp_path, port)
    script = (
        f"nc -l -p {port} >/dev/null & nc -l -p {port + 1} >/dev/null & sleep 0.3; "
        f"echo a | nc 127.0.0.1 {port} && echo allowed-ok; "
        f"echo b | nc 127.0.0.1 {port + 1} || echo other-denied"
    )
    result = sh(probes, profile, script, host_network=True)
    assert "allowed-ok" in result.stdout and "other-denied" in result.stdout, (
        result.stdout + result.stderr
    )


def _holds_listener(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:seccomp notify":
                return True
        except OSError:
            pass
    return False


def test_killing_the_broker_makes_mediated_calls_fail(probes, tmp_path):
    port = 18100
    profile = loopback_web_profile(tmp_path, port)
    cid = unique_id("zviz-sec-kill")
    killed = []

    def killer():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            for pid in processes_named("zviz-broker", cid):
                # Only once it holds the listener: killed earlier, the container
                # refuses to start instead (also fail-closed, but not this test).
                if _holds_listener(pid):
                    os.kill(pid, 9)
                    killed.append(pid)
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    script = (
        f"nc -l -p {port} >/dev/null & sleep 1.5; "
        f"echo a | nc 127.0.0.1 {port} && echo CONNECTED || echo connect-failed"
    )
    result = sh(probes, profile, script, cid=cid)
    thread.join()
    assert killed, "no broker was started for a mediating profile"
    assert "connect-failed" in result.stdout and "CONNECTED" not in result.stdout, (
        result.stdout + result.stderr
    )


def _state(pid: int) -> str:
    try:
        return procstat.state(pid)
    except OSError:
        return "gone"


def test_stopped_broker_makes_mediated_calls_fail_not_wait(probes, tmp_path):
    """A stalled (SIGSTOPped) broker: its warden kills it within broker.timeout."""
    port = 18120
    profile = loopback_web_profile(tmp_path, port)
    with open(profile, "a") as f:
        f.write("[broker]\ntimeout = 0.5\n")
    cid = unique_id("zviz-sec-stop")
    stopped = []

    def stopper():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not stopped:
            for pid in processes_named("zviz-broker", cid):
                if _holds_listener(pid):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            time.sleep(0.02)

    thread = threading.Thread(target=stopper)
    thread.start()
    script = (
        f"nc -l -p {port} >/dev/null & sleep 1.5; "
        f"echo a | nc 127.0.0.1 {port} && echo CONNECTED || echo connect-failed"
    )
    try:
        result = sh(probes, profile, script, cid=cid)
    finally:
        thread.join()
        for pid in stopped:
            if _state(pid) == "T":  # the warden failed: do not leave it stopped
                os.kill(pid, signal.SIGKILL)
    assert stopped, "no broker was started for a mediating profile"
    assert "connect-failed" in result.stdout and "CONNECTED" not in result.stdout, (
        result.stdout + result.stderr
    )
    assert "Function not implemented" in result.stderr, result.stderr  # ENOSYS: listener gone


def test_broker_waits_for_start_longer_than_its_timeout(probes, tmp_path):
    """create, then start after more than broker.timeout: the warden's clock starts
    when the broker serves, not while it waits for the container to start."""
    port = 18130
    profile = loopback_web_profile(tmp_path, port)
    with open(profile, "a") as f:
        f.write("[broker]\ntimeout = 0.3\n")
    script = (
        f"nc -l -p {port} >/dev/null & sleep 0.3; "
        f"echo a | nc 127.0.0.1 {port} && echo allowed-ok > /tmp/out; sleep 10"
    )
    bundle = probes.bundle(["/bin/sh", "-c", script])
    root = os.path.join(probes.base, "root-late-start")
    cid = unique_id("zviz-sec-late")
    zviz = [probes.zviz, "--root", root]
    quiet = {
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
    }
    created = subprocess.run(
        [*zviz, "create", "--profile", profile, "--bundle", bundle, cid], **quiet
    )
    assert created.returncode == 0
    try:
        time.sleep(1.0)  # > broker.timeout before the container starts
        assert subprocess.run([*zviz, "start", cid], **quiet).returncode == 0
        out = ""
        for _ in range(100):
            got = subprocess.run(
                [*zviz, "exec", cid, "cat", "/tmp/out"], capture_output=True, text=True, timeout=60
            )
            out = got.stdout
            if out:
                break
            time.sleep(0.05)
    finally:
        subprocess.run([*zviz, "delete", "-f", cid], capture_output=True)
    assert out.strip() == "allowed-ok"


def test_verbose_logs_a_denied_mount(probes):
    result = probes.run("zviz", "ci-runner", ["/probe", "mount"], verbose=True)
    assert "BLOCKED mount" in result.stdout
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    mounts = [r for r in records if r.get("syscall") == "mount"]
    assert mounts, result.stderr
    assert mounts[0]["nr"] == 165 and mounts[0]["verdict"] == "EPERM"
    assert mounts[0]["profile"] == "ci-runner" and mounts[0]["command"] == "probe"


def test_unknown_profile_is_an_error_and_leaves_nothing(probes):
    result = probes.run("zviz", "no-such-profile", ["true"])
    assert result.returncode != 0
    assert "unknown profile 'no-such-profile'" in result.stderr


def cache_entries(cache) -> dict:
    """name -> (inode, mtime_ns) of each cached filter: a store renames a new file in."""
    return {
        entry.name: (entry.inode(), entry.stat().st_mtime_ns)
        for entry in os.scandir(cache)
        if entry.name.endswith(".bpf")
    }


def test_bpf_cache_is_filled_then_reused(probes, tmp_path):
    cache = tmp_path / "zh9b-seccomp-cache"  # empty and ours: nothing there by accident
    env = {"ZVIZ_SECCOMP_CACHE": str(cache)}
    first = probes.run("zviz", "ci-runner", ["true"], env=env)
    assert first.returncode == 0, first.stderr
    profile = profiles.load_profile("ci-runner")
    key = seccomp.profile_cache_key(profile)
    filled = cache_entries(cache)
    # ci-runner's filter, and config.json's own linux.seccomp if the bundle has one.
    assert f"{key}.bpf" in filled, f"the run did not store ci-runner's filter: {filled}"
    second = probes.run("zviz", "ci-runner", ["true"], env=env)
    assert second.returncode == 0, second.stderr
    assert cache_entries(cache) == filled, "the second run compiled and stored again"


# seccomp's ALLOW for every syscall: one BPF instruction, `ret #0x7fff0000`.
ALLOW_ALL_BPF = struct.pack("=HBBI", 0x06, 0, 0, seccomp.SECCOMP_RET_ALLOW)


def test_a_cache_others_can_write_is_not_loaded(probes, tmp_path):
    """A filter planted in a world-writable ZVIZ_SECCOMP_CACHE would be the container's
    seccomp: with it unshare(CLONE_NEWUSER), which only seccomp stops, would succeed."""
    cache = tmp_path / "zh9b-planted-cache"
    cache.mkdir()
    cache.chmod(0o777)  # as a directory another user made under /tmp would be
    profile = profiles.load_profile("ci-runner")
    key = seccomp.profile_cache_key(profile)
    (cache / f"{key}.bpf").write_bytes(ALLOW_ALL_BPF)
    args = ["/probe", "unshare_user"]
    result = probes.run("zviz", "ci-runner", args, env={"ZVIZ_SECCOMP_CACHE": str(cache)})
    assert "BLOCKED unshare_user: unshare(CLONE_NEWUSER): errno 1 EPERM" in result.stdout, (
        result.stdout + result.stderr
    )
    assert list(cache_entries(cache)) == [f"{key}.bpf"], "stored into a writable cache"


def test_zviz_profile_commands(zviz_bin, tmp_path):
    listed = subprocess.run([zviz_bin, "profile", "list"], capture_output=True, text=True)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        "batch-job", "ci-runner", "development", "hostile-tenant", "web-server",
    ]  # fmt: skip
    shown = subprocess.run(
        [zviz_bin, "profile", "show", "hostile-tenant", "--format", "json"],
        capture_output=True,
        text=True,
    )
    policy = json.loads(shown.stdout)
    assert "mount" in policy["seccomp"]["deny_eperm"] and policy["network"]["mode"] == "none"
    bad = tmp_path / "bad.toml"
    bad.write_text("[landlock]\nwritable = 'tmp'\n")
    checked = subprocess.run(
        [zviz_bin, "profile", "check", str(bad)], capture_output=True, text=True
    )
    assert checked.returncode == 1
    assert checked.stderr.strip() == f"zviz: {bad}: landlock.writable: must be a list of strings"
    unknown = subprocess.run([zviz_bin, "profile", "show", "nope"], capture_output=True, text=True)
    assert unknown.returncode == 1 and "unknown profile 'nope'" in unknown.stderr


def test_exec_into_a_mediating_container_gets_its_own_broker(probes, tmp_path):
    """zviz exec reloads the profile from the state (a file path here) and mediates too."""
    port = 18110
    profile = loopback_web_profile(tmp_path, port)
    # On the host's network: the loopback is not the container's own (issue 14).
    bundle = probes.bundle(["sleep", "10"], **on_the_hosts_network())
    root = os.path.join(probes.base, "root-exec")
    cid = unique_id("zviz-sec-exec")
    zviz = [probes.zviz, "--root", root]
    started = subprocess.run(
        [*zviz, "run", "-d", HOST_NETWORK_FLAG, "--profile", profile, "--bundle", bundle, cid],
        # The detached container keeps its stdio: a pipe here would block until it exits.
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert started.returncode == 0
    try:
        script = f"echo a | nc 127.0.0.1 {port + 1} || echo other-denied; echo a | nc 127.0.0.1 {port} || echo allowed-refused"
        result = subprocess.run(
            [*zviz, "exec", cid, "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run([*zviz, "delete", "-f", cid], capture_output=True)
    assert "other-denied" in result.stdout and "allowed-refused" in result.stdout, result.stderr
    # The broker answered EPERM for the denied port; the allowed one reached the (closed) port.
    assert "Operation not permitted" in result.stderr and "Connection refused" in result.stderr


def test_unix_peer_sees_the_container_user_not_the_broker(probes):
    """A mediated connect to a host unix socket (a volume) carries the caller's ids."""
    sockdir = os.path.join(probes.base, unique_id("sock"))
    os.makedirs(sockdir, mode=0o755, exist_ok=True)
    path = os.path.join(sockdir, "s")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(1)
    server.settimeout(30)
    seen = {}

    def accept():
        conn, _ = server.accept()
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            seen["pid"], seen["uid"], seen["gid"] = struct.unpack("3i", creds)
            conn.recv(10)  # the probe writes before it reports: close only after that

    thread = threading.Thread(target=accept)
    thread.start()
    volume = {
        "destination": "/hostsock",
        "type": "bind",
        "source": sockdir,
        "options": ["rbind", "rw"],
    }
    config = {"mounts": default_config(["true"], terminal=False)["mounts"] + [volume]}
    result = probes.run(
        "zviz", "web-server", ["/probe", "unix_connect", "/hostsock/s"], config=config
    )
    thread.join(timeout=30)
    server.close()
    assert "CONNECTED" in result.stdout, result.stdout + result.stderr
    # Container root is host uid 100000 under web-server (ci-runner's mapping): the
    # server must see that, never 0 (the broker's own uid).
    assert seen.get("uid") == 100000 and seen.get("gid") == 100000, (seen, result.stderr)


def test_exec_cap_and_update_stay_under_the_profile(probes):
    bundle = probes.bundle(["sleep", "10"])
    root = os.path.join(probes.base, "root-ceiling")
    cid = unique_id("zviz-sec-ceiling")
    zviz = [probes.zviz, "--root", root]
    started = subprocess.run(
        [*zviz, "run", "-d", "--profile", "hostile-tenant", "--bundle", bundle, cid],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert started.returncode == 0
    try:
        # The exec'd process asks for CAP_SYS_ADMIN: hostile-tenant grants nothing.
        execd = subprocess.run(
            [*zviz, "exec", "--cap", "CAP_SYS_ADMIN", cid, "grep", "CapEff", "/proc/self/status"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        raised = subprocess.run(
            [*zviz, "update", "--pids-limit", "100000", cid], capture_output=True, text=True
        )
        lowered = subprocess.run(
            [*zviz, "update", "--pids-limit", "32", cid], capture_output=True, text=True
        )
    finally:
        subprocess.run([*zviz, "delete", "-f", cid], capture_output=True)
    assert execd.returncode == 0, execd.stderr
    assert int(execd.stdout.split()[1], 16) == 0
    assert raised.returncode == 1 and "above profile hostile-tenant's ceiling 64" in raised.stderr
    assert lowered.returncode == 0, lowered.stderr


def test_broker_bind_rules_do_not_follow_the_images_symlinks(probes, tmp_path):
    """The broker confines a unix bind it performs with the container's writable paths;
    an image whose /run links to /dev must not move that rule onto /dev."""
    profile = loopback_web_profile(tmp_path, 18120)

    def run_links_to_dev(rootfs):
        run = os.path.join(rootfs, "run")
        if os.path.isdir(run) and not os.path.islink(run):
            os.rmdir(run)
        os.symlink("/dev", run)

    moved = probes.run(
        "zviz", profile, ["/probe", "unix_bind", "/run/zviz-sock"], image_change=run_links_to_dev
    )
    assert "BLOCKED unix_bind: bind" in moved.stdout, moved.stdout + moved.stderr
    plain = probes.run("zviz", profile, ["/probe", "unix_bind", "/tmp/zviz-sock"])
    assert "BOUND /tmp/zviz-sock" in plain.stdout, plain.stdout + plain.stderr
