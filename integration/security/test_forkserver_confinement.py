"""A root client that confined itself and the `zviz run` fork server (runtime/forkserver.py).

The server serves only root clients in its own namespaces and cgroup; everything else
a process inherits (no_new_privs, seccomp filters, capability sets, the LSM label, ...)
a worker takes from the server. A client that set no_new_privs, dropped a capability
from its bounding set or installed a seccomp filter, served by a worker forked from an
unconfined server, would have its container supervised by a process without that
confinement: the confinement escaped through a confused deputy. The process that
supervises the container (PID 1's parent: a served worker, or the client itself on the
slow path) must carry the client's confinement, whichever path ran.
"""

import subprocess
import sys
import time

import pytest

from integration.ids import tagged
from integration.zviz_cli import Zviz, leftovers, unique_id
from runtime import forkserver, procstat

# Loads a seccomp filter that refuses acct(2) (nothing zviz calls), without setting
# no_new_privs (root may), then execs its arguments.
SECCOMP_THEN_EXEC = """
import errno, os, sys
import pyseccomp as sc
f = sc.SyscallFilter(defaction=sc.ALLOW)
f.set_attr(sc.Attr.CTL_NNP, 0)
f.add_rule(sc.ERRNO(errno.EPERM), "acct")
f.load()
os.execvp(sys.argv[1], sys.argv[1:])
"""
# The supervisor itself sets no_new_privs and drops CAP_SYS_MODULE and CAP_SYS_RESOURCE
# from its bounding set: a client's confinement shows on it only beyond those (the server's
# own check, below, covers no_new_privs).
CONFINEMENTS = {
    "bounding_set": ["setpriv", "--bounding-set", "-sys_boot"],
    "seccomp": [sys.executable, "-c", SECCOMP_THEN_EXEC],
}
# What each confinement changes in /proc/<pid>/status.
CONFINED_FIELDS = ("NoNewPrivs", "CapBnd", "CapEff", "CapPrm", "Seccomp", "Seccomp_filters")


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def _status(pid) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _served_plain_run(zviz, make_bundle) -> None:
    """A plain client (this test's attributes) is served: its server is up."""
    bundle = make_bundle(["true"])
    deadline = time.monotonic() + 30
    while True:
        result = zviz("--debug", "run", "--bundle", bundle, unique_id())
        assert result.returncode == 0, result.stderr
        if forkserver.SLOW_PATH not in result.stderr:
            return
        assert time.monotonic() < deadline, f"a plain run is never served: {result.stderr}"
        time.sleep(0.2)


def _wait_running(zviz, container_id: str, run) -> int:
    deadline = time.monotonic() + 30
    while True:
        result = zviz("state", container_id)
        if result.returncode == 0 and '"running"' in result.stdout:
            return zviz.state(container_id)["pid"]
        assert run.poll() is None, run.stderr.read()
        assert time.monotonic() < deadline, f"{container_id} never ran: {result.stderr}"
        time.sleep(0.05)


@pytest.mark.parametrize("confinement", CONFINEMENTS)
def test_a_confined_client_keeps_its_confinement_in_the_supervisor(zviz, make_bundle, confinement):
    confine = CONFINEMENTS[confinement]
    expected = subprocess.run(
        [*confine, "cat", "/proc/self/status"], capture_output=True, text=True, check=True
    ).stdout
    expected = dict(line.split(":\t", 1) for line in expected.splitlines() if ":\t" in line)
    mine = _status("self")
    changed = [name for name in CONFINED_FIELDS if expected[name] != mine[name]]
    assert changed, f"{confinement} changed nothing this probe reads"
    _served_plain_run(zviz, make_bundle)
    container_id = unique_id()
    run = subprocess.Popen(
        [*confine, zviz.binary, "--root", zviz.root, "run"]
        + ["--bundle", make_bundle(["sleep", "60"]), container_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        supervisor = procstat.parent(_wait_running(zviz, container_id, run))
        seen = _status(supervisor)
        assert {name: seen[name] for name in changed} == {name: expected[name] for name in changed}
    finally:
        zviz("kill", container_id, "KILL")
        run.wait(timeout=30)
    assert leftovers(container_id, zviz.root) == []


# Sends a plain `zviz run` request, as this install's clients do, to the socket argv[1];
# prints the reply.
RAW_CLIENT = """
import socket, sys
from runtime import forkserver
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect(sys.argv[1])
argv = ["zviz", "run", "--bundle", "/nonexistent", sys.argv[2]]
request = (forkserver.ZVIZ_ENTRY, "/", argv, [])
forkserver.send_request(sock, forkserver.install_identity(), request, (0, 1, 2))
print(sock.recv(4096).decode())
"""
# Every inherited attribute the server compares, changed one at a time.
ALTERED = {
    **CONFINEMENTS,
    "no_new_privs": ["setpriv", "--no-new-privs"],
    "umask": ["sh", "-c", 'umask 027; exec "$@"', "sh"],
    "rlimit": ["prlimit", "--nofile=777:"],
    "nice": ["nice", "-n", "3"],
    "oom_score_adj": ["choom", "-n", "7", "--"],
}


def _plain_server_path() -> str:
    return forkserver.socket_path(
        (forkserver.install_identity(), forkserver.process_identity("self"))
    )


@pytest.mark.parametrize("alteration", ALTERED)
def test_the_server_hands_back_a_client_whose_inherited_attributes_differ(
    zviz, make_bundle, alteration
):
    """Even on the plain server's socket (a 32-bit name can collide, a client can connect
    anywhere it likes), a client that differs in anything a worker would inherit from the
    server gets "fallback": nothing runs for it."""
    _served_plain_run(zviz, make_bundle)
    container_id = unique_id()
    result = subprocess.run(
        [*ALTERED[alteration], sys.executable, "-c", RAW_CLIENT, _plain_server_path()]
        + [container_id],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(forkserver.REPLY_FALLBACK + " "), result
    assert result.stderr == ""  # no worker wrote the run's error to the client's stderr
