"""The broker's warden (runtime/security/broker/warden.py): runtime/broker_warden.c driven
on its own with a pipe and the pidfd of a sleeping child standing for the broker, then
fork_warden from a forked stand-in broker, with the compiled warden and with the Python
one it falls back to. tests/test_security_broker.py and integration/ have it guarding
real brokers."""

import os
import signal
import subprocess
import sys
import time

import pytest

from runtime import linux, static_programs
from runtime.security.broker import warden

TIMEOUT_MS = 300


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    built = static_programs.build(str(tmp_path_factory.mktemp("warden-bin")), warden.BINARY_NAME)
    if built is None:
        pytest.skip("no C compiler or no static libc (libc6-dev): the warden is not built")
    return built


@pytest.fixture
def broker():
    """A sleeping child standing for the broker: the warden gets its pidfd."""
    sleeper = subprocess.Popen(["sleep", "60"])
    yield sleeper
    sleeper.kill()
    sleeper.wait()


class Warden:
    """broker_warden.c exec'd with its three fds (3 beats, 4 pidfd, 5 started)."""

    def __init__(self, binary: str, broker_pid: int, layout: str = f"{warden.LAYOUT:x}"):
        beats, self.beat = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        pidfd = linux.pidfd_open(broker_pid)
        started, started_w = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.beat)
                os.close(started)
                high = [os.dup(fd) for fd in (beats, pidfd, started_w)]
                for number, fd in zip((3, 4, 5), high, strict=True):
                    os.dup2(fd, number)
                linux.close_range(6)
                os.execv(binary, [warden.BINARY_NAME, layout, str(TIMEOUT_MS), "--", "shown"])
            finally:
                os._exit(127)
        for fd in (beats, pidfd, started_w):
            os.close(fd)
        self.status: int | None = None
        self.started = b""
        while chunk := os.read(started, 16):
            self.started += chunk
        os.close(started)

    def exit_status(self, seconds: float = 5.0) -> int | None:
        """The warden's exit code, waited for up to SECONDS; None while it runs."""
        deadline = time.monotonic() + seconds
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= deadline:
                break
            else:
                time.sleep(0.01)
        return self.status

    def close(self) -> None:
        if self.beat >= 0:
            os.close(self.beat)
            self.beat = -1
        if self.exit_status(0) is None:
            os.kill(self.pid, signal.SIGKILL)
            self.exit_status()


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def own_cmdline() -> list[bytes]:
    with open("/proc/self/cmdline", "rb") as f:
        return f.read().split(b"\0")


def killed_within(process: subprocess.Popen, seconds: float) -> bool:
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        return False
    return process.returncode == -signal.SIGKILL


def test_it_starts_and_holds_only_the_pipe_and_the_broker_pidfd(binary, broker):
    running = Warden(binary, broker.pid)
    try:
        assert running.started == b"ok"
        assert sorted(map(int, os.listdir(f"/proc/{running.pid}/fd"))) == [3, 4]
        with open(f"/proc/{running.pid}/comm") as f:
            assert f.read().strip() == "zviz-warden"
        assert os.readlink(f"/proc/{running.pid}/exe") == os.path.realpath(binary)
    finally:
        running.close()


def test_no_deadline_before_the_first_beat_then_a_stall_is_killed(binary, broker):
    running = Warden(binary, broker.pid)
    try:
        # Between create and start the broker does not beat: never killed for that.
        assert not killed_within(broker, 3 * TIMEOUT_MS / 1000)
        os.write(running.beat, b".")
        beaten = time.monotonic()
        assert killed_within(broker, 5), "no SIGKILL after the broker stopped beating"
        waited = time.monotonic() - beaten
        assert TIMEOUT_MS / 1000 * 0.9 <= waited < TIMEOUT_MS / 1000 + 2, waited
        assert running.exit_status() == 0
    finally:
        running.close()


def test_beats_keep_the_broker_alive_and_end_of_file_ends_the_warden(binary, broker):
    running = Warden(binary, broker.pid)
    try:
        for _ in range(12):  # 1.2 s: four timeouts, a beat every third of one
            os.write(running.beat, b".")
            time.sleep(TIMEOUT_MS / 3000)
        assert broker.poll() is None, "killed although it beat"
        os.close(running.beat)  # the broker exited
        running.beat = -1
        assert running.exit_status() == 0
        assert broker.poll() is None
    finally:
        running.close()


def test_a_warden_built_for_another_layout_refuses_and_says_nothing(binary, broker):
    refused = Warden(binary, broker.pid, layout="7a76772f")
    try:
        assert refused.started == b""  # the broker forks its Python warden instead
        assert refused.exit_status() == 2
        assert broker.poll() is None
    finally:
        refused.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python-fallback"])
def test_fork_warden_guards_the_broker_that_forked_it(binary, tmp_path, monkeypatch, compiled):
    """A forked stand-in broker calls fork_warden, beats once, then stalls: its warden
    (the compiled one, or without the binary the Python one, saying why) kills it."""
    path = binary if compiled else str(tmp_path / "no-such-warden")
    monkeypatch.setattr(warden, "binary_path", lambda: path)
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    stand_in = os.fork()
    if stand_in == 0:
        try:
            os.close(report_r)
            os.close(go_w)
            said = []
            beat = warden.fork_warden(TIMEOUT_MS / 1000, said.append)
            os.write(report_w, ("\n".join(said) or "-").encode())
            os.close(report_w)
            os.read(go_r, 1)
            os.write(beat, b".")
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(go_r)
    try:
        said = os.read(report_r, 4096).decode()
        with open(f"/proc/{stand_in}/task/{stand_in}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        assert len(children) == 1, children
        guard = children[0]
        # The Python warden names itself after closing the broker's fds (the compiled one
        # before its "ok", which fork_warden waited for).
        deadline = time.monotonic() + 10
        while comm(guard) != "zviz-warden":
            assert time.monotonic() < deadline, comm(guard)
            time.sleep(0.01)
        fds = sorted(map(int, os.listdir(f"/proc/{guard}/fd")))
        exe = os.readlink(f"/proc/{guard}/exe")
        with open(f"/proc/{guard}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        if compiled:
            assert said == "-"
            assert exe == os.path.realpath(binary)
            assert fds == [3, 4]
            # The stand-in broker's command line follows: found by it as before.
            assert cmdline[3] == b"--" and cmdline[4:] == own_cmdline()
        else:
            assert said == f"warden: the Python warden runs (no compiled warden at {path})"
            assert exe == os.path.realpath(sys.executable)
            assert len(fds) == 5 and fds[:3] == [0, 1, 2], fds  # and the pipe, the pidfd
        os.write(go_w, b"g")
        beaten = time.monotonic()
        _, status = os.waitpid(stand_in, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert time.monotonic() - beaten < TIMEOUT_MS / 1000 + 2
    finally:
        os.close(report_r)
        os.close(go_w)
        try:
            os.kill(stand_in, signal.SIGKILL)
            os.waitpid(stand_in, 0)
        except (ChildProcessError, ProcessLookupError):
            pass
