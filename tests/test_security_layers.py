"""Each security layer, applied for real in a forked child (no container needed).

The child applies the layers exactly as PID 1 does (security.prepare + apply) and
then tries syscalls; results come back over a pipe as JSON. The real-container
versions of these checks are in integration/security/.
"""

import ctypes
import errno
import json
import os
import socket
import time

import pytest

from runtime import linux, procstat, security
from runtime.errors import NotImplementedByZviz
from runtime.security import capabilities, landlock, profiles, seccomp
from runtime.spec import parse_spec
from tests.privileges import drops_capabilities, needs_root
from tools.mkbundle import default_config

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def make_spec(tmp_path, **linux_overrides):
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    config = default_config(["true"], terminal=False)
    config["linux"].update(linux_overrides)
    return parse_spec(config, str(bundle))


def write_profile(tmp_path, text: str, name="custom") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


def confined(
    tmp_path, profile_name, fn, *, verbose=False, writable=(), log_path=None, after_apply=None
):
    """Run fn() in a forked child under profile's layers and return its result.

    after_apply(broker_pid), if given, runs in the parent once the layers are on and
    before fn() starts.
    """
    profile = security.resolve_profile(profile_name, {})
    if writable:
        profile.writable = tuple(writable)
    spec = make_spec(tmp_path)
    # The child is not in a fresh netns: leave network setup out of prepare.
    security.harden_spec(spec, profile)
    spec.linux.namespaces = [ns for ns in spec.linux.namespaces if ns.type != "network"]
    # Nor in a pid namespace of its own: it sees (and may signal) the test's processes,
    # as a container joining a shared pid namespace does.
    for ns in spec.linux.namespaces:
        if ns.type == "pid":
            ns.path = "/proc/self/ns/pid"
    channel = security.notify_channel(profile, verbose)
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(go_w)
            if channel:
                channel.close_supervisor_end()
            os.read(go_r, 1)  # wait for the broker to exist
            plan = security.prepare(spec, profile, verbose)
            security.apply(plan, channel.container_fd if channel else None)
            os.write(w, b"A")
            os.read(go_r, 1)
            result = fn()
            os.write(w, json.dumps({"ok": result}).encode())
        except BaseException as e:  # noqa: BLE001
            os.write(w, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    broker_pid = None
    if channel:
        channel.close_container_end()
        broker_pid = security.start_broker(
            channel, pid, profile, verbose=verbose, container_id="test", log_path=log_path
        )
    os.write(go_w, b"x")
    applied = os.read(r, 1)
    if applied == b"A" and after_apply is not None:
        after_apply(broker_pid)
    os.write(go_w, b"x")
    os.close(go_w)
    data = b"" if applied == b"A" else applied
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    if broker_pid:
        _wait_gone(broker_pid)
    reply = json.loads(data)
    assert "error" not in reply, reply["error"]
    return reply["ok"]


def _wait_gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if procstat.state(pid) in ("Z", "X"):
                return  # exited; reaping is init's job (the broker is nobody's child)
        except OSError:
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    raise AssertionError(f"broker {pid} outlived its container")


def errno_of(fn):
    """0 if fn() succeeds, else the errno it fails with."""
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno


def raw(name, *args):
    rc = libc.syscall(linux.syscall_number(name) if name in linux._SYSCALLS else name, *args)
    return 0 if rc >= 0 else ctypes.get_errno()


NR = {
    "mount": 165,
    "unshare": 272,
    "ptrace": 101,
    "bpf": 321,
    "keyctl": 250,
    "getpid": 39,
    "io_uring_setup": 425,
    "clone3": 435,
    "kexec_load": 246,
    "init_module": 175,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "open_by_handle_at": 304,
}


def sys_errno(nr, *args):
    rc = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return 0 if rc >= 0 else ctypes.get_errno()


@drops_capabilities
@pytest.mark.parametrize("profile", ["ci-runner", "hostile-tenant"])
def test_denied_syscalls_return_eperm_and_allowed_ones_work(tmp_path, profile):
    def probe():
        return {
            "getpid": sys_errno(NR["getpid"]),
            "read_write": errno_of(lambda: os.write(os.open("/dev/null", os.O_WRONLY), b"x")),
            "mount": sys_errno(NR["mount"], 0, 0, 0, 0, 0),
            "unshare": sys_errno(NR["unshare"], linux.CLONE_NEWUSER),
            "ptrace": sys_errno(NR["ptrace"], 0, 0, 0, 0),
            "bpf": sys_errno(NR["bpf"], 0, 0, 0),
            "keyctl": sys_errno(NR["keyctl"], 0, 0, 0),
            "io_uring_setup": sys_errno(NR["io_uring_setup"], 1, 0),
            "kexec_load": sys_errno(NR["kexec_load"], 0, 0, 0, 0),
            "init_module": sys_errno(NR["init_module"], 0, 0, 0),
            "userfaultfd": sys_errno(NR["userfaultfd"], 0),
            "clone3": sys_errno(NR["clone3"], 0, 0),
        }

    result = confined(tmp_path, profile, probe)
    assert result["getpid"] == 0
    assert result["read_write"] == 0
    for name in (
        "mount",
        "unshare",
        "ptrace",
        "bpf",
        "keyctl",
        "io_uring_setup",
        "kexec_load",
        "init_module",
        "userfaultfd",
    ):
        assert result[name] == errno.EPERM, (name, result[name])
    assert result["clone3"] == errno.ENOSYS  # so libc falls back to clone


@drops_capabilities
def test_clone_with_namespace_flags_is_refused_plain_fork_works(tmp_path):
    def probe():
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        # clone(CLONE_NEWUSER|SIGCHLD) through the raw syscall.
        rc = libc.syscall(ctypes.c_long(56), ctypes.c_long(linux.CLONE_NEWUSER | 17), 0, 0, 0, 0)
        if rc == 0:
            os._exit(0)
        return {
            "fork_status": os.waitstatus_to_exitcode(status),
            "clone_newuser": 0 if rc > 0 else ctypes.get_errno(),
        }

    result = confined(tmp_path, "ci-runner", probe)
    assert result == {"fork_status": 7, "clone_newuser": errno.EPERM}


@drops_capabilities
def test_socket_families(tmp_path):
    def probe():
        out = {}
        for name, args in {
            "unix": (socket.AF_UNIX, socket.SOCK_STREAM),
            "inet": (socket.AF_INET, socket.SOCK_STREAM),
            "packet": (socket.AF_PACKET, socket.SOCK_RAW),
            "raw": (socket.AF_INET, socket.SOCK_RAW),
            "netlink": (socket.AF_NETLINK, socket.SOCK_RAW, 0),  # NETLINK_ROUTE: read-only
            "netfilter": (socket.AF_NETLINK, socket.SOCK_RAW, 12),  # NETLINK_NETFILTER
        }.items():
            out[name] = errno_of(lambda a=args: socket.socket(*a).close())
        return out

    ci = confined(tmp_path, "ci-runner", probe)
    assert ci == {
        "unix": 0,
        "inet": 0,
        "packet": errno.EPERM,
        "raw": errno.EPERM,
        "netlink": 0,
        "netfilter": errno.EPERM,
    }
    # hostile-tenant: the same, inet included (its loopback, issue 14 item 3).
    assert confined(tmp_path, "hostile-tenant", probe) == ci


@drops_capabilities
@pytest.mark.parametrize("profile", ["ci-runner", "web-server", "hostile-tenant"])
def test_inet_sockets_only_of_protocols_the_broker_sees_through(tmp_path, profile):
    """SCTP connects and binds through setsockopt (SCTP_SOCKOPT_CONNECTX/BINDX), which no
    mediated syscall sees: refused with EPERM (this kernel may not have SCTP at all, which
    would answer EPROTONOSUPPORT); TCP, UDP and the default protocol stay open."""

    def probe():
        out = {}
        for name, args in {
            "tcp": (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP),
            "udp6": (socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_UDP),
            "default": (socket.AF_INET, socket.SOCK_STREAM, 0),
            "sctp": (socket.AF_INET, socket.SOCK_STREAM, 132),
            "sctp-seqpacket": (socket.AF_INET6, socket.SOCK_SEQPACKET, 132),
            "udplite": (socket.AF_INET, socket.SOCK_DGRAM, 136),
        }.items():
            out[name] = errno_of(lambda a=args: socket.socket(*a).close())
        return out

    assert confined(tmp_path, profile, probe) == {
        "tcp": 0,
        "udp6": 0,
        "default": 0,
        "sctp": errno.EPERM,
        "sctp-seqpacket": errno.EPERM,
        "udplite": errno.EPERM,
    }


@drops_capabilities
def test_tiocsti_is_refused_even_with_high_bits_set(tmp_path):
    def probe():
        fd = os.open("/dev/null", os.O_RDONLY)
        char = ctypes.c_char(b"x")
        plain = libc.ioctl(fd, ctypes.c_ulong(0x5412), ctypes.byref(char))
        e1 = ctypes.get_errno() if plain < 0 else 0
        high = libc.ioctl(fd, ctypes.c_ulong(0x1_0000_5412), ctypes.byref(char))
        e2 = ctypes.get_errno() if high < 0 else 0
        other = libc.ioctl(
            fd, ctypes.c_ulong(0x5401), ctypes.byref(ctypes.create_string_buffer(64))
        )
        e3 = ctypes.get_errno() if other < 0 else 0
        return [e1, e2, e3]

    tiocsti, tiocsti_high, tcgets = confined(tmp_path, "ci-runner", probe)
    assert tiocsti == errno.EPERM and tiocsti_high == errno.EPERM
    assert tcgets == errno.ENOTTY  # an allowed ioctl reaches the driver


@drops_capabilities
def test_capabilities_all_dropped(tmp_path):
    def probe():
        with open("/proc/self/status") as f:
            status = dict(line.split(":\t", 1) for line in f if ":\t" in line)
        return {
            k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
        } | {"NoNewPrivs": int(status["NoNewPrivs"]), "Seccomp": int(status["Seccomp"])}

    # hostile-tenant: ci-runner keeps the user-namespace-confined ones (issue 14).
    result = confined(tmp_path, "hostile-tenant", probe)
    assert result == {
        "CapInh": 0,
        "CapPrm": 0,
        "CapEff": 0,
        "CapBnd": 0,
        "CapAmb": 0,
        "NoNewPrivs": 1,
        "Seccomp": 2,
    }


@drops_capabilities
def test_capabilities_ceiling_keeps_only_what_profile_and_config_both_grant(tmp_path):
    def probe():
        with open("/proc/self/status") as f:
            status = dict(line.split(":\t", 1) for line in f if ":\t" in line)
        return int(status["CapEff"], 16), int(status["CapBnd"], 16)

    # The default config asks for AUDIT_WRITE, KILL, NET_BIND_SERVICE; web-server allows the
    # last two (and CAP_CHOWN etc., which the config does not ask for).
    eff, bnd = confined(tmp_path, "web-server", probe)
    assert eff == bnd == 1 << 10 | 1 << 5


def test_cap_last_cap_comes_from_the_kernel():
    with open("/proc/sys/kernel/cap_last_cap") as f:
        assert capabilities.last_cap() == int(f.read())


@drops_capabilities
def test_landlock_denies_writes_outside_the_writable_set(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    other = tmp_path / "other"
    other.mkdir()

    def probe():
        def write(path):
            with open(path, "w") as f:
                f.write("x")

        return {
            "allowed": errno_of(lambda: write(allowed / "f")),
            "other": errno_of(lambda: write(other / "f")),
            "read_other": errno_of(lambda: os.listdir(other)),
            "mknod": errno_of(
                lambda: os.mknod(allowed / "dev", 0o600 | 0o020000, os.makedev(1, 3))
            ),
            "mkfifo_allowed": errno_of(lambda: os.mkfifo(allowed / "fifo")),
        }

    result = confined(tmp_path, "ci-runner", probe, writable=[str(allowed), "/dev/null"])
    assert result["allowed"] == 0
    assert result["other"] == errno.EACCES
    assert result["read_other"] == 0
    assert result["mknod"] in (errno.EPERM, errno.EACCES)
    assert result["mkfifo_allowed"] == 0
    assert not (other / "f").exists()


def test_landlock_abi_detected():
    assert landlock.abi_version() >= 1


def test_profile_without_landlock_refuses_when_required(tmp_path, monkeypatch):
    profile = security.resolve_profile("ci-runner", {})
    spec = make_spec(tmp_path)
    spec.linux.namespaces = []
    monkeypatch.setattr(landlock, "abi_version", lambda: 0)  # a kernel without Landlock
    with pytest.raises(security.SecurityLayerError, match="landlock"):
        security.prepare(spec, profile)
    dev = security.resolve_profile("development", {})
    plan = security.prepare(spec, dev)
    assert plan.landlock is None and plan.notes


@drops_capabilities
def test_verbose_logs_denied_mount_as_json(tmp_path):
    log = tmp_path / "denied.log"

    def probe():
        return sys_errno(NR["mount"], 0, 0, 0, 0, 0)

    assert confined(tmp_path, "ci-runner", probe, verbose=True, log_path=str(log)) == errno.EPERM
    records = [json.loads(line) for line in log.read_text().splitlines()]
    mounts = [r for r in records if r["syscall"] == "mount"]
    assert mounts, records
    assert mounts[0]["nr"] == NR["mount"] and mounts[0]["verdict"] == "EPERM"
    assert mounts[0]["profile"] == "ci-runner" and mounts[0]["pid"] > 0
    assert len(mounts[0]["args"]) == 6 and mounts[0]["command"]


def test_seccomp_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(seccomp, "CACHE_DIR", str(tmp_path / "cache"))
    profile = profiles.load_profile("ci-runner")
    first = seccomp.profile_program(profile)
    assert len(os.listdir(tmp_path / "cache")) == 1
    monkeypatch.setattr(seccomp, "_compile_profile", lambda *a: pytest.fail("recompiled"))
    assert seccomp.profile_program(profile).bpf == first.bpf


def test_seccomp_cache_stays_bounded_and_drops_the_oldest(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(seccomp, "CACHE_DIR", str(cache))
    monkeypatch.setattr(seccomp, "CACHE_MAX_ENTRIES", 4)
    for i in range(4):
        seccomp._store(f"key{i}", b"\0" * 8)
        os.utime(cache / f"key{i}.bpf", ns=(i * 10**9, i * 10**9))
    assert sorted(os.listdir(cache)) == ["key0.bpf", "key1.bpf", "key2.bpf", "key3.bpf"]
    seccomp._store("key5", b"\0" * 8)  # 5 > 4: the newest 2 stay
    assert sorted(os.listdir(cache)) == ["key3.bpf", "key5.bpf"]
    assert seccomp._cached("key5") == b"\0" * 8


@drops_capabilities
def test_foreign_architecture_is_killed(tmp_path):
    def probe():
        libc.mmap.restype = ctypes.c_void_p
        mem = libc.mmap(None, 4096, 7, 0x22, -1, 0)  # rwx, private, anonymous
        pid = os.fork()
        if pid == 0:
            # int 0x80 (the i386 ABI; getpid = 20): not the native arch, so killed.
            code = bytes.fromhex("b814000000cd80c3")  # mov eax,20; int 0x80; ret
            ctypes.memmove(mem, code, len(code))
            ctypes.CFUNCTYPE(ctypes.c_int)(mem)()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        return os.WIFSIGNALED(status) and os.WTERMSIG(status)

    assert confined(tmp_path, "ci-runner", probe) == 31  # SIGSYS


@needs_root("unshare(CLONE_NEWNET) for a fresh network namespace")
def test_loopback_comes_up_in_a_fresh_network_namespace():
    from runtime.security import network

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            linux.unshare(linux.CLONE_NEWNET)

            def up():
                import fcntl
                import struct

                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    req = struct.pack("16sh22x", b"lo", 0)
                    return bool(
                        struct.unpack("16sh22x", fcntl.ioctl(s, network.SIOCGIFFLAGS, req))[1] & 1
                    )

            before = up()
            network.loopback_up()
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            c = socket.create_connection(s.getsockname(), timeout=2)
            c.close()
            os.write(w, json.dumps([before, up(), network.interfaces()]).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 1000)
    os.waitpid(pid, 0)
    before, after, interfaces = json.loads(data)
    assert interfaces == ["lo"]
    assert (before, after) == (False, True)


@drops_capabilities
def test_config_json_filter_is_stacked_not_merged(tmp_path):
    """config.json may deny more (its getpid ERRNO wins); it can never allow more."""
    oci = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES},
        ],
    }

    def probe():
        return {
            "getppid": sys_errno(110),  # denied by config.json only
            "mount": sys_errno(
                NR["mount"], 0, 0, 0, 0, 0
            ),  # allowed by config.json, denied by the profile
            "getpid": sys_errno(NR["getpid"]),
            "filters": open("/proc/self/status").read().split("Seccomp_filters:\t")[1].split()[0],
        }

    profile = security.resolve_profile("ci-runner", {})
    spec = make_spec(tmp_path, seccomp=oci)
    security.harden_spec(spec, profile)
    spec.linux.namespaces = [ns for ns in spec.linux.namespaces if ns.type != "network"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            security.apply(security.prepare(spec, profile), None)
            os.write(w, json.dumps(probe()).encode())
        finally:
            os._exit(0)
    os.close(w)
    result = json.loads(os.read(r, 1000))
    os.waitpid(pid, 0)
    assert result == {"getppid": errno.EACCES, "mount": errno.EPERM, "getpid": 0, "filters": "2"}


def test_config_json_notify_action_is_refused(tmp_path):
    oci = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "listenerPath": "/run/x.sock",
        "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_NOTIFY"}],
    }
    spec = make_spec(tmp_path, seccomp=oci)
    with pytest.raises(NotImplementedByZviz, match="SCMP_ACT_NOTIFY"):
        security.harden_spec(spec, security.resolve_profile("ci-runner", {}))


@drops_capabilities
@pytest.mark.skipif(landlock.abi_version() < 6, reason="Landlock scoping needs ABI 6 (kernel 6.12)")
def test_landlock_scopes_signals_and_abstract_sockets_to_the_container(tmp_path):
    outside = socket.socket(socket.AF_UNIX)
    name = f"\0zviz-sec-scope-{os.getpid()}"
    outside.bind(name)
    outside.listen(1)
    parent = os.getpid()

    def probe():
        c = socket.socket(socket.AF_UNIX)
        own = socket.socket(socket.AF_UNIX)
        own_name = f"\0zviz-sec-scope-own-{os.getpid()}"
        own.bind(own_name)
        own.listen(1)
        d = socket.socket(socket.AF_UNIX)
        return {
            "signal_outside": errno_of(lambda: os.kill(parent, 0)),
            "signal_self": errno_of(lambda: os.kill(os.getpid(), 0)),
            "abstract_outside": errno_of(lambda: c.connect(name)),
            "abstract_inside": errno_of(lambda: d.connect(own_name)),
        }

    with outside:
        result = confined(tmp_path, "ci-runner", probe)
    assert result == {
        "signal_outside": errno.EPERM,
        "signal_self": 0,
        "abstract_outside": errno.EPERM,
        "abstract_inside": 0,
    }


def test_signals_are_scoped_only_where_the_pid_namespace_is_shared(tmp_path):
    """Own pid namespace: every process a signal can reach is the container's, and an
    exec (a sibling Landlock domain of PID 1's) may signal PID 1, as under runc. A joined
    one holds others' processes: the scope stays."""
    own = make_spec(tmp_path)
    assert own.linux.creates_namespace("pid")
    assert not security._signals_need_scope(own)
    joined = make_spec(
        tmp_path,
        namespaces=[
            {"type": "mount"},
            {"type": "uts"},
            {"type": "pid", "path": "/proc/1/ns/pid"},
        ],
    )
    assert security._signals_need_scope(joined)
    if landlock.abi_version() >= 6:
        assert landlock.Ruleset(7, False, False, True, scope_signals=False).scoped == (
            landlock.SCOPE_ABSTRACT_UNIX_SOCKET
        )


@pytest.mark.parametrize("abi", [1, 2, 3, 4, 5, 6, 7])
def test_landlock_ruleset_for_each_abi_uses_only_that_abis_rights(abi):
    """An older kernel refuses rights it does not know: each ABI asks only for its own."""
    if abi > landlock.abi_version():
        pytest.skip(f"this kernel has Landlock ABI {landlock.abi_version()} < {abi}")
    rs = landlock.Ruleset(abi, restrict_tcp_bind=True, restrict_tcp_connect=True, scope=True)
    try:
        assert rs.handled_fs == landlock.handled_fs(abi)
        assert bool(rs.handled_fs & landlock.FS_REFER) == (abi >= 2)
        assert bool(rs.handled_fs & landlock.FS_TRUNCATE) == (abi >= 3)
        assert bool(rs.handled_fs & landlock.FS_IOCTL_DEV) == (abi >= 5)
        assert bool(rs.handled_net) == (abi >= 4)
        assert bool(rs.scoped) == (abi >= 6)
        assert rs.allow_path("/", landlock.READ | landlock.WRITE)
        rs.allow_port(8080, landlock.NET_BIND_TCP)
        # A rule made only of rights newer than the ABI (device ioctls before ABI 5) is
        # dropped, not sent: the kernel answers an empty rule with ENOMSG.
        assert rs.allow_path("/dev", landlock.FS_IOCTL_DEV)
        assert ("/dev", landlock.FS_IOCTL_DEV) in rs.rules or abi < 5
    finally:
        rs.close()


@drops_capabilities
def test_landlock_keeps_unlisted_devices_unreadable(tmp_path):
    def probe():
        def read(path):
            with open(path, "rb") as f:
                f.read(1)

        return {
            "urandom": errno_of(lambda: read("/dev/urandom")),
            "kmsg": errno_of(lambda: read("/dev/kmsg")),
            "list_dev": errno_of(lambda: os.listdir("/dev")),
            "etc": errno_of(lambda: read("/etc/hostname")),
        }

    result = confined(tmp_path, "ci-runner", probe)
    assert result == {"urandom": 0, "kmsg": errno.EACCES, "list_dev": 0, "etc": 0}
