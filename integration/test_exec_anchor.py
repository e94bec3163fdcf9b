"""The exec anchor (runtime/exec_anchor.py, issue 11 item 4), through `zviz run -d` and
`zviz exec`: an exec forked inside PID 1's Landlock domain still behaves, for its caller,
as the process `zviz exec` started: its exit code and signal death, its pid (a signal to
it reaches the exec, SIGKILL included), its terminal. An exec that asks for something
PID 1 lacks, or a container whose anchor the workload killed, takes the old path and
works. The anchor ends with its container. integration/test_exec_domain.py has what the
anchor is for (/proc/1/fd/1, /proc/1/environ); security/test_exec_anchor.py what the
workload cannot do to it.
"""

import os
import signal
import socket
import subprocess
import time

import pytest

from integration.ids import tagged
from integration.zviz_cli import Zviz, edit_config, leftovers, unique_id
from runtime import procstat

IDLE = "echo started; while :; do sleep 0.1; done"
# The anchor inside the container: the zviz-anchor whose parent is PID 1 (its monitors,
# one per running exec, are its own children and carry the same name).
ANCHOR_IN_CONTAINER = (
    'for p in $(pidof zviz-anchor); do [ "$(cut -d" " -f4 /proc/$p/stat)" = 1 ] && echo $p; done'
)


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


@pytest.fixture
def running(zviz, make_bundle):
    """The id of a detached container running IDLE; deleted after, nothing left."""
    container_id = unique_id("zviz-anchor")
    bundle = make_bundle(["sh", "-c", IDLE])
    try:
        start(zviz, bundle, container_id)
        yield container_id
    finally:
        zviz("delete", "--force", container_id)
        assert leftovers(container_id, zviz.root) == []


def start(zviz, bundle: str, container_id: str) -> None:
    """create + start: PID 1 keeps /dev/null as its stdio, not a pipe we would wait on."""
    created = zviz.create(bundle, container_id)
    assert created.returncode == 0, created.stderr
    started = zviz("start", container_id)
    assert started.returncode == 0, started.stderr


def anchor_host_pid(zviz, container_id) -> int:
    """The anchor's pid on the host: PID 1's child named zviz-anchor."""
    pid1 = zviz.state(container_id)["pid"]
    with open(f"/proc/{pid1}/task/{pid1}/children") as f:
        children = [int(p) for p in f.read().split()]
    for child in children:
        with open(f"/proc/{child}/comm") as f:
            if f.read().strip() == "zviz-anchor":
                return child
    raise AssertionError(f"PID 1 ({pid1}) has no zviz-anchor child: {children}")


def test_an_exec_is_forked_by_the_anchor_in_pid_1s_domain(zviz, running):
    executed = zviz(
        "exec", running, "sh", "-c",
        "cat /proc/$PPID/comm; cat /proc/1/environ >/dev/null && echo environ",
    )  # fmt: skip
    assert executed.returncode == 0, executed.stderr
    # Its parent is the anchor's monitor for this exec, not a runtime process.
    assert executed.stdout.split() == ["zviz-anchor", "environ"], executed.stderr


def test_an_execs_exit_code_and_signal_death_are_its_callers(zviz, running):
    assert zviz("exec", running, "sh", "-c", "exit 7").returncode == 7
    assert zviz("exec", running, "sh", "-c", "kill -9 $$").returncode == 128 + signal.SIGKILL
    assert zviz("exec", running, "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    missing = zviz("exec", running, "s5-no-such-program")
    assert missing.returncode != 0
    assert "executable file not found" in missing.stderr, missing.stderr


def _runs(zviz, container_id, marker: str) -> bool:
    listed = zviz("exec", container_id, "ps", "-o", "args")
    assert listed.returncode == 0, listed.stderr
    return any(line.strip() == f"sleep {marker}" for line in listed.stdout.splitlines())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_exec_pid_reaches_what_the_anchor_forked(zviz, running, tmp_path, sig):
    # The pid `zviz exec --pid-file` (and the shim, for `ctr task kill --exec-id`) knows
    # is the runtime's stand-in: TERM is forwarded, KILL ends the stand-in and the
    # anchor's monitor kills the exec when the stand-in's channel closes.
    marker = str(1000 + sig)
    pid_file = str(tmp_path / "exec.pid")
    # Detached: the exec keeps its stdio, so not a pipe we would wait on.
    started = subprocess.run(
        [zviz.binary, "--root", zviz.root, "exec", "-d", "--pid-file", pid_file, running]
        + ["sleep", marker],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    assert started.returncode == 0
    with open(pid_file) as f:
        stand_in = int(f.read())
    assert _runs(zviz, running, marker)
    os.kill(stand_in, sig)
    deadline = time.monotonic() + 10
    while _runs(zviz, running, marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _runs(zviz, running, marker)


def test_a_signal_to_zviz_exec_reaches_the_exec(zviz, running):
    waiting = zviz.popen(
        "exec", running, "sh", "-c", "trap 'exit 42' TERM; echo up; sleep 1000 & wait"
    )
    try:
        assert waiting.stdout.readline().strip() == "up"
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(timeout=20) == 42
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()


def test_an_exec_as_another_user_takes_the_old_path(zviz, running):
    # Its parent is then the runtime's process outside the container's pid namespace.
    executed = zviz(
        "--debug", "exec", "--user", "1000:1000", running, "sh", "-c", "id -u; echo ppid $PPID"
    )
    assert executed.returncode == 0, executed.stderr
    assert executed.stdout.split() == ["1000", "ppid", "0"], executed.stdout
    assert "a Landlock domain of its own: its user differs" in executed.stderr, executed.stderr


def test_the_workload_killing_the_anchor_makes_execs_fall_back(zviz, running):
    killed = zviz("exec", running, "sh", "-c", f"kill -9 $({ANCHOR_IN_CONTAINER})")
    assert killed.returncode == 0, killed.stderr
    executed = zviz(
        "--debug", "exec", running, "sh", "-c",
        "echo works; cat /proc/1/environ >/dev/null 2>&1 || echo sibling-domain",
    )  # fmt: skip
    assert executed.returncode == 0, executed.stderr
    assert executed.stdout.split() == ["works", "sibling-domain"], executed.stderr
    assert "no exec anchor" in executed.stderr, executed.stderr


OLD_PATH_PROBE = "echo works; cat /proc/1/environ >/dev/null 2>&1 || echo sibling-domain"


def test_the_workload_stopping_the_anchor_makes_execs_fall_back_within_seconds(zviz, running):
    # The same user as the anchor, the workload may SIGSTOP it: an exec then gives up on
    # it after exec_anchor.ANSWER_TIMEOUT (not the 60 s setup timeout) and runs the old way.
    stopped = zviz("exec", running, "sh", "-c", f"kill -STOP $({ANCHOR_IN_CONTAINER})")
    assert stopped.returncode == 0, stopped.stderr
    assert procstat.state(anchor_host_pid(zviz, running)) == "T"
    for _ in range(2):  # the second too: the first's request left in its queue is harmless
        began = time.monotonic()
        executed = zviz("--debug", "exec", running, "sh", "-c", OLD_PATH_PROBE)
        took = time.monotonic() - began
        assert executed.returncode == 0, executed.stderr
        assert executed.stdout.split() == ["works", "sibling-domain"], executed.stderr
        assert "the exec anchor did not answer within" in executed.stderr, executed.stderr
        assert took < 15, took


def test_an_anchor_killed_while_an_exec_waits_for_it_makes_that_exec_fall_back(zviz, running):
    anchor = anchor_host_pid(zviz, running)
    os.kill(anchor, signal.SIGSTOP)
    began = time.monotonic()
    executing = zviz.popen("--debug", "exec", running, "sh", "-c", OLD_PATH_PROBE)
    try:
        time.sleep(0.3)  # most likely its request is queued by now; either way it must work
        os.kill(anchor, signal.SIGKILL)
        out, err = executing.communicate(timeout=30)
    finally:
        if executing.poll() is None:
            executing.kill()
            executing.wait()
    assert executing.returncode == 0, err
    assert out.split() == ["works", "sibling-domain"], err
    assert "closed the request unanswered" in err or "no exec anchor" in err, err
    assert time.monotonic() - began < 15


def test_the_anchor_ends_with_its_container(zviz, make_bundle):
    container_id = unique_id("zviz-anchor")
    bundle = make_bundle(["sh", "-c", IDLE])
    try:
        start(zviz, bundle, container_id)
        anchor = anchor_host_pid(zviz, container_id)
        # Every fd but its socket closed: nothing of PID 1's or the runtime's held.
        assert len(os.listdir(f"/proc/{anchor}/fd")) == 1, os.listdir(f"/proc/{anchor}/fd")
    finally:
        deleted = zviz("delete", "--force", container_id)
    assert deleted.returncode == 0, deleted.stderr
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{anchor}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{anchor}")
    assert leftovers(container_id, zviz.root) == []


def terminal_exec(zviz, container_id, tmp_path, script: str) -> tuple[list[str], int, str]:
    """`zviz exec -t` through a console socket we listen on: (the pty's output split in
    words, the exit code, stderr); exactly one pty comes to the socket."""
    path = str(tmp_path / "console.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(2)
    executing = zviz.popen(
        "--debug", "exec", "-t", "--console-socket", path, container_id, "sh", "-c", script
    )
    try:
        listener.settimeout(20)
        conn, _ = listener.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        master = fds[0]
        output = b""
        deadline = time.monotonic() + 10
        try:
            # Until the exec is gone (EIO): closing the master earlier hangs it up.
            while time.monotonic() < deadline:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(master)
        code = executing.wait(timeout=20)
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()  # no second connection: one pty
        stderr = executing.stderr.read()
    finally:
        listener.close()
        if executing.poll() is None:
            executing.kill()
            executing.wait()
    return output.decode(errors="replace").split(), code, stderr


TERMINAL_SCRIPT = (
    "tty; [ $(cut -d' ' -f6 /proc/self/stat) = $$ ] && echo session-leader; "
    "cat /proc/$PPID/comm 2>/dev/null || echo no-parent-here; sleep 0.2; exit 3"
)


def test_a_terminal_exec_gets_its_own_pty_as_controlling_terminal(zviz, running, tmp_path):
    lines, code, stderr = terminal_exec(zviz, running, tmp_path, TERMINAL_SCRIPT)
    assert code == 3, stderr
    assert lines[0].startswith("/dev/pts/"), lines
    assert lines[1:3] == ["session-leader", "zviz-anchor"], lines


def test_a_terminal_exec_into_a_container_whose_anchor_is_stopped_gets_one_pty(
    zviz, running, tmp_path
):
    # The pty goes to the console socket only once the anchor answered: the fallback makes
    # the one pty the caller gets.
    os.kill(anchor_host_pid(zviz, running), signal.SIGSTOP)
    lines, code, stderr = terminal_exec(zviz, running, tmp_path, TERMINAL_SCRIPT)
    assert code == 3, stderr
    assert lines[0].startswith("/dev/pts/"), lines
    assert lines[1:3] == ["session-leader", "no-parent-here"], lines  # the old path
    assert "the exec anchor did not answer within" in stderr, stderr


def test_an_exec_in_a_container_with_a_small_pids_limit_takes_the_old_path(zviz, make_bundle):
    # The anchor and a monitor per exec count in pids.max: below exec_anchor.MIN_PIDS_LIMIT
    # PID 1 starts none, and its few processes stay the workload's.
    container_id = unique_id("zviz-anchor")
    bundle = make_bundle(["sh", "-c", IDLE])
    edit_config(bundle, lambda c: c["linux"].setdefault("resources", {}).update(pids={"limit": 4}))
    try:
        start(zviz, bundle, container_id)
        executed = zviz(
            "--debug", "exec", container_id, "sh", "-c", "pidof zviz-anchor || echo none"
        )
        assert executed.returncode == 0, executed.stderr
        assert executed.stdout.split() == ["none"], executed.stdout
        assert "no exec anchor" in executed.stderr, executed.stderr
    finally:
        zviz("delete", "--force", container_id)
    assert leftovers(container_id, zviz.root) == []


def test_zviz_exec_served_by_the_fork_server_goes_through_the_anchor(zviz, running):
    # A plain `zviz exec` is one the fork server serves (runtime/forkserver.py): its worker
    # runs the same Container.exec. The first may start the server (the client then says
    # "slow path" under --debug); a later one is served.
    for _ in range(5):
        executed = zviz("--debug", "exec", running, "sh", "-c", "cat /proc/$PPID/comm")
        assert executed.returncode == 0, executed.stderr
        assert executed.stdout.split() == ["zviz-anchor"], executed.stderr
        if "slow path" not in executed.stderr:
            return
        time.sleep(0.5)
    pytest.fail(f"no exec was served by the fork server: {executed.stderr}")


def test_an_exec_before_start_takes_the_old_path(zviz, make_bundle):
    # PID 1 forks the anchor at start; a request queued before would wait for it.
    container_id = unique_id("zviz-anchor")
    created = zviz.create(make_bundle(["sh", "-c", IDLE]), container_id)
    assert created.returncode == 0, created.stderr
    try:
        executed = zviz("--debug", "exec", container_id, "echo", "before-start")
        assert executed.returncode == 0, executed.stderr
        assert executed.stdout == "before-start\n"
        assert "the container is created: no exec anchor yet" in executed.stderr
    finally:
        zviz("delete", "--force", container_id)
    assert leftovers(container_id, zviz.root) == []
