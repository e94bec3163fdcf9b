"""creating -> created -> running -> stopped: the create/start split, kill and delete from every state."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from integration.ids import tagged
from integration.reliability import harness
from integration.zviz_cli import Zviz, edit_config, leftovers, unique_id


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def wait_for_status(zviz, container_id: str, wanted: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = zviz.state(container_id)
        if state["status"] == wanted:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"{container_id} stayed {state['status']}, never {wanted}")
        time.sleep(0.05)


@pytest.fixture
def created(zviz, make_bundle, tmp_path):
    """A container in `created`, PID 1 waiting on the exec fifo; deleted afterwards."""
    container_id = unique_id()
    output = tmp_path / "out.txt"
    with open(output, "w") as out:
        script = "echo started; trap 'echo term; exit 3' TERM; while :; do sleep 0.1; done"
        result = zviz.create(
            make_bundle(["sh", "-c", script]),
            container_id,
            "--pid-file",
            str(tmp_path / "pid"),
            stdout=out,
        )
    assert result.returncode == 0, result.stderr
    yield container_id, output, tmp_path / "pid"
    zviz("delete", "--force", container_id)
    assert leftovers(container_id, zviz.root) == []


def test_create_then_start_runs_the_workload_only_at_start(zviz, created):
    container_id, output, pid_file = created
    state = zviz.state(container_id)
    assert state["status"] == "created"
    assert state["pid"] == int(pid_file.read_text())
    assert os.path.exists(f"/proc/{state['pid']}")
    time.sleep(0.2)
    assert output.read_text() == ""  # PID 1 waits on the exec fifo: nothing ran yet
    assert zviz("start", container_id).returncode == 0
    assert wait_for_status(zviz, container_id, "running")["pid"] == state["pid"]
    deadline = time.monotonic() + 10
    while "started" not in output.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert output.read_text().startswith("started")


def test_start_twice_fails_clearly(zviz, created):
    container_id, _, _ = created
    assert zviz("start", container_id).returncode == 0
    again = zviz("start", container_id)
    assert again.returncode == 1
    assert "not created" in again.stderr or "already started" in again.stderr


def test_state_json_has_runc_fields(zviz, created):
    container_id, _, _ = created
    state = zviz.state(container_id)
    for key in ("ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "owner"):
        assert key in state
    assert state["id"] == container_id
    assert state["created"].endswith("Z")


def test_kill_running_container_reaches_pid1_and_state_reports_stopped(zviz, created):
    container_id, output, _ = created
    assert zviz("start", container_id).returncode == 0
    wait_for_status(zviz, container_id, "running")
    deadline = time.monotonic() + 10
    while "started" not in output.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert zviz("kill", container_id, "TERM").returncode == 0
    wait_for_status(zviz, container_id, "stopped")
    assert "term" in output.read_text()
    # A stopped container refuses signals the way runc does (the shim matches this text).
    again = zviz("kill", container_id, "KILL")
    assert again.returncode == 1
    assert "container not running" in again.stderr


def test_kill_created_container(zviz, created):
    container_id, _, _ = created
    assert zviz("kill", container_id, "KILL").returncode == 0
    wait_for_status(zviz, container_id, "stopped")
    assert zviz("delete", container_id).returncode == 0
    assert zviz("state", container_id).returncode == 1


def test_delete_created_container_without_force(zviz, created):
    container_id, _, _ = created
    pid = zviz.state(container_id)["pid"]
    assert zviz("delete", container_id).returncode == 0
    assert leftovers(container_id, zviz.root) == []
    deadline = time.monotonic() + 10
    while harness.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not harness.alive(pid)


def test_delete_running_needs_force(zviz, created):
    container_id, _, _ = created
    assert zviz("start", container_id).returncode == 0
    refused = zviz("delete", container_id)
    assert refused.returncode == 1
    assert "not stopped" in refused.stderr
    assert zviz.state(container_id)["status"] == "running"
    assert zviz("delete", "--force", container_id).returncode == 0
    assert leftovers(container_id, zviz.root) == []


def test_pause_resume_and_delete_paused(zviz, created):
    container_id, _, _ = created
    assert zviz("start", container_id).returncode == 0
    assert zviz("pause", container_id).returncode == 0
    assert zviz.state(container_id)["status"] == "paused"
    assert zviz("pause", container_id).returncode == 1
    assert zviz("resume", container_id).returncode == 0
    assert zviz.state(container_id)["status"] == "running"
    assert zviz("pause", container_id).returncode == 0
    assert zviz("delete", "--force", container_id).returncode == 0
    assert leftovers(container_id, zviz.root) == []


def test_stopped_state_reports_exit_status_while_unreaped(zviz, make_bundle):
    container_id = unique_id()
    assert zviz.create(make_bundle(["sh", "-c", "exit 5"]), container_id).returncode == 0
    try:
        assert zviz("start", container_id).returncode == 0
        state = wait_for_status(zviz, container_id, "stopped")
        # Init (not zviz) reaps this one; the status is only known while it is a zombie.
        if "exitStatus" in state:
            assert state["exitStatus"] == 5
    finally:
        assert zviz("delete", container_id).returncode == 0
    assert leftovers(container_id, zviz.root) == []


def test_ps_list_and_exec(zviz, created):
    container_id, _, _ = created
    assert zviz("start", container_id).returncode == 0
    pid = wait_for_status(zviz, container_id, "running")["pid"]
    ps = zviz("ps", "--format", "json", container_id)
    assert ps.returncode == 0, ps.stderr
    assert pid in json.loads(ps.stdout)
    table = zviz("ps", container_id)
    assert table.returncode == 0 and "PID" in table.stdout.splitlines()[0]
    listing = json.loads(zviz("list", "--format", "json").stdout)
    assert [c["id"] for c in listing] == [container_id]
    assert container_id in zviz("list").stdout
    executed = zviz(
        "exec", container_id, "sh", "-c", "echo $$; hostname; cat /proc/1/cmdline | tr '\\0' ' '"
    )
    assert executed.returncode == 0, executed.stderr
    lines = executed.stdout.splitlines()
    assert int(lines[0]) > 1  # in the container's pid namespace, not PID 1
    assert "while" in lines[2]  # sees the container's PID 1
    failing = zviz("exec", container_id, "sh", "-c", "exit 9")
    assert failing.returncode == 9


def test_exec_process_file_and_detach(zviz, created, tmp_path):
    container_id, _, _ = created
    assert zviz("start", container_id).returncode == 0
    process = {
        "args": ["sh", "-c", "echo from-exec > /dev/shm/marker"],
        "cwd": "/",
        "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0},
    }
    (tmp_path / "process.json").write_text(json.dumps(process))
    result = zviz(
        "exec",
        "--process",
        str(tmp_path / "process.json"),
        "--detach",
        "--pid-file",
        str(tmp_path / "exec.pid"),
        container_id,
    )
    assert result.returncode == 0, result.stderr
    assert int((tmp_path / "exec.pid").read_text()) > 0
    deadline = time.monotonic() + 10
    while zviz("exec", container_id, "cat", "/dev/shm/marker").stdout != "from-exec\n":
        assert time.monotonic() < deadline, "the detached exec never ran"
        time.sleep(0.05)


def test_errors_go_to_the_log_as_json(zviz, tmp_path):
    log = str(tmp_path / "log.json")
    result = zviz("state", "no-such-container", log=log)
    assert result.returncode == 1
    lines = [json.loads(line) for line in open(log)]
    assert lines[-1]["level"] == "error"
    assert "does not exist" in lines[-1]["msg"]
    assert lines[-1]["time"]


def test_unknown_signal_is_rejected(zviz, created):
    container_id, _, _ = created
    result = zviz("kill", container_id, "NOSUCHSIG")
    assert result.returncode == 1
    assert "unknown signal" in result.stderr
    assert zviz.state(container_id)["status"] == "created"


def test_run_detached_then_kill_all(zviz, make_bundle):
    container_id = unique_id()
    result = subprocess.run(
        [
            zviz.binary,
            "--root",
            zviz.root,
            "run",
            "--detach",
            "--bundle",
            make_bundle(["sleep", "60"]),
            container_id,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    assert result.returncode == 0
    assert zviz.state(container_id)["status"] == "running"
    assert zviz("kill", "--all", container_id, str(int(signal.SIGKILL))).returncode == 0
    wait_for_status(zviz, container_id, "stopped")
    assert zviz("delete", container_id).returncode == 0
    assert leftovers(container_id, zviz.root) == []


def test_console_socket_receives_the_pty_master(zviz, make_bundle, tmp_path):
    """As runc: the pty master arrives over --console-socket; the workload's stdio is the slave."""
    container_id = unique_id()
    bundle = make_bundle(["sh", "-c", "tty; echo on-the-pty"])
    edit_config(bundle, lambda c: c["process"].update(terminal=True))
    path = str(tmp_path / "console.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        result = zviz.create(bundle, container_id, "--console-socket", path)
        assert result.returncode == 0, result.stderr
        conn, _ = listener.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        assert len(fds) == 1
        master = fds[0]
        try:
            assert zviz("start", container_id).returncode == 0
            output = b""
            deadline = time.monotonic() + 10
            while b"on-the-pty" not in output and time.monotonic() < deadline:
                try:
                    output += os.read(master, 4096)
                except OSError:
                    break
            text = output.decode(errors="replace")
            assert "/dev/pts/" in text
            assert "on-the-pty" in text
        finally:
            os.close(master)
    finally:
        listener.close()
        zviz("delete", "--force", container_id)
    assert leftovers(container_id, zviz.root) == []


def test_detached_terminal_without_console_socket_is_refused(zviz, make_bundle):
    container_id = unique_id()
    bundle = make_bundle(["true"])
    edit_config(bundle, lambda c: c["process"].update(terminal=True))
    result = zviz.create(bundle, container_id)
    assert result.returncode == 1
    assert "console-socket" in result.stderr
    assert leftovers(container_id, zviz.root) == []


def test_pid_file_in_a_missing_directory_is_a_clear_error_and_leaves_nothing(
    zviz, make_bundle, tmp_path
):
    container_id = unique_id()
    pid_file = tmp_path / "no-such-dir" / "pid"
    result = zviz.create(make_bundle(["true"]), container_id, "--pid-file", str(pid_file))
    assert result.returncode == 1
    assert f"--pid-file {pid_file}: No such file or directory" in result.stderr
    assert "internal error" not in result.stderr
    assert zviz("state", container_id).returncode == 1
    assert leftovers(container_id, zviz.root) == []
