"""Fail closed on older kernels: a right the kernel lacks refuses the container unless allowed.

An older kernel ignores what it does not know: Landlock below ABI 3/4/5/6 handles no
truncate, TCP port, device ioctl or scope rights, and seccomp before Linux 5.19 refuses
WAIT_KILLABLE_RECV (zviz used to load the listener without it, silently). This machine
has ABI 7 and 5.19+, so the tests here inject the detected ABI / the flag's refusal into
security.prepare: a stand-in for older kernels. The real one is the Debian 6.1 kernel
(Landlock ABI 2) under QEMU: test_older_kernel_in_the_v2_guest below.
"""

import errno
import fcntl
import json
import os
import re
import struct

import pytest

from integration.cgroup2_vm import missing_requirements, run_in_v2_vm
from runtime import linux, procstat, security
from runtime.errors import InvalidArgument
from runtime.security import kernel_gaps, landlock, profiles, seccomp
from runtime.spec import parse_spec
from tools.mkbundle import default_config

GUEST_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_gaps_guest.py")
# Landlock feature -> the first ABI that has it (what each test below expects).
SINCE = {"truncate": 3, "tcp_ports": 4, "device_ioctl": 5, "scope": 6}


def spec_without_namespaces(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    spec = parse_spec(default_config(["true"], terminal=False), str(bundle))
    spec.linux.namespaces = []  # prepare() would bring up loopback in a fresh netns
    return spec


def custom_profile(tmp_path, text: str, name="gaps-custom"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return profiles.load_profile(str(path))


def prepare_on_abi(monkeypatch, tmp_path, profile, abi: int, wait_killable_recv=True):
    """security.prepare as on a kernel with Landlock `abi` (a stand-in for an older kernel)."""
    monkeypatch.setattr(landlock, "abi_version", lambda: abi)
    # raising=False: the same test runs against code from before the probe existed.
    monkeypatch.setattr(
        seccomp, "wait_killable_recv_supported", lambda: wait_killable_recv, raising=False
    )
    plan = security.prepare(spec_without_namespaces(tmp_path), profile)
    if plan.landlock is not None:
        plan.landlock.close()
    return plan


@pytest.mark.parametrize("abi", [1, 2, 3, 4, 5])
def test_hostile_tenant_refuses_below_landlock_abi_6_naming_each_missing_right(
    monkeypatch, tmp_path, abi
):
    profile = profiles.load_profile("hostile-tenant")
    with pytest.raises(security.SecurityLayerError) as refused:
        prepare_on_abi(monkeypatch, tmp_path, profile, abi)
    message = str(refused.value)
    for feature, since in SINCE.items():
        asked = feature != "tcp_ports"  # hostile-tenant has no network: no port rules
        named = f"{feature} needs Landlock ABI {since}, this kernel has ABI {abi}" in message
        assert named == (asked and abi < since), (feature, message)


@pytest.mark.parametrize("abi", [1, 2, 3, 4, 5, 6, 7])
def test_each_right_refuses_alone_below_its_abi_unless_may_lack_names_it(
    monkeypatch, tmp_path, abi
):
    strict = custom_profile(
        tmp_path,
        '[profile]\nextends = "web-server"\n[landlock]\nmay_lack = []\n',
        name="gaps-strict",
    )
    missing = [f for f, since in SINCE.items() if abi < since]
    if missing:
        with pytest.raises(security.SecurityLayerError) as refused:
            prepare_on_abi(monkeypatch, tmp_path, strict, abi)
        for feature in missing:
            assert f'[landlock] may_lack = ["{feature}"]' in str(refused.value)
    else:
        assert prepare_on_abi(monkeypatch, tmp_path, strict, abi).landlock is not None
    tolerant = custom_profile(
        tmp_path,
        f'[profile]\nextends = "web-server"\n[landlock]\nmay_lack = {json.dumps(missing)}\n',
        name="gaps-tolerant",
    )
    plan = prepare_on_abi(monkeypatch, tmp_path, tolerant, abi)
    # The ruleset is really built for that ABI (this kernel accepts older ABIs' rights).
    assert plan.landlock is not None
    assert plan.landlock.handled_fs == landlock.handled_fs(abi)
    for feature in missing:
        assert any(f"landlock: {feature} missing" in note for note in plan.notes), plan.notes


@pytest.mark.parametrize("abi", [1, 2, 5])
def test_builtin_profiles_on_an_older_kernel(monkeypatch, tmp_path, abi):
    """Which built-ins run where the ABI is old (the reasons are in runtime/profiles/*.toml)."""
    for name in ("ci-runner", "batch-job", "development"):
        plan = prepare_on_abi(monkeypatch, tmp_path, profiles.load_profile(name), abi)
        assert plan.landlock is not None, name
    with pytest.raises(security.SecurityLayerError, match="scope needs Landlock ABI 6"):
        prepare_on_abi(monkeypatch, tmp_path, profiles.load_profile("web-server"), abi)


def test_a_profile_without_scope_or_ports_does_not_ask_for_them(monkeypatch, tmp_path):
    profile = custom_profile(
        tmp_path,
        '[profile]\nextends = "hostile-tenant"\n[landlock]\nscope = false\n'
        'device_ioctl = ["/"]\nmay_lack = ["truncate"]\n',
    )
    verdicts = {g.feature: g.verdict for g in kernel_gaps.decide(profile, 2, True)}
    assert verdicts == {
        "truncate": "missing, allowed",
        "tcp_ports": "not asked",
        "device_ioctl": "not asked",
        "scope": "not asked",
        "wait_killable_recv": "not asked",
    }
    assert prepare_on_abi(monkeypatch, tmp_path, profile, 2).landlock is not None


def test_profile_list_marks_the_builtins_this_kernel_refuses(monkeypatch, capsys):
    from runtime.security import profile_cli

    monkeypatch.setattr(landlock, "abi_version", lambda: 4)  # a stand-in for Linux 6.7
    assert profile_cli.run(type("Args", (), {"profile_command": "list"})()) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert listed["hostile-tenant"].endswith("[refused on this kernel, lacks: device_ioctl, scope]")
    assert listed["web-server"].endswith("[refused on this kernel, lacks: scope]")
    assert "refused" not in listed["ci-runner"] + listed["batch-job"] + listed["development"]


def test_may_lack_names_are_checked(tmp_path):
    with pytest.raises(InvalidArgument, match=r"landlock\.may_lack\[1\]: unknown feature"):
        custom_profile(tmp_path, '[landlock]\nmay_lack = ["truncate", "trunc"]\n')
    with pytest.raises(InvalidArgument, match=r"broker\.may_lack\[0\]: unknown feature"):
        custom_profile(tmp_path, '[broker]\nmay_lack = ["truncate"]\n')


# --- SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (Linux 5.19) ---


def test_wait_killable_recv_is_probed_without_loading_a_filter():
    release = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    assert seccomp.wait_killable_recv_supported() is (release >= (5, 19))
    with open("/proc/self/status") as f:
        assert "Seccomp:\t0" in f.read()  # the probe loaded nothing on the test process


def test_load_never_drops_wait_killable_recv_silently(monkeypatch):
    """A kernel refusing the flag (stand-in: EINVAL injected) must not get the listener
    without it: before the fix, load() retried without the flag and returned the fd."""
    calls = []

    def kernel_before_5_19(name, *args, detail=None):
        flags = args[1].value
        calls.append(flags)
        if flags & seccomp.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return 99  # a listener fd, as the kernel would return without the flag

    monkeypatch.setattr(linux, "raw_syscall", kernel_before_5_19)
    program = seccomp.profile_program(profiles.load_profile("web-server"))
    assert program.flags & seccomp.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    with pytest.raises(security.SecurityLayerError, match="Invalid argument"):
        seccomp.load(program)
    assert len(calls) == 1


def test_a_mediating_profile_refuses_without_wait_killable_recv(monkeypatch, tmp_path):
    with pytest.raises(security.SecurityLayerError) as refused:
        prepare_on_abi(
            monkeypatch, tmp_path, profiles.load_profile("web-server"), 7, wait_killable_recv=False
        )
    message = str(refused.value)
    assert "wait_killable_recv needs Linux 5.19" in message
    assert "a signal restarts a mediated call the broker still performs" in message
    assert '[broker] may_lack = ["wait_killable_recv"]' in message


def test_a_tolerant_profile_loads_the_listener_without_the_flag(monkeypatch, tmp_path):
    tolerant = custom_profile(
        tmp_path, '[profile]\nextends = "web-server"\n[broker]\nmay_lack = ["wait_killable_recv"]\n'
    )
    plan = prepare_on_abi(monkeypatch, tmp_path, tolerant, 7, wait_killable_recv=False)
    listeners = [p for p in plan.programs if p.listener]
    assert listeners and not listeners[0].flags & seccomp.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    assert listeners[0].flags & seccomp.SECCOMP_FILTER_FLAG_NEW_LISTENER
    assert any("broker: wait_killable_recv missing" in note for note in plan.notes)
    # With the flag, the same profile keeps it.
    plan = prepare_on_abi(monkeypatch, tmp_path, tolerant, 7, wait_killable_recv=True)
    assert [p for p in plan.programs if p.listener][0].flags & (
        seccomp.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    )


def test_verbose_alone_runs_without_the_flag(monkeypatch, tmp_path):
    """--verbose only logs and answers EPERM: a replayed denial performs nothing."""
    monkeypatch.setattr(seccomp, "wait_killable_recv_supported", lambda: False)
    plan = security.prepare(
        spec_without_namespaces(tmp_path), profiles.load_profile("ci-runner"), verbose=True
    )
    plan.landlock.close()
    assert [p for p in plan.programs if p.listener]


# --- the real older kernel: Debian's 6.1 (Landlock ABI 2) under QEMU ---


@pytest.fixture(scope="module")
def guest():
    reason = missing_requirements()
    if reason:
        pytest.skip(f"no 6.1 guest: {reason}")
    with open(GUEST_SCRIPT) as f:
        rc, output = run_in_v2_vm(f.read(), timeout=170)
    assert rc == 0, f"guest script failed (rc {rc}):\n{output[-4000:]}"
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"guest printed no RESULT line:\n{output[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def test_older_kernel_in_the_v2_guest(guest):
    assert guest["abi"] == 2, guest
    refused = guest["refused"]
    assert refused["rc"] != 0, refused
    assert "profile gaps-strict asks for what this kernel lacks" in refused["err"], refused
    assert "truncate needs Landlock ABI 3, this kernel has ABI 2" in refused["err"], refused
    assert refused["out"] == "", "the workload ran"
    allowed = guest["allowed"]
    assert allowed["rc"] == 0, allowed
    assert allowed["out"].strip() == "workload ran", allowed
    shown = guest["check"]
    assert shown["rc"] == 0, shown
    assert "kernel: Landlock ABI 2" in shown["out"]
    assert "landlock.truncate" in shown["out"] and "refused" in shown["out"]
    listed = {line.split()[0]: line for line in guest["list"]["out"].splitlines()}
    assert (
        "refused on this kernel, lacks: truncate, device_ioctl, scope" in listed["hostile-tenant"]
    )
    assert "refused on this kernel, lacks: scope" in listed["web-server"]
    assert "refused" not in listed["ci-runner"] + listed["batch-job"] + listed["development"]


# --- the suspicion itself, on this kernel: what the flag prevents ---

_BPF_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
SECCOMP_RET_USER_NOTIF, SECCOMP_RET_ALLOW = 0x7FC00000, 0x7FFF0000
NR_GETPPID = 110  # x86_64


def _notify_getppid_filter() -> bytes:
    return b"".join(
        (
            _BPF_INSN.pack(0x20, 0, 0, 0),  # ld seccomp_data.nr
            _BPF_INSN.pack(0x15, 0, 1, NR_GETPPID),  # jeq getppid ? next : allow
            _BPF_INSN.pack(0x06, 0, 0, SECCOMP_RET_USER_NOTIF),
            _BPF_INSN.pack(0x06, 0, 0, SECCOMP_RET_ALLOW),
        )
    )


def _received_then_stopped(flags: int) -> dict:
    """A child makes one notified call; the supervisor receives it, then the child is
    stopped and continued (SIGSTOP/SIGCONT) before the supervisor answers."""
    import ctypes
    import select
    import signal
    import socket
    import time

    from runtime.security.broker import core

    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            parent_end.close()
            linux.set_no_new_privs()
            bpf = ctypes.create_string_buffer(_notify_getppid_filter())
            prog = seccomp._SockFprog(len(bpf.raw) // 8, ctypes.cast(bpf, ctypes.c_void_p))
            listener = linux.raw_syscall(
                "seccomp", ctypes.c_uint(1), ctypes.c_uint(flags), ctypes.byref(prog)
            )
            socket.send_fds(child_end, [b"l"], [listener])
            os.close(listener)
            libc = ctypes.CDLL(None, use_errno=True)
            result = libc.syscall(NR_GETPPID)
            child_end.send(b"%d" % result)
        finally:
            os._exit(0)
    child_end.close()
    _, fds, _, _ = socket.recv_fds(parent_end, 16, 1)
    listener = fds[0]
    notes = []
    try:

        def receive(timeout: float):
            if not select.select([listener], [], [], timeout)[0]:
                return None
            buf = bytearray(core.NOTIF.size)
            try:
                fcntl.ioctl(listener, core.NOTIF_RECV, buf)
            except FileNotFoundError:
                return None  # readable because the child is gone: no task uses the filter
            return core.NOTIF.unpack(bytes(buf))[0]

        first = receive(10)
        assert first is not None, "the notified call never arrived"
        notes.append(first)
        os.kill(pid, signal.SIGSTOP)
        # SIGCONT before the stop is taken would discard it: wait until the child is
        # stopped (it never is with the flag: its wait ignores all but SIGKILL).
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and procstat.state(pid) != "T":
            time.sleep(0.01)
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.3)
        # The supervisor performs the call now and answers it: 4242 as the result.
        try:
            fcntl.ioctl(listener, core.NOTIF_SEND, core.RESP.pack(first, 4242, 0, 0))
            first_answered = True
        except OSError as e:
            first_answered = e.errno != errno.ENOENT
        replay = receive(1)
        if replay is not None:
            notes.append(replay)
            fcntl.ioctl(listener, core.NOTIF_SEND, core.RESP.pack(replay, 4343, 0, 0))
        seen = parent_end.recv(64).decode()
    finally:
        os.close(listener)
        parent_end.close()
        os.waitpid(pid, 0)
    return {"notifications": len(notes), "first_answered": first_answered, "child": seen}


@pytest.mark.skipif(
    not seccomp.wait_killable_recv_supported(), reason="the kernel lacks WAIT_KILLABLE_RECV"
)
def test_without_wait_killable_recv_a_signal_replays_a_received_call():
    """Confirms the suspicion on this kernel: without the flag (what load() fell back to
    before 5.19), a stop/continue after the broker received a call restarts it: the
    broker's answer finds no caller (its call was performed for nothing) and the same
    call arrives a second time. With the flag the first answer is the caller's."""
    new_listener = seccomp.SECCOMP_FILTER_FLAG_NEW_LISTENER
    without = _received_then_stopped(new_listener)
    assert without == {"notifications": 2, "first_answered": False, "child": "4343"}
    with_flag = _received_then_stopped(
        new_listener | seccomp.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    )
    assert with_flag == {"notifications": 1, "first_answered": True, "child": "4242"}
