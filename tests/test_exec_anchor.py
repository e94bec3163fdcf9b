"""runtime/exec_anchor.c driven on its own (no container, any user): the request layout
runtime/exec_anchor.py sends, the monitor's answers, who is served, and the exec killed
when the caller's channel closes. integration/test_exec_anchor.py has it in containers."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from runtime import exec_anchor, procstat
from runtime.spec import Process, User


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    built = exec_anchor.build(str(tmp_path_factory.mktemp("anchor-bin")))
    if built is None:
        pytest.skip("no C compiler or no static libc (libc6-dev): the anchor is not built")
    return built


def stop(process: subprocess.Popen) -> None:
    """SIGSTOP the anchor and wait until it is stopped: a request sent before then might
    still be taken."""
    os.kill(process.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if procstat.state(process.pid) == "T":
            return
        time.sleep(0.01)
    raise AssertionError("the anchor did not stop")


def start_anchor(binary: str, state_dir: str, served_uid: int) -> subprocess.Popen:
    sock = exec_anchor._bind(state_dir)
    try:
        return subprocess.Popen(
            [binary, str(sock), str(served_uid), "0", str(os.getpid())], pass_fds=[sock]
        )
    finally:
        os.close(sock)


@pytest.fixture(autouse=True)
def built_binary_is_the_installed_one(request, monkeypatch):
    """A test using `binary` runs the anchor and stand-in built here, not one installed
    beside the interpreter (a venv made without `make install`, as the uid-65534 run's,
    has none)."""
    if "binary" in request.fixturenames:
        built = request.getfixturevalue("binary")
        monkeypatch.setattr(exec_anchor, "binary_path", lambda: built)


@pytest.fixture
def anchor(binary, tmp_path):
    process = start_anchor(binary, str(tmp_path), os.geteuid())
    yield str(tmp_path)
    process.kill()
    process.wait()


def send(state_dir: str, args) -> int:
    """Send ARGS as a request; our end of its reply channel."""
    process = Process(args=list(args), cwd="/", env=["PATH=/usr/bin:/bin"], user=User())
    connected, binary, anchor_dir = exec_anchor.connect(state_dir, os.getpid())
    os.close(binary)
    if anchor_dir >= 0:
        os.close(anchor_dir)
    try:
        return exec_anchor.send_request(connected, process, False)
    finally:
        os.close(connected)


def request(state_dir: str, args, stdout: int, cwd: str = "/") -> socket.socket:
    """Send ARGS as a request, with /dev/null as stdin and stderr, as the exec child does
    (the request, "ready", the stdio); the caller's channel, "go" said on it."""
    process = Process(args=list(args), cwd=cwd, env=["PATH=/usr/bin:/bin"], user=User())
    null = os.open(os.devnull, os.O_RDWR)
    connected, binary, anchor_dir = exec_anchor.connect(state_dir, os.getpid())
    os.close(binary)
    try:
        channel = exec_anchor.send_request(connected, process, False)
        try:
            exec_anchor.await_ready(channel, anchor_dir)
            exec_anchor.send_stdio(channel, (null, stdout, null))
        except BaseException:
            os.close(channel)
            raise
    finally:
        os.close(connected)
        os.close(null)
        if anchor_dir >= 0:
            os.close(anchor_dir)
    conn = socket.socket(fileno=channel)
    conn.settimeout(10)
    conn.send(b"go")
    return conn


def test_an_exec_runs_with_its_stdio_and_its_wait_status_comes_back(anchor):
    read_end, write_end = os.pipe()
    conn = request(anchor, ["sh", "-c", "echo from-exec; exit 3"], write_end)
    os.close(write_end)
    with conn:
        pid = conn.recv(64).decode()
        assert pid.startswith("pid "), pid
        assert conn.recv(64).decode() == f"exit {3 << 8}"
    assert os.read(read_end, 100) == b"from-exec\n"
    os.close(read_end)


def test_a_signal_death_is_a_signal_status(anchor):
    with request(anchor, ["sh", "-c", "kill -TERM $$"], 1) as conn:
        assert conn.recv(64).decode().startswith("pid ")
        assert conn.recv(64).decode() == f"exit {signal.SIGTERM}"


def test_a_missing_program_or_cwd_is_an_error_with_its_errno_and_stage(anchor):
    with request(anchor, ["s5-no-such-program"], 1) as conn:
        assert conn.recv(64).decode() == "error 2 exec"
    with request(anchor, ["true"], 1, cwd="/s5-no-such-dir") as conn:
        assert conn.recv(64).decode() == "error 2 cwd"


def test_the_exec_is_killed_when_the_callers_channel_closes(anchor):
    conn = request(anchor, ["sleep", "1000"], 1)
    pid = int(conn.recv(64).decode().split()[1])
    assert os.path.exists(f"/proc/{pid}")
    conn.close()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, -2)]
)
def test_the_stand_in_forwards_signals_and_dies_as_the_exec(anchor, binary, sig, status):
    conn = request(anchor, ["sleep", "1000"], 1)
    pid = int(conn.recv(64).decode().split()[1])
    pidfd = os.pidfd_open(pid)
    stand_in = subprocess.Popen(
        [binary, "--stand-in", str(conn.fileno()), str(pidfd)], pass_fds=[conn.fileno(), pidfd]
    )
    conn.close()
    os.close(pidfd)
    time.sleep(0.2)  # its handlers installed (a signal before then is its own death, too)
    stand_in.send_signal(sig)
    assert stand_in.wait(timeout=10) == status
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}")


def test_the_stand_in_exits_with_the_execs_code(anchor, binary):
    conn = request(anchor, ["sh", "-c", "exit 9"], 1)
    assert conn.recv(64).decode().startswith("pid ")
    stand_in = subprocess.Popen(
        [binary, "--stand-in", str(conn.fileno()), "-1"], pass_fds=[conn.fileno()]
    )
    conn.close()
    assert stand_in.wait(timeout=10) == 9


def test_a_sender_that_is_not_the_served_uid_gets_nothing(binary, tmp_path):
    # The anchor in a container serves host root only; here, a uid that is not ours.
    process = start_anchor(binary, str(tmp_path), os.geteuid() + 1)
    try:
        marker = tmp_path / "ran"
        # Its end is closed unanswered: the exec child takes the old path.
        with pytest.raises(exec_anchor.Unanswered, match="closed the request unanswered"):
            request(str(tmp_path), ["touch", str(marker)], 1)
        assert not marker.exists()
    finally:
        process.kill()
        process.wait()


def test_a_stopped_anchor_is_unanswered_within_the_deadline_and_runs_nothing_later(
    binary, tmp_path
):
    # The workload, the same user, may SIGSTOP its anchor: the exec child gives up after
    # the deadline (and falls back) rather than waiting for the 60 s setup timeout.
    process = start_anchor(binary, str(tmp_path), os.geteuid())
    try:
        marker = tmp_path / "ran"
        stop(process)
        channel = send(str(tmp_path), ["touch", str(marker)])
        began = time.monotonic()
        with pytest.raises(exec_anchor.Unanswered, match="did not answer within 0.5 s"):
            exec_anchor.await_ready(channel, timeout=0.5)
        assert time.monotonic() - began < 5
        os.close(channel)  # as the exec child exits
        # Continued, its late monitor finds the channel closed and forks nothing.
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.5)
        assert not marker.exists()
        with request(str(tmp_path), ["true"], 1) as conn:
            assert conn.recv(64).decode().startswith("pid "), "the anchor serves again"
    finally:
        process.kill()
        process.wait()


def test_the_anchor_is_found_among_pid_1s_children_and_its_stop_is_seen(binary, tmp_path):
    # Here the test process stands for PID 1: the anchor is its child.
    process = start_anchor(binary, str(tmp_path), os.geteuid())
    helper = subprocess.Popen(["sleep", "100"])  # a child of another name, not taken
    anchor_dir = exec_anchor.find(os.getpid())
    try:
        assert anchor_dir >= 0
        comm, state, parent = exec_anchor._stat(anchor_dir)
        assert (comm, parent) == ("zviz-anchor", os.getpid())
        assert state in "RS"  # starting, or waiting for requests
        stop(process)
        channel = send(str(tmp_path), ["true"])
        try:
            with pytest.raises(exec_anchor.Unanswered, match=r"within 0.3 s \(stopped\)"):
                exec_anchor.await_ready(channel, anchor_dir, timeout=0.3)
        finally:
            os.close(channel)
    finally:
        if anchor_dir >= 0:
            os.close(anchor_dir)
        helper.kill()
        helper.wait()
        process.kill()
        process.wait()
    assert exec_anchor.find(os.getpid()) == -1  # no anchor among the children now


def test_an_anchor_seen_running_is_waited_for_up_to_the_limit(binary, tmp_path):
    # Slow, not stopped (a CPU-throttled container): the wait goes on past the first
    # deadline. Stood in for by a stopped anchor whose /proc entry reads as a running
    # process's (a sleeping `sleep`), continued after the first deadline.
    process = start_anchor(binary, str(tmp_path), os.geteuid())
    running = subprocess.Popen(["sleep", "100"])
    seen_running = os.open(f"/proc/{running.pid}", os.O_RDONLY | os.O_DIRECTORY)
    try:
        stop(process)
        channel = send(str(tmp_path), ["true"])
        try:
            with pytest.raises(exec_anchor.Unanswered, match=r"\(running\)"):
                exec_anchor.await_ready(channel, seen_running, timeout=0.2, limit=0.7)
        finally:
            os.close(channel)
        channel = send(str(tmp_path), ["true"])
        continued = threading.Timer(0.6, os.kill, (process.pid, signal.SIGCONT))
        continued.start()
        try:
            exec_anchor.await_ready(channel, seen_running, timeout=0.2, limit=20)
        finally:
            continued.join()
            os.close(channel)
    finally:
        os.close(seen_running)
        running.kill()
        running.wait()
        process.kill()
        process.wait()


def test_an_anchor_killed_with_the_request_queued_is_unanswered_at_once(binary, tmp_path):
    process = start_anchor(binary, str(tmp_path), os.geteuid())
    stop(process)
    channel = send(str(tmp_path), ["true"])
    try:
        process.kill()
        process.wait()
        began = time.monotonic()
        # Its socket dies with it, and the queued request with our channel's other end.
        with pytest.raises(exec_anchor.Unanswered, match="closed the request unanswered"):
            exec_anchor.await_ready(channel, timeout=30)
        assert time.monotonic() - began < 5
    finally:
        os.close(channel)


def test_requests_to_a_stopped_anchor_never_block_when_its_queue_is_full(binary, tmp_path):
    # net.unix.max_dgram_qlen (10 by default) requests fill a stopped anchor's queue; the
    # next send would wait for as long as it stays stopped.
    process = start_anchor(binary, str(tmp_path), os.geteuid())
    channels = []
    try:
        stop(process)
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            queue = int(f.read())
        with pytest.raises(exec_anchor.Unanswered, match="could not be sent"):
            for _ in range(queue + 5):
                channels.append(send(str(tmp_path), ["true"]))
    finally:
        process.kill()
        process.wait()
        for channel in channels:
            os.close(channel)


def test_the_anchor_exits_when_its_parent_is_gone_before_it_starts(binary, tmp_path):
    # PDEATHSIG is set only once it runs: a parent already gone is seen by getppid.
    sock = exec_anchor._bind(str(tmp_path))
    try:
        gone = subprocess.run([binary, str(sock), "0", "0", "1"], pass_fds=[sock], timeout=10)
    finally:
        os.close(sock)
    assert gone.returncode == 0


def test_the_request_header_is_the_c_structs():
    assert exec_anchor.HEADER.size == 20  # five uint32: magic, flags, umask, argc, envc
    body = exec_anchor.encode(Process(args=["a", "b"], cwd="/w", env=["X=1"]), True)
    magic, flags, _, argc, envc = exec_anchor.HEADER.unpack_from(body)
    assert (magic, flags, argc, envc) == (exec_anchor.MAGIC, exec_anchor.FLAG_TERMINAL, 2, 1)
    assert body[exec_anchor.HEADER.size :] == b"/w\0a\0b\0X=1\0"


def test_without_a_compiler_no_anchor_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert exec_anchor.build(str(tmp_path)) is None


def test_vfork_only_where_every_filter_allows_it_outright():
    """may_vfork: a vfork a filter refuses or logs would be a denial record in every
    container (PID 1 forks then); the built-in profiles allow it."""
    from dataclasses import replace

    from runtime.security import profiles

    ci = profiles.load_profile("ci-runner")
    assert "subprocess" in sys.modules  # imported above, as the shim has it
    for name in profiles.list_profiles():
        assert exec_anchor.may_vfork(profiles.load_profile(name), None), name
    without = replace(ci, allow=tuple(n for n in ci.allow if n != "vfork"))
    assert not exec_anchor.may_vfork(without, None)
    assert not exec_anchor.may_vfork(replace(ci, deny=(*ci.deny, "vfork")), None)
    assert not exec_anchor.may_vfork(replace(ci, mediate=("vfork",)), None)
    allow_all = {"defaultAction": "SCMP_ACT_ALLOW"}
    assert exec_anchor.may_vfork(ci, allow_all)
    assert not exec_anchor.may_vfork(ci, {"defaultAction": "SCMP_ACT_ERRNO"})
    listed = {"names": ["fork", "vfork"], "action": "SCMP_ACT_ALLOW"}
    oci = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [listed]}
    assert exec_anchor.may_vfork(ci, oci)
    refused = {"names": ["vfork"], "action": "SCMP_ACT_LOG"}
    assert not exec_anchor.may_vfork(ci, {**allow_all, "syscalls": [refused]})
    argued = {**listed, "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}
    assert not exec_anchor.may_vfork(ci, {**oci, "syscalls": [argued]})
