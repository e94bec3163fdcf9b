"""`zviz run`: a real container on this kernel, PID 1 of fresh namespaces, exit codes passed through."""

import ctypes
import os
import signal
import socket
import time

import pytest

from integration.ids import tagged
from integration.zviz_cli import Zviz, leftovers, unique_id
from runtime import linux, procstat


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def test_workload_is_pid1_with_the_configured_hostname(zviz, make_bundle):
    bundle = make_bundle(["sh", "-c", "echo pid=$$; hostname"], hostname="zviz-rt-host")
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pid=1", "zviz-rt-host"]
    assert socket.gethostname() != "zviz-rt-host"


def test_host_processes_are_invisible(zviz, make_bundle):
    bundle = make_bundle(["sh", "-c", "ls /proc | grep -c '^[0-9]'"])
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    # Only the shell, the ls/grep it spawned and the exec anchor PID 1 forked
    # (runtime/exec_anchor.py): never the host's hundreds.
    assert int(result.stdout.strip()) <= 4


def test_host_mounts_are_invisible(zviz, make_bundle):
    bundle = make_bundle(["cat", "/proc/self/mountinfo"])
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    mountpoints = {line.split()[4] for line in result.stdout.splitlines()}
    assert "/" in mountpoints and "/proc" in mountpoints
    assert not any(m.startswith(("/work", "/run/zviz", "/tmp/")) for m in mountpoints), mountpoints


def test_network_is_private(zviz, make_bundle):
    bundle = make_bundle(["cat", "/proc/net/dev"])
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    interfaces = {line.split(":")[0].strip() for line in result.stdout.splitlines()[2:]}
    assert interfaces == {"lo"}


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_code_is_passed_through(zviz, make_bundle, code):
    result = zviz.run(make_bundle(["sh", "-c", f"exit {code}"]))
    assert result.returncode == code, result.stderr


def test_killed_workload_exits_137(zviz, make_bundle):
    container_id = unique_id()
    run = zviz.popen("run", "--bundle", make_bundle(["sleep", "60"]), container_id)
    _wait_for_status(zviz, container_id, "running")
    assert zviz("kill", container_id, "KILL").returncode == 0
    assert run.wait(timeout=30) == 137
    assert leftovers(container_id, zviz.root) == []


def test_signals_to_run_reach_pid1(zviz, make_bundle):
    container_id = unique_id()
    script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    run = zviz.popen("run", "--bundle", make_bundle(["sh", "-c", script]), container_id)
    assert run.stdout.readline().strip() == "ready"
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=30)
    assert run.returncode == 7
    assert "got-term" in out


def test_env_cwd_user_and_umask(zviz, make_bundle):
    bundle = make_bundle(["sh", "-c", "echo $GREETING; pwd; id -u; id -g; id -G; umask"])
    from integration.zviz_cli import edit_config

    def change(config):
        config["process"]["env"].append("GREETING=hello")
        config["process"]["cwd"] = "/tmp"
        config["process"]["user"] = {
            "uid": 1000,
            "gid": 1001,
            "additionalGids": [1002],
            "umask": 0o27,
        }

    edit_config(bundle, change)
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[:4] == ["hello", "/tmp", "1000", "1001"]
    assert set(lines[4].split()) == {"1001", "1002"}
    assert lines[5] == "0027"


def test_rlimits_are_applied(zviz, make_bundle):
    from integration.zviz_cli import edit_config

    bundle = make_bundle(["sh", "-c", "ulimit -n"])
    edit_config(
        bundle,
        lambda c: c["process"].update(
            rlimits=[{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 321}]
        ),
    )
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "321"


def test_oom_score_adj_is_set_by_the_parent(zviz, make_bundle):
    # Written by the parent: inside its user namespace PID 1's /proc files are host root's.
    from integration.zviz_cli import edit_config

    bundle = make_bundle(["sh", "-c", "cat /proc/self/oom_score_adj"])
    edit_config(bundle, lambda c: c["process"].update(oomScoreAdj=500))
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "500"


def test_missing_executable_is_a_clear_error_and_leaves_nothing(zviz, make_bundle):
    container_id = unique_id()
    result = zviz.run(make_bundle(["/no/such/binary"]), container_id)
    assert result.returncode == 1
    assert "/no/such/binary" in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(container_id, zviz.root) == []


def test_invalid_config_is_a_clear_error_and_leaves_nothing(zviz, make_bundle):
    from integration.zviz_cli import edit_config

    container_id = unique_id()
    bundle = make_bundle()
    edit_config(bundle, lambda c: c["process"].update(cwd="relative/dir"))
    result = zviz.run(bundle, container_id)
    assert result.returncode == 1
    assert "process.cwd" in result.stderr
    assert leftovers(container_id, zviz.root) == []


def test_run_accepts_bundle_as_second_argument(zviz, make_bundle):
    bundle = make_bundle(["true"])
    result = zviz("run", unique_id(), bundle)
    assert result.returncode == 0, result.stderr


def test_duplicate_id_is_refused(zviz, make_bundle):
    container_id = unique_id()
    assert zviz.create(make_bundle(["true"]), container_id).returncode == 0
    try:
        second = zviz.create(make_bundle(["true"]), container_id)
        assert second.returncode == 1
        assert "already exists" in second.stderr
    finally:
        assert zviz("delete", "--force", container_id).returncode == 0
    assert leftovers(container_id, zviz.root) == []


def _wait_for_status(zviz, container_id: str, wanted: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        result = zviz("state", container_id)
        if result.returncode == 0:
            import json

            state = json.loads(result.stdout)
            if state["status"] == wanted:
                return state
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{container_id} never became {wanted}: {result.stdout} {result.stderr}"
            )
        time.sleep(0.05)


def test_no_file_descriptor_of_zviz_reaches_the_workload(zviz, make_bundle):
    bundle = make_bundle(["sh", "-c", "ls /proc/self/fd"])
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    # 0, 1, 2, and the fd ls opened to read the directory.
    assert sorted(int(fd) for fd in result.stdout.split()) == [0, 1, 2, 3]
    assert os.path.isdir(zviz.root)


def test_namespace_with_path_is_joined_not_created(zviz, make_bundle):
    from integration.zviz_cli import edit_config

    first = unique_id()
    assert zviz.create(make_bundle(["sleep", "60"]), first).returncode == 0
    try:
        pid = zviz.state(first)["pid"]
        theirs = os.readlink(f"/proc/{pid}/ns/ipc")
        bundle = make_bundle(["sh", "-c", "readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts"])

        def change(config):
            for ns in config["linux"]["namespaces"]:
                if ns["type"] == "ipc":
                    ns["path"] = f"/proc/{pid}/ns/ipc"

        edit_config(bundle, change)
        result = zviz.run(bundle)
        assert result.returncode == 0, result.stderr
        ipc, uts = result.stdout.split()
        assert ipc == theirs
        assert uts != os.readlink(f"/proc/{pid}/ns/uts")  # the others are still fresh
    finally:
        assert zviz("delete", "--force", first).returncode == 0


def test_fork_server_and_direct_runs_behave_alike(zviz, make_bundle):
    """The `zviz run` fast path (runtime/forkserver.py) against the plain path, same bundle."""
    import subprocess

    from runtime import forkserver

    bundle = make_bundle(["sh", "-c", "echo out; echo err >&2; exit 5"])
    zviz.run(bundle)  # starts the server if none runs
    socket_path = forkserver.socket_path(
        (forkserver.install_identity(), forkserver.process_identity("self"))
    )
    deadline = time.monotonic() + 10
    while not os.path.exists(socket_path):
        assert time.monotonic() < deadline, "the fork server never started"
        time.sleep(0.05)
    fast = zviz.run(bundle)
    env = dict(os.environ, ZVIZ_NO_FORKSERVER="1")
    direct = subprocess.run(
        [zviz.binary, "--root", zviz.root, "run", "--bundle", bundle, unique_id()],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (fast.returncode, fast.stdout, fast.stderr) == (5, "out\n", "err\n")
    assert (direct.returncode, direct.stdout, direct.stderr) == (5, "out\n", "err\n")
    assert os.listdir(zviz.root) == []


def test_workload_starts_with_no_ignored_signals(zviz, make_bundle):
    """Python ignores SIGPIPE/SIGXFSZ and a caller may ignore more (nohup): none of it leaks in."""
    import signal as signals
    import subprocess

    def ignore_hangup_and_interrupt():
        signals.signal(signals.SIGHUP, signals.SIG_IGN)
        signals.signal(signals.SIGINT, signals.SIG_IGN)
        # glibc's reserved signal 32, which Python's signal module cannot even name.
        ignore = ctypes.create_string_buffer((1).to_bytes(8, "little"), 32)  # SIG_IGN
        linux.raw_syscall("rt_sigaction", ctypes.c_int(32), ignore, None, ctypes.c_size_t(8))

    result = subprocess.run(
        [
            zviz.binary,
            "--root",
            zviz.root,
            "run",
            "--bundle",
            make_bundle(["cat", "/proc/self/status"]),
            unique_id(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=ignore_hangup_and_interrupt,
        env=dict(os.environ, ZVIZ_NO_FORKSERVER="1"),
    )
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":\t", 1) for line in result.stdout.splitlines() if ":\t" in line)
    assert int(fields["SigIgn"], 16) == 0
    assert int(fields["SigBlk"], 16) == 0


def test_fork_server_refuses_a_client_of_another_install(tmp_path):
    """Even on its socket, a server hands back a client whose install identity differs."""
    import subprocess
    import sys

    from runtime import forkserver

    directory = str(tmp_path / "servers")
    server = subprocess.Popen(
        [sys.executable, "-c", f"from runtime import forkserver; forkserver.serve({directory!r})"],
        cwd=os.path.dirname(os.path.dirname(forkserver.__file__)),
    )
    try:
        mine = (forkserver.install_identity(), forkserver.process_identity("self"))
        path = os.path.join(directory, os.path.basename(forkserver.socket_path(mine)))
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert server.poll() is None, "the fork server exited"
            assert time.monotonic() < deadline, "the fork server never listened"
            time.sleep(0.05)
        other_install = (mine[0][0], "/tmp/other-clone/runtime", mine[0][2])
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.connect(path)
            request = (forkserver.ZVIZ_ENTRY, "/", ["zviz", "run", "x"], [])
            forkserver.send_request(client, other_install, request, (0, 1, 2))
            assert client.recv(4096) == b"fallback another install"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize(
    "placement",
    [
        ["--profile=hostile-tenant", "run"],
        ["--profile", "hostile-tenant", "--verbose", "run"],
        ["run", "--profile", "hostile-tenant"],
        ["--profile", "ci-runner", "run", "--profile=hostile-tenant"],
    ],
)
def test_profile_given_before_or_after_the_command(zviz, make_bundle, placement):
    """The README's `zviz --profile=NAME run ...` and run's own flag: the same container."""
    # the container's own pids.max: in its pids hierarchy on v1, at its cgroup root on v2
    pids_max = "cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max"
    bundle = make_bundle(["sh", "-c", f"cat /proc/self/uid_map; {pids_max}"])
    result = zviz(*placement, "--bundle", bundle, unique_id())
    assert result.returncode == 0, result.stderr
    uid_map, pids_max = result.stdout.splitlines()
    assert uid_map.split() == ["0", "200000", "65536"]  # hostile-tenant, not ci-runner's 100000
    assert pids_max == "64"


def test_installed_zviz_hands_a_plain_run_to_the_fork_server(zviz, make_bundle):
    """`zviz` (after `make install` the compiled client, runtime/forkserver_client.c)
    computes the server's socket name and request exactly as runtime/forkserver.py reads
    them: PID 1's supervisor is a worker forked by the server, also with --profile first."""
    from runtime import forkserver

    zviz.run(make_bundle(["true"]))  # starts the server if none runs
    socket_path = forkserver.socket_path(
        (forkserver.install_identity(), forkserver.process_identity("self"))
    )
    deadline = time.monotonic() + 10
    while not os.path.exists(socket_path):
        assert time.monotonic() < deadline, "the fork server never started"
        time.sleep(0.05)
    container_id = unique_id()
    run = zviz.popen(
        "--profile", "ci-runner", "run", "--bundle", make_bundle(["sleep", "60"]), container_id
    )
    try:
        pid1 = _wait_for_status(zviz, container_id, "running")["pid"]
        supervisor = procstat.parent(pid1)
        with open(f"/proc/{procstat.parent(supervisor)}/cmdline", "rb") as f:
            assert b"runtime.forkserver" in f.read()
        with open(f"/proc/{supervisor}/cmdline", "rb") as f:
            assert f.read().rstrip(b"\0").split(b"\0")[-1] == container_id.encode()  # retitled
    finally:
        zviz("kill", container_id, "KILL")
        run.wait(timeout=30)
    assert run.returncode == 137, run.stderr.read()
    assert leftovers(container_id, zviz.root) == []
