"""The fork-server protocol as both clients speak it: the compiled one
(runtime/forkserver_client.c) and the Python one (forkserver.try_run).

Both are driven against one recording server, for every eligible and ineligible
command line and every reply kind: the same request bytes (environment included) and
descriptors, the same exit code, output and --debug explanation; for each entry, `zviz`
and the shim binary's `start` and `delete`. The C client is compiled here exactly as `make install`
compiles it (forkserver.compile_client, the header generated from the protocol
section), only with its own server directory and a stand-in slow path.
"""

import ctypes
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from runtime import forkserver, procstat
from tests.privileges import needs_root

pytestmark = [
    needs_root("both clients serve root only"),
    pytest.mark.skipif(
        not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler for the client"
    ),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The slow path both clients take: it only says so, with the arguments it was given.
SLOW_PATH_SCRIPT = '#!/bin/sh\necho "slow path:" "$@"\n'
# The Python client as cli.main (or shim.main) runs it, with the test's server directory
# and slow path.
PYTHON_CLIENT = """
import os, sys
from runtime import forkserver
forkserver.SERVER_DIR = {servers!r}
forkserver._start_server = lambda: None  # the recording server is the only one
sys.argv[0] = {name!r}  # as the compiled client is invoked
code = forkserver.try_run(sys.argv[1:], {entry!r})
if code is None:
    os.execv("/bin/sh", ["/bin/sh", {slow!r}, *sys.argv[1:]])
os._exit(code)
"""
# Prints the socket path of the process it runs in.
SOCKET_OF_SELF = """
from runtime import forkserver
from runtime import procstat
identity = (forkserver.install_identity(), forkserver.process_identity("self"))
print(forkserver.socket_path(identity))
"""
BUNDLE_RUN = ["run", "--bundle", "/nonexistent/bundle", "parity-ctr"]
ZVIZ, SHIM = forkserver.ZVIZ_ENTRY, forkserver.SHIM_ENTRY
# containerd's `start` command line (shim/main.py)
SHIM_START = ["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary", "/bin/c"]
SHIM_START += ["-id", "parity-ctr", "start"]
# containerd's `delete` command line (runtime/v2/binary.go: no -debug, the bundle named)
SHIM_DELETE = ["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary", "/bin/c"]
SHIM_DELETE += ["-id", "parity-ctr", "-bundle", "/run/c/io.containerd.runtime.v2.task/k8s.io/x"]
SHIM_DELETE += ["delete"]


class Recorder:
    """A server at the clients' socket: records each request, answers with given replies."""

    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(4)
        self.requests: list[tuple[bytes, list[tuple[int, int]]]] = []
        self.stopped = threading.Event()

    def answer(self, replies):
        """Serve one client in a thread; REPLIES: bytes to send, or callables(peer_pid)."""

        def serve():
            # Polled: a client that never connects (the slow path) ends it by stop().
            self.listener.settimeout(0.05)
            while True:
                try:
                    conn, _ = self.listener.accept()
                    break
                except TimeoutError:
                    if self.stopped.is_set():
                        return
            with conn:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                peer = struct.unpack("3i", creds)[0]
                data, ancillary, _, _ = conn.recvmsg(
                    forkserver.MAX_REQUEST, socket.CMSG_SPACE(16 * 4)
                )
                fds = []
                for _, _, payload in ancillary:
                    fds += struct.unpack(f"{len(payload) // 4}i", payload)
                identities = []
                for fd in fds:
                    st = os.fstat(fd)
                    identities.append((st.st_dev, st.st_ino))
                    os.close(fd)
                self.requests.append((data, identities))
                for reply in replies:
                    if callable(reply):
                        reply = reply(peer)
                    try:
                        conn.send(reply)
                    except OSError:  # the client is gone (killed by a test)
                        return

        thread = threading.Thread(target=serve)
        thread.start()
        return thread

    def stop(self):
        """The client has exited: any connection it made is queued by now."""
        self.stopped.set()

    def close(self):
        self.listener.close()
        os.unlink(self.path)


@pytest.fixture(scope="module")
def setup():
    # Short (a socket path) and private; removed at the end.
    directory = tempfile.mkdtemp(prefix="zviz-parity-")
    servers = os.path.join(directory, "servers")
    os.mkdir(servers, 0o700)
    clients = {}
    for entry, name in forkserver.ENTRY_NAMES.items():
        slow = os.path.join(directory, name + forkserver.PYTHON_ENTRY_SUFFIX)
        with open(slow, "w") as f:
            f.write(SLOW_PATH_SCRIPT)
        os.chmod(slow, 0o755)
        compiled = os.path.join(directory, name)
        assert forkserver.compile_client(compiled, slow, servers, entry) == compiled
        python_client = os.path.join(directory, f"client-{entry}.py")
        with open(python_client, "w") as f:
            f.write(PYTHON_CLIENT.format(servers=servers, slow=slow, name=name, entry=entry))
        clients[entry] = {"compiled": [compiled], "python": [sys.executable, python_client]}
    path = os.path.join(
        servers,
        os.path.basename(
            forkserver.socket_path(
                (forkserver.install_identity(), forkserver.process_identity("self"))
            )
        ),
    )
    try:
        yield {"directory": directory, "socket": path, "clients": clients}
    finally:
        shutil.rmtree(directory)


def _environment(env_extra=None) -> dict[str, str]:
    """What both clients run with, and so send."""
    env = {k: v for k, v in os.environ.items() if k not in forkserver.UNSERVED_ENV}
    env["PYTHONPATH"] = REPO
    # Not the C locale: Python would add LC_CTYPE to its environment (PEP 538).
    env["LC_CTYPE"] = "C.UTF-8"
    env.update(env_extra or {})
    return env


def _run(setup, client: str, argv: list[str], env_extra=None, entry=ZVIZ, preexec=None):
    """Run CLIENT with ARGV (PREEXEC run in its process first); (exit code, stdout,
    stderr, its stdio's identities)."""
    env = _environment(env_extra)
    command = setup["clients"][entry][client]
    files = [os.path.join(setup["directory"], f"{client}.{name}") for name in ("in", "out", "err")]
    with open(files[0], "w"), open(files[1], "w"), open(files[2], "w"):
        pass
    with open(files[0]) as stdin, open(files[1], "w") as stdout, open(files[2], "w") as stderr:
        identities = [
            (os.fstat(f.fileno()).st_dev, os.fstat(f.fileno()).st_ino)
            for f in (stdin, stdout, stderr)
        ]
        executable = command[0]
        name = forkserver.ENTRY_NAMES[entry]
        args = [name, *argv] if client == "compiled" else [*command, *argv]
        result = subprocess.run(
            args,
            executable=executable,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=setup["directory"],
            env=env,
            timeout=30,
            preexec_fn=preexec,
        )
    with open(files[1]) as out, open(files[2]) as err:
        return result.returncode, out.read(), err.read(), identities


def _both(setup, argv, replies=None, env_extra=None, entry=ZVIZ, preexec=None, path=None):
    """Both clients' outcomes and the requests the server saw from each (None: no server)
    at PATH (the setup's socket unless given)."""
    outcomes, requests = [], []
    for client in ("compiled", "python"):
        recorder = Recorder(path or setup["socket"]) if replies is not None else None
        thread = recorder.answer(replies) if recorder else None
        try:
            code, out, err, stdio = _run(setup, client, argv, env_extra, entry, preexec)
        finally:
            if recorder:
                recorder.stop()
                thread.join()
                recorder.close()
        outcomes.append((code, out, err))
        requests.append((recorder.requests if recorder else None, stdio))
    return outcomes, requests


def _expected_request(setup, argv, entry=ZVIZ, env_extra=None) -> bytes:
    install = forkserver.install_identity()
    argv = [forkserver.ENTRY_NAMES[entry], *argv]
    fields = (*install, entry, setup["directory"], str(len(argv)), *argv)
    environment = [f"{k}={v}" for k, v in _environment(env_extra).items()]
    return b"\0".join(p.encode() for p in (*fields, *environment))


ELIGIBLE = [
    BUNDLE_RUN,
    ["--debug", *BUNDLE_RUN],
    ["--root", "/tmp/r", "--profile=hostile-tenant", *BUNDLE_RUN],
    ["--profile", "ci-runner", "--verbose", "run", "-b", "/b", "x"],
    ["exec", "x", "true"],
    ["--root", "/r", "exec", "x", "sh", "-c", "echo"],
]


@pytest.mark.parametrize("argv", ELIGIBLE)
def test_both_clients_send_the_same_request_and_exit_with_the_code(setup, argv):
    outcomes, requests = _both(setup, argv, replies=[b"exit 7"])
    assert outcomes[0] == outcomes[1] == (7, "", "")
    for seen, stdio in requests:
        assert len(seen) == 1, "the client never reached the server"
        data, fds = seen[0]
        assert data == _expected_request(setup, argv)
        assert len(fds) == forkserver.REQUEST_FDS
        assert fds == stdio  # its own stdin, stdout and stderr, in that order


INELIGIBLE = [
    (["run", "-d", "x"], {}),
    (["run", "--detach", "x"], {}),
    (["run", "-dt", "x"], {}),
    (["run", "--console-socket=/s", "x"], {}),
    (["run", "--pid-file", "/p", "x"], {}),
    (["run", "--preserve-fds", "1", "x"], {}),
    (["run", "-h"], {}),
    (["exec", "-t", "x", "sh"], {}),
    (["exec", "x", "ls", "-la"], {}),
    (BUNDLE_RUN, {"ZVIZ_NO_FORKSERVER": "1"}),
    (BUNDLE_RUN, {"ZVIZ_SECCOMP_CACHE": "/tmp/c"}),
    (BUNDLE_RUN, {"ZVIZ_DENIAL_RECORDS": "/tmp/d"}),
]


@pytest.mark.parametrize("argv,env", INELIGIBLE)
@pytest.mark.parametrize("debug", [False, True])
def test_both_clients_take_the_slow_path_for_an_ineligible_run(setup, argv, env, debug):
    argv = ["--debug", *argv] if debug else argv
    outcomes, requests = _both(setup, argv, replies=[b"exit 7"], env_extra=env)
    said = forkserver.SLOW_PATH + forkserver.SAY_NOT_ELIGIBLE + "\n" if debug else ""
    assert outcomes[0] == outcomes[1] == (0, "slow path: " + " ".join(argv) + "\n", said)
    assert [seen for seen, _ in requests] == [[], []], "an ineligible run reached the server"


@pytest.mark.parametrize("argv", [["create", "x"], ["--debug", "state", "x"], ["--root", "run"]])
def test_another_command_goes_the_slow_path_silently(setup, argv):
    outcomes, requests = _both(setup, argv, replies=[b"exit 7"])
    assert outcomes[0] == outcomes[1] == (0, "slow path: " + " ".join(argv) + "\n", "")
    assert [seen for seen, _ in requests] == [[], []]


def _signal_pid1(sleeper):
    """Reply "pid N" for a stand-in PID 1, then SIGTERM the client: it must forward it."""

    def reply(peer: int) -> bytes:
        threading.Timer(0.3, os.kill, (peer, signal.SIGTERM)).start()
        return b"pid %d" % sleeper.pid

    def exit_code(_peer: int) -> bytes:
        try:
            code = sleeper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sleeper.kill()
            code = sleeper.wait()
        return b"exit %d" % (128 - code if code < 0 else 99)  # 143: SIGTERM forwarded

    return [reply, exit_code]


def _prctl(*args) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(*(ctypes.c_ulong(a) for a in args), 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# One inherited attribute (forkserver.INHERITED_*) changed in the client's process before
# it runs: PR_SET_NO_NEW_PRIVS is 38, PR_CAPBSET_DROP 24 (CAP_SYS_BOOT is 22).
ALTERATIONS = {
    "umask": lambda: os.umask(0o027),
    "rlimit": lambda: resource.setrlimit(
        resource.RLIMIT_NOFILE, (777, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    ),
    "nice": lambda: os.nice(3),
    "oom_score_adj": lambda: _write("/proc/self/oom_score_adj", "7"),
    "no_new_privs": lambda: _prctl(38, 1),
    "bounding_set": lambda: _prctl(24, 22),
}


@pytest.mark.parametrize("alteration", ALTERATIONS)
def test_both_clients_derive_the_same_socket_from_their_inherited_attributes(setup, alteration):
    """A client that differs from the server in anything a worker inherits reaches another
    server (a server of its own): both clients name the same one, which is the one
    forkserver.socket_path names for a process so altered."""
    alter = ALTERATIONS[alteration]
    where = subprocess.run(
        [sys.executable, "-c", SOCKET_OF_SELF],
        preexec_fn=alter,
        env=_environment(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path = os.path.join(os.path.dirname(setup["socket"]), os.path.basename(where))
    assert path != setup["socket"], f"{alteration} changed nothing in the socket name"
    outcomes, requests = _both(setup, BUNDLE_RUN, replies=[b"exit 7"], preexec=alter, path=path)
    assert outcomes[0] == outcomes[1] == (7, "", "")
    for seen, _ in requests:
        assert len(seen) == 1, "the client never reached the server of its attributes"
        assert seen[0][0] == _expected_request(setup, BUNDLE_RUN)


def test_both_clients_forward_signals_to_pid1(setup):
    codes = []
    for client in ("compiled", "python"):
        sleeper = subprocess.Popen(["sleep", "30"])
        recorder = Recorder(setup["socket"])
        thread = recorder.answer(_signal_pid1(sleeper))
        try:
            codes.append(_run(setup, client, BUNDLE_RUN)[:3])
        finally:
            recorder.stop()
            thread.join()
            recorder.close()
            if sleeper.poll() is None:
                sleeper.kill()
            sleeper.wait()
    assert codes[0] == codes[1] == (143, "", "")


# Every reply that sends a run the slow way, and what --debug says about it.
SLOW_REPLIES = [
    ([b"fallback another install"], forkserver.SAY_REFUSED + "another install"),
    ([b"fallback 2 descriptors, not 3"], forkserver.SAY_REFUSED + "2 descriptors, not 3"),
    ([b"stale"], forkserver.SAY_STALE),
    (None, forkserver.SAY_NO_SERVER),  # no server listening
]


@pytest.mark.parametrize("replies,reason", SLOW_REPLIES)
@pytest.mark.parametrize("debug", [False, True])
def test_a_refused_or_missed_fast_path_is_said_with_debug(setup, replies, reason, debug):
    """A drift (another install, another descriptor count) falls back in both clients, and
    --debug says why instead of only running slower."""
    argv = ["--debug", *BUNDLE_RUN] if debug else BUNDLE_RUN
    outcomes, _ = _both(setup, argv, replies=replies)
    said = forkserver.SLOW_PATH + reason + "\n" if debug else ""
    assert outcomes[0] == outcomes[1] == (0, "slow path: " + " ".join(argv) + "\n", said)


def test_both_clients_report_a_supervisor_that_hangs_up(setup):
    outcomes, _ = _both(setup, BUNDLE_RUN, replies=[b"pid 999999999"])  # then the hang-up
    assert outcomes[0] == outcomes[1] == (1, "", "zviz: the run supervisor went away\n")


def test_the_c_client_holds_no_copy_of_the_protocol():
    """Its lists, names and replies come from the generated header, never a literal."""
    source_path = os.path.join(os.path.dirname(forkserver.__file__), "forkserver_client.c")
    with open(source_path) as f:
        code = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)
    values = [
        forkserver.SERVER_DIR,
        forkserver.SOCKET_NAME,
        forkserver.DEBUG_FLAG,
        forkserver.REPLY_PID,
        forkserver.REPLY_EXIT,
        forkserver.REPLY_FALLBACK,
        forkserver.REPLY_STALE,
        *forkserver.SERVED_COMMANDS,
        *forkserver.UNSERVED_ENV,
        *forkserver.INELIGIBLE_FLAGS,
        *forkserver.GLOBAL_FLAGS_WITH_VALUE,
        *forkserver.COMPARED_NAMESPACES,
        *forkserver.INHERITED_STATUS_FIELDS,
        *forkserver.INHERITED_FILES,
    ]
    values += [*forkserver.SHIM_SERVED_ACTIONS, *forkserver.SHIM_SERVED_BOOLS]
    copies = [value for value in values if f'"{value}' in code]
    # The entries whole: "zviz" also begins the client's own messages ("zviz: ...").
    copies += [entry for entry in forkserver.ENTRIES if f'"{entry}"' in code]
    assert copies == []


# --- the shim's entry: containerd-shim-zviz-v2 `start` and `delete` -----------------------

SHIM_ELIGIBLE = [
    SHIM_START,
    ["-debug", *SHIM_START],
    ["--namespace=k8s.io", "--address", "/a", "-id=x", "-bundle", "/b", "start"],
    SHIM_DELETE,
    ["-namespace", "n", "-id", "x", "-bundle", "/b", "delete"],
    ["--namespace=n", "-debug", "--id=x", "delete"],
]


@pytest.mark.parametrize("argv", SHIM_ELIGIBLE)
def test_both_shim_clients_send_the_same_request_with_their_environment(setup, argv):
    """A start or delete goes to the server with the client's environment (containerd's
    TTRPC_ADDRESS, NAMESPACE, ...), which the daemon a start's worker launches inherits."""
    env = {"TTRPC_ADDRESS": "/run/c.sock.ttrpc", "NAMESPACE": "k8s.io", "EMPTY": ""}
    outcomes, requests = _both(setup, argv, replies=[b"exit 3"], env_extra=env, entry=SHIM)
    assert outcomes[0] == outcomes[1] == (3, "", "")
    for seen, stdio in requests:
        assert len(seen) == 1, "the client never reached the server"
        data, fds = seen[0]
        assert data == _expected_request(setup, argv, SHIM, env)
        assert b"\0TTRPC_ADDRESS=/run/c.sock.ttrpc" in data
        assert fds == stdio


SHIM_NOT_SERVED = [
    (["-namespace", "n", "-id", "x", "-socket", "unix:///s"], {}),  # the daemon itself
    (["-namespace", "n", "-id", "x", "stop"], {}),  # an action neither serves nor knows
    (["-namespace", "n", "-id", "x", "delete", "start"], {}),
    (["-namespace", "n", "-v", "delete"], {}),
    (["-debug=1", *SHIM_DELETE], {}),
    (SHIM_DELETE, {"ZVIZ_NO_FORKSERVER": "1"}),
    (SHIM_DELETE, {"ZVIZ_SECCOMP_CACHE": "/tmp/c"}),
    (["-v"], {}),
    (["-info"], {}),
    (["-namespace", "n", "-v", "start"], {}),
    (["-debug=true", *SHIM_START], {}),  # a boolean with a value: the Python parser's
    (["-unknown", "1", *SHIM_START], {}),
    (["--", *SHIM_START], {}),
    ([*SHIM_START, "extra"], {}),
    (SHIM_START[:-1], {}),  # a flag's value missing
    (SHIM_START, {"ZVIZ_NO_FORKSERVER": "1"}),
]


@pytest.mark.parametrize("argv,env", SHIM_NOT_SERVED)
def test_both_shim_clients_leave_everything_but_a_plain_start_or_delete_to_python(setup, argv, env):
    """Silently: containerd reads start's output, stderr included, as its reply."""
    outcomes, requests = _both(setup, argv, replies=[b"exit 3"], env_extra=env, entry=SHIM)
    assert outcomes[0] == outcomes[1] == (0, "slow path: " + " ".join(argv) + "\n", "")
    assert [seen for seen, _ in requests] == [[], []], "a command not served reached the server"


@pytest.mark.parametrize("argv", [SHIM_START, SHIM_DELETE], ids=["start", "delete"])
@pytest.mark.parametrize("replies", [reply for reply, _ in SLOW_REPLIES])
def test_a_refused_shim_start_or_delete_falls_back_silently(setup, replies, argv):
    outcomes, _ = _both(setup, argv, replies=replies, entry=SHIM)
    assert outcomes[0] == outcomes[1] == (0, "slow path: " + " ".join(argv) + "\n", "")


@pytest.mark.parametrize("argv", [SHIM_START, SHIM_DELETE], ids=["start", "delete"])
def test_a_shim_client_forwards_no_signal_and_dies_of_it(setup, argv):
    """A start or delete has no PID 1: SIGTERM acts on both shim clients as on the Python
    entry."""

    def kill_then_wait(peer: int) -> bytes:
        time.sleep(0.3)  # the client waits for its reply by now (handlers set, if any)
        os.kill(peer, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{peer}") and _state(peer) != "Z":
            assert time.monotonic() < deadline, "the client survived SIGTERM"
            time.sleep(0.02)
        return b"exit 3"

    outcomes, _ = _both(setup, argv, replies=[kill_then_wait], entry=SHIM)
    assert outcomes[0] == outcomes[1] == (-signal.SIGTERM, "", "")


def _state(pid: int) -> str:
    try:
        return procstat.state(pid)
    except OSError:
        return "Z"
