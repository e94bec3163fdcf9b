"""runtime.commands.ForwardedSignals (issue 16): what `zviz run`, `exec` and `profile
learn` do with a signal, before, while and after the process they wait for runs.
The real runs are integration/reliability/test_interrupted.py; here, plain children."""

import os
import signal
import subprocess
import sys

import pytest

from runtime.commands import _FORWARDED, ForwardedSignals


@pytest.fixture
def signals():
    saved = {sig: signal.getsignal(sig) for sig in _FORWARDED}
    try:
        yield ForwardedSignals()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_signal_before_the_process_exists_is_sent_once_it_does(signals):
    os.kill(os.getpid(), signal.SIGTERM)  # would have ended this process: kept instead
    assert signals.missed == [signal.SIGTERM]
    assert signals.stop_signal() == signal.SIGTERM
    child = _sleeper()
    signals.forward_to(child.pid)
    assert child.wait(timeout=30) == -signal.SIGTERM


def test_a_signal_while_the_workload_runs_is_its_own(signals):
    child = _sleeper()
    signals.forward_to(child.pid, running=False)
    signals.starting()
    os.kill(os.getpid(), signal.SIGINT)
    assert child.wait(timeout=30) == -signal.SIGINT
    signals.target_exited()
    assert signals.stop_signal() is None  # the workload took it: nothing to stop


def test_a_signal_between_create_and_start_stops_and_still_reaches_pid1(signals):
    child = _sleeper()
    signals.forward_to(child.pid, running=False)
    os.kill(os.getpid(), signal.SIGHUP)
    assert child.wait(timeout=30) == -signal.SIGHUP
    assert signals.stop_signal() == signal.SIGHUP


def test_a_signal_after_the_exit_stops_the_caller(signals):
    child = _sleeper()
    signals.forward_to(child.pid)
    child.kill()
    child.wait(timeout=30)
    signals.target_exited()
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.stop_signal() == signal.SIGTERM
    os.kill(os.getpid(), signal.SIGWINCH)  # not terminating: no stop of its own
    assert signals.missed == [signal.SIGTERM, signal.SIGWINCH]


def test_a_child_forked_with_the_handler_gets_the_default_action(signals):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, b"x")
        signal.pause()
        os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 1) == b"x"
    os.close(read_end)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert signals.missed == []  # the parent's object saw nothing of it
