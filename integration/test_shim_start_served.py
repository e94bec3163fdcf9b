"""The shim's `start` and `delete` served by the fork server (runtime/forkserver.py,
SHIM_ENTRY), driven by real containerd 1.6 and 2.x with `ctr run`.

containerd runs the shim binary given as an absolute path (`ctr run --runtime PATH`):
here a compiled shim client built by forkserver.compile_client exactly as `make
install` builds it, whose Python entry is a stand-in that logs each slow-path call and
then execs the install's real one. A start or delete that reaches the log was not
served; a served start must leave the same daemon behind, with the environment
containerd gave the start (not the fork server's), a served delete the same cleanup
and the same answer as an unserved one, and everything they answer must be intact.
"""

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from integration.ids import tagged, unique_id
from integration.test_shim_containerd import _remove, _shim_pid, _task_state, _wait_task_state
from runtime import forkserver, procstat
from shim import config as shim_config

pytestmark = [pytest.mark.containerd, pytest.mark.every_containerd]

# A variable only the fork server this module starts has: a served start's daemon must
# not see it (the worker takes containerd's environment).
SERVER_MARK = "ZVIZ_TEST_SERVER_ONLY"
# Each container its own daemon: a start that finds its group's daemon running launches none.
PER_CONTAINER = 'grouping = "container"\nidle_exit_seconds = 0\n'
UNSERVED_SHIM = r"""
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char *args[argc + 2];
    args[0] = "%(python)s";
    args[1] = "%(script)s";
    for (int i = 1; i <= argc; i++)
        args[i + 1] = argv[i];
    setenv("ZVIZ_NO_FORKSERVER", "1", 1);
    execv(args[0], args);
    return 127;
}
"""
# A shim that keeps what each call of SHIM answered on stdout (REPLIES/KIND-N.out, its
# arguments in .args, both complete once .done exists) and passes it on to containerd.
KEEP_REPLY = """#!/bin/sh
reply=$(mktemp %(replies)s/%(kind)s-XXXXXXXX)
echo "$*" > "$reply.args"
%(shim)s "$@" > "$reply.out"
code=$?
cat "$reply.out"
touch "$reply.done"
exit $code
"""
# The fields of /proc/PID/status a served and an unserved start's daemon must share.
SAME_STATUS = (
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "PPid",
)


def _server_path() -> str:
    return forkserver.socket_path(
        (forkserver.install_identity(), forkserver.process_identity("self"))
    )


def _server_pid() -> int | None:
    """The fork server of this install in our namespaces and cgroup (containerd's too)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        try:
            probe.connect(_server_path())
        except OSError:
            return None
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return struct.unpack("3i", creds)[0]


def _stop_server() -> None:
    pid = _server_pid()
    if pid:
        os.kill(pid, signal.SIGKILL)  # the socket stays behind: a stale one, as after a crash
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)


def _start_server(env_extra: dict) -> int:
    """A fork server of this install with ENV_EXTRA in its environment; its pid."""
    _stop_server()
    package_parent = os.path.dirname(os.path.dirname(os.path.realpath(forkserver.__file__)))
    subprocess.Popen(
        [sys.executable, "-m", "runtime.forkserver", forkserver._TITLE_ROOM],
        cwd=package_parent,
        env=dict(os.environ, **env_extra),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while (pid := _server_pid()) is None:
        assert time.monotonic() < deadline, "the fork server never listened"
        time.sleep(0.05)
    return pid


@pytest.fixture(scope="module")
def shims():
    """{"client": the compiled shim client, "unserved": a shim that never uses the server,
    "log": the slow-path log, "config": a per-container grouping config}."""
    directory = tempfile.mkdtemp(prefix=tagged("zviz-served-") + "-")
    os.chmod(directory, 0o755)
    log = os.path.join(directory, "slow-path.log")
    real = forkserver.python_entry(forkserver.scripts_dir(), forkserver.SHIM_ENTRY)
    stand_in = os.path.join(directory, "containerd-shim-zviz-v2-python")
    with open(stand_in, "w") as f:
        f.write(f'#!/bin/sh\necho "$*" >> {log}\nexec {sys.executable} {real} "$@"\n')
    os.chmod(stand_in, 0o755)
    client = os.path.join(directory, "containerd-shim-zviz-v2")
    assert forkserver.compile_client(client, stand_in, entry=forkserver.SHIM_ENTRY) == client
    # The unserved shim: the real Python entry with ZVIZ_NO_FORKSERVER=1 and nothing else
    # changed (a shell would also set PWD in the environment the daemon inherits).
    unserved = os.path.join(directory, "unserved-shim")
    source = unserved + ".c"
    with open(source, "w") as f:
        f.write(UNSERVED_SHIM % {"python": sys.executable, "script": real})
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-o", unserved, source], check=True)
    config = os.path.join(directory, "per-container.toml")
    with open(config, "w") as f:
        f.write(PER_CONTAINER)
    open(log, "w").close()
    replies = os.path.join(directory, "replies")
    os.mkdir(replies)
    keeping = {}
    for kind, shim in (("served", client), ("unserved", unserved)):
        keeping[kind] = os.path.join(directory, f"keeping-{kind}")
        with open(keeping[kind], "w") as f:
            f.write(KEEP_REPLY % {"shim": shim, "replies": replies, "kind": kind})
        os.chmod(keeping[kind], 0o755)
    try:
        yield {
            "client": client,
            "unserved": unserved,
            "log": log,
            "config": config,
            "keeping": keeping,
            "replies": replies,
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _slow_calls(shims, action: str) -> list[str]:
    """The shim command lines with ACTION that went to the Python entry (not served)."""
    with open(shims["log"]) as f:
        return [line for line in f.read().splitlines() if line.endswith(" " + action)]


def _slow_starts(shims) -> list[str]:
    return _slow_calls(shims, "start")


def _run(containerd, image, runtime, container_id, *args, flags=(), detach=False):
    return containerd.ctr(
        "run",
        *(["-d"] if detach else ["--rm"]),
        "--runtime",
        runtime,
        *flags,
        image,
        container_id,
        *args,
        check=False,
        timeout=120,
    )


def test_ctr_run_through_the_served_start_keeps_output_and_exit_codes(
    containerd, busybox_image, shims
):
    _start_server({})
    before = len(_slow_starts(shims))
    for code in (0, 3):
        container_id = unique_id("zviz-served")
        try:
            result = _run(
                containerd,
                busybox_image,
                shims["client"],
                container_id,
                "sh",
                "-c",
                f"echo out-{code}; echo err-{code} >&2; exit {code}",
            )
        finally:
            _remove(containerd, container_id)
        assert result.returncode == code, result.stderr
        assert result.stdout == f"out-{code}\n"
        assert f"err-{code}" in result.stderr
    assert len(_slow_starts(shims)) == before, "a start went the slow path with a server up"


def test_grouping_annotations_still_group_when_served(containerd, busybox_image, shims, tmp_path):
    config = tmp_path / "per-pod.toml"
    config.write_text('grouping = "pod"\nidle_exit_seconds = 0\n')
    _start_server({})
    before = len(_slow_starts(shims))
    sandbox = "io.kubernetes.cri.sandbox-id"
    pod_a, pod_b = unique_id("zviz-served-pod"), unique_id("zviz-served-pod")
    runs = {unique_id("zviz-served-g"): pod for pod in (pod_a, pod_a, pod_b)}
    try:
        for container_id, pod in runs.items():
            flags = ["--runtime-config-path", str(config), "--annotation", f"{sandbox}={pod}"]
            result = _run(
                containerd,
                busybox_image,
                shims["client"],
                container_id,
                "sleep",
                "1000",
                flags=flags,
                detach=True,
            )
            assert result.returncode == 0, result.stderr
        pids = [_shim_pid(containerd, container_id) for container_id in runs]
    finally:
        for container_id in runs:
            _remove(containerd, container_id)
    assert pids[0] == pids[1] != pids[2]
    assert len(_slow_starts(shims)) == before


def _daemon_facts(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":\t", 1) for line in f.read().splitlines())
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = dict(entry.split(b"=", 1) for entry in f.read().split(b"\0") if b"=" in entry)
    stat = procstat.read(pid)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    with open(f"/proc/{pid}/cgroup") as f:
        cgroup = f.read()
    # What the daemon got from its start (0-3), by kind: the rest is its container's
    # (stdio fifos, connections) by the time it can be looked at.
    fds = {}
    for fd in range(4):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        fds[fd] = target.split(":")[0] if ":" in target else os.path.basename(target)
    pipes = [fd for fd in os.listdir(f"/proc/{pid}/fd") if _is_pipe(pid, fd)]
    return {
        "status": {name: status[name].strip() for name in SAME_STATUS},
        "session leader": int(stat[procstat.SESSION]) == pid,
        "group leader": int(stat[procstat.PROCESS_GROUP]) == pid,
        "environ": environ,
        "program": cmdline[:2],
        "cgroup": cgroup,
        "fds": fds,
        "pipes": pipes,
    }


def _is_pipe(pid: int, fd: str) -> bool:
    """A pipe: the daemon's own, or what containerd reads start's output through."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    except OSError:
        return False


def test_a_served_start_leaves_the_same_daemon_as_an_unserved_one(containerd, busybox_image, shims):
    """Same session, cgroup, descriptors (only the listener as fd 3), credentials, parent
    and program; the environment containerd gave the start, not the fork server's."""
    _start_server({SERVER_MARK: "1", "TTRPC_ADDRESS": "/nonexistent/server.ttrpc"})
    before = len(_slow_starts(shims))
    facts = {}
    made = []
    try:
        for kind, runtime in (("served", shims["client"]), ("unserved", shims["unserved"])):
            container_id = unique_id(f"zviz-{kind}")
            made.append(container_id)
            result = _run(
                containerd,
                busybox_image,
                runtime,
                container_id,
                "sleep",
                "1000",
                flags=["--runtime-config-path", shims["config"]],
                detach=True,
            )
            assert result.returncode == 0, result.stderr
            facts[kind] = _daemon_facts(_shim_pid(containerd, container_id))
    finally:
        for container_id in made:
            _remove(containerd, container_id)
    assert len(_slow_starts(shims)) == before, "the served start went the slow path"
    served, unserved = facts["served"], facts["unserved"]
    assert served["environ"].get(b"TTRPC_ADDRESS") == containerd.ttrpc_address.encode()
    assert SERVER_MARK.encode() not in served["environ"]
    assert unserved["environ"].pop(b"ZVIZ_NO_FORKSERVER") == b"1"  # how it was made unserved
    for name in ("environ", "status", "session leader", "group leader", "program", "cgroup"):
        assert served[name] == unserved[name], name
    assert served["fds"] == unserved["fds"]
    assert served["fds"][0] == served["fds"][1] == "null"
    assert served["fds"][3] == "socket"
    assert served["pipes"] == unserved["pipes"]  # its own (a held start pipe: ctr would hang)
    assert served["session leader"]


def test_a_killed_or_stale_server_falls_back_and_the_next_start_is_served(
    containerd, busybox_image, shims
):
    def run_once() -> None:
        container_id = unique_id("zviz-served-fb")
        try:
            result = _run(
                containerd, busybox_image, shims["client"], container_id, "echo", "still-works"
            )
        finally:
            _remove(containerd, container_id)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "still-works\n"

    def served_again() -> bool:
        """Once the fallback's new server listens, starts are served again."""
        deadline = time.monotonic() + 30
        while _server_pid() is None:
            assert time.monotonic() < deadline, "the slow path started no fork server"
            time.sleep(0.05)
        before = len(_slow_starts(shims))
        run_once()
        return len(_slow_starts(shims)) == before

    # Killed: its socket is left behind and refuses connections.
    _start_server({})
    _stop_server()
    assert os.path.exists(_server_path())
    before = len(_slow_starts(shims))
    run_once()
    assert len(_slow_starts(shims)) == before + 1, "no fallback with the server killed"
    assert served_again()

    # Stale: a shim source the server loaded changed on disk (its code would be old).
    server = _server_pid()
    stamped = os.path.join(os.path.dirname(os.path.dirname(forkserver.__file__)), "shim")
    source = os.path.join(stamped, "manager.py")
    stat = os.stat(source)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        before = len(_slow_starts(shims))
        run_once()
        assert len(_slow_starts(shims)) == before + 1, "a stale server served a start"
        assert served_again()
        assert _server_pid() != server
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        # the server now running stamped the touched time: it is stale again; let it go
        _stop_server()


def test_node_layout_the_daemon_runs_the_python_entry(containerd, busybox_image, shims):
    """containerd runs the compiled client; the daemon it leaves runs the install's Python
    entry (the compiled client cannot be the daemon's script)."""
    _start_server({})
    container_id = unique_id("zviz-served-entry")
    try:
        result = _run(
            containerd,
            busybox_image,
            shims["client"],
            container_id,
            "sleep",
            "1000",
            flags=["--runtime-config-path", shims["config"]],
            detach=True,
        )
        assert result.returncode == 0, result.stderr
        program = _daemon_facts(_shim_pid(containerd, container_id))["program"]
    finally:
        _remove(containerd, container_id)
    real = forkserver.python_entry(forkserver.scripts_dir(), forkserver.SHIM_ENTRY)
    assert program == [sys.executable.encode(), real.encode()]
    with open(real, "rb") as f:
        assert f.read(2) == b"#!"


# --- the served `delete` ------------------------------------------------------------------


def _delete_reply(shims, kind: str, container_id: str, timeout: float = 60) -> bytes:
    """What KIND's shim answered containerd's `delete` of CONTAINER_ID (the call complete)."""
    deadline = time.monotonic() + timeout
    while True:
        for name in os.listdir(shims["replies"]):
            if not (name.startswith(kind + "-") and name.endswith(".done")):
                continue
            reply = os.path.join(shims["replies"], name[: -len(".done")])
            with open(reply + ".args") as f:
                words = f.read().split()
            if words[-1:] == ["delete"] and container_id in words:
                with open(reply + ".out", "rb") as f:
                    return f.read()
        assert time.monotonic() < deadline, f"containerd ran no {kind} delete of {container_id}"
        time.sleep(0.05)


def _decoded(reply: bytes) -> tuple[int, int, float]:
    """(pid, exit status, exited at) of a DeleteResponse in the Python entry's encoding."""
    from api.gen.containerd.task.v2 import shim_pb2
    from shim import wire
    from shim.cleanup import encode_delete_response

    response = shim_pb2.DeleteResponse.FromString(reply)
    exited_at = response.exited_at.seconds + response.exited_at.nanos / 1e9
    # Byte for byte what shim.cleanup encodes, the time (the call's own) put in as it came.
    no_time = encode_delete_response(response.pid, response.exit_status, 0.0)
    no_time = no_time[: -len(wire.field_bytes(3, b""))]
    timestamp = shim_pb2.DeleteResponse(exited_at=response.exited_at).SerializeToString()
    assert reply == no_time + timestamp, reply.hex()
    return response.pid, response.exit_status, exited_at


def _cgroup_dirs(container_id: str) -> list[str]:
    return [
        directory
        for directory, _subdirs, _files in os.walk("/sys/fs/cgroup")
        if container_id in os.path.basename(directory)
    ]


def _mounted_for(container_id: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if container_id in line.split()[4]]


def _bundle_state(containerd, container_id: str) -> dict:
    bundle = os.path.join(
        containerd.state, "io.containerd.runtime.v2.task", containerd.namespace, container_id
    )
    return shim_config.read_bundle_state(os.path.join(bundle, shim_config.BUNDLE_STATE_FILE))


def test_ctr_run_rm_serves_the_shim_delete_and_answers_as_unserved(
    containerd, busybox_image, shims
):
    """containerd runs `delete` after every container (the daemon already cleaned up): a
    served one answers what the Python entry answers (no pid, 137, its time) and leaves
    as little behind."""
    _start_server({})
    before = len(_slow_calls(shims, "delete"))
    outcomes = {}
    for kind in ("served", "unserved"):
        container_id = unique_id(f"zviz-del-{kind}")
        begun = time.time()
        try:
            result = _run(
                containerd,
                busybox_image,
                shims["keeping"][kind],
                container_id,
                "echo",
                f"ran-{kind}",
                flags=["--runtime-config-path", shims["config"]],
            )
        finally:
            _remove(containerd, container_id)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"ran-{kind}\n"
        pid, status, exited_at = _decoded(_delete_reply(shims, kind, container_id))
        assert begun <= exited_at <= time.time()
        outcomes[kind] = (pid, status, _cgroup_dirs(container_id), _mounted_for(container_id))
    assert len(_slow_calls(shims, "delete")) == before, "a delete went the slow path"
    assert outcomes["served"] == outcomes["unserved"] == (0, 128 + signal.SIGKILL, [], [])


def test_a_served_delete_cleans_up_after_a_killed_daemon_as_an_unserved_one(
    containerd, busybox_image, shims
):
    """The daemon SIGKILLed under a running container: containerd runs `delete`, which
    kills what is left, unmounts the rootfs and removes the cgroup, the runtime state
    and the dead daemon's directory; served as unserved, with the same answer."""
    from integration.reliability.harness import watch

    _start_server({})
    before = len(_slow_calls(shims, "delete"))
    outcomes = {}
    for kind in ("served", "unserved"):
        container_id = unique_id(f"zviz-del-killed-{kind}")
        try:
            result = _run(
                containerd,
                busybox_image,
                shims["keeping"][kind],
                container_id,
                "sleep",
                "1000",
                flags=["--runtime-config-path", shims["config"]],
                detach=True,
            )
            assert result.returncode == 0, result.stderr
            assert _wait_task_state(containerd, container_id, {"RUNNING"}) == "RUNNING"
            init = _task_state(containerd, container_id)[1]
            state = _bundle_state(containerd, container_id)
            left = [os.path.join(state["root"], container_id), state["group_dir"]]
            assert all(os.path.exists(path) for path in left)
            assert _cgroup_dirs(container_id) and _mounted_for(container_id)
            [watched] = watch([init])
            killed_at = time.time()
            os.kill(_shim_pid(containerd, container_id), signal.SIGKILL)
            reply = _delete_reply(shims, kind, container_id)
            deadline = time.monotonic() + 20
            while watched.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            outcomes[kind] = {
                "init alive": watched.alive(),
                "left": [path for path in left if os.path.exists(path)],
                "cgroups": _cgroup_dirs(container_id),
                "mounts": _mounted_for(container_id),
            }
            watched.close()
        finally:
            _remove(containerd, container_id)
        pid, status, exited_at = _decoded(reply)
        assert (pid, status) == (init, 128 + signal.SIGKILL)
        assert killed_at <= exited_at <= time.time()
    assert len(_slow_calls(shims, "delete")) == before, "a delete went the slow path"
    assert outcomes["served"] == outcomes["unserved"]
    assert outcomes["served"] == {"init alive": False, "left": [], "cgroups": [], "mounts": []}
