"""runtime/procstat.py: /proc/PID/stat read by proc(5)'s field numbers, whatever the
process named itself."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from runtime import procstat

# A name that fakes the fields after it: split on spaces, the state would read "Z" and
# the parent 1.
HOSTILE_NAME = "x) Z 1 (y"


def test_parse_numbers_fields_as_proc5_does():
    fields = procstat.parse("42 (a) b) S 7 42 42 0 -1\n")
    assert fields[1] == "42"
    assert fields[procstat.COMMAND] == "a) b"
    assert fields[procstat.STATE] == "S"
    assert fields[procstat.PARENT] == "7"
    assert fields[procstat.PROCESS_GROUP] == fields[procstat.SESSION] == "42"


def test_parse_refuses_text_without_a_command():
    with pytest.raises(ValueError, match="not a /proc/PID/stat line"):
        procstat.parse("")


def test_read_self():
    fields = procstat.read()
    assert int(fields[1]) == os.getpid()
    assert procstat.parent(os.getpid()) == os.getppid()
    assert procstat.state("self") == "R"
    assert int(fields[procstat.NICE]) == os.getpriority(os.PRIO_PROCESS, 0)


def test_a_process_cannot_fake_its_fields_by_its_name():
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            f"open('/proc/self/comm', 'w').write({HOSTILE_NAME!r})\n"
            "print('named', flush=True)\n"
            "time.sleep(30)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "named\n"
        assert procstat.read(child.pid)[procstat.COMMAND] == HOSTILE_NAME
        assert procstat.parent(child.pid) == os.getpid()
        assert procstat.state(child.pid) == "S"
    finally:
        child.kill()
        child.wait()


def test_a_process_that_is_gone_raises_oserror():
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(OSError):
        procstat.read(child.pid)


def test_descendants_walk_the_tree_below_a_process():
    # sh forks sleep and waits: a child and a grandchild of this process.
    child = subprocess.Popen(["sh", "-c", "sleep 30; true"])
    try:
        deadline = time.monotonic() + 10
        while not procstat.children().get(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        [grandchild] = procstat.children()[child.pid]
        found = dict(procstat.descendants(os.getpid()))
        assert found[os.getpid()] == 0
        assert found[child.pid] == 1
        assert found[grandchild] == 2
        assert procstat.descendants(child.pid) == [(child.pid, 0), (grandchild, 1)]
    finally:
        child.kill()
        child.wait()
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)
