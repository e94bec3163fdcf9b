"""The `zviz run` fork server (runtime/forkserver.py) SIGKILLed in the middle of serving.

A run the server had not forked a worker for yet must still happen (the client falls
back to the slow path, the container runs once, its exit code comes back); a run whose
worker already runs the container must finish as if nothing happened. Either way
nothing of the container is left. The installed client (compiled, `zviz`) is used.
"""

import os
import signal
import socket
import struct
import subprocess
import time

import pytest

from integration.ids import tagged, unique_id
from integration.reliability.harness import alive, kill_and_wait
from integration.zviz_cli import Zviz
from runtime import forkserver


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def _server_pid(bundle: str, zviz: Zviz) -> int:
    """The pid of this install's fork server, started by a first run if none serves."""
    mine = (forkserver.install_identity(), forkserver.process_identity("self"))
    path = forkserver.socket_path(mine)
    deadline = time.monotonic() + 20
    while True:
        assert zviz("run", "--bundle", bundle, unique_id("zviz-rel-fs")).returncode == 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(path)
            except OSError:
                assert time.monotonic() < deadline, "the fork server never started"
                time.sleep(0.1)
                continue
            pid = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[
                0
            ]
            # A request it must hand back (another install's): the server carries on.
            other = (mine[0][0], "/nonexistent/other-install/runtime", mine[0][2])
            request = (forkserver.ZVIZ_ENTRY, "/", ["zviz", "run", "x"], [])
            forkserver.send_request(probe, other, request, (0, 1, 2))
            assert probe.recv(4096) == b"fallback another install"
            return pid


def test_killed_before_forking_the_worker_the_run_still_happens(zviz, make_bundle):
    bundle = make_bundle(["sh", "-c", "echo ran-once; exit 7"])
    server = _server_pid(make_bundle(["true"]), zviz)
    os.kill(server, signal.SIGSTOP)  # the request waits, unserved, in its queue
    try:
        run = subprocess.Popen(
            [zviz.binary, "--root", zviz.root, "run", "--bundle", bundle, unique_id("zviz-rel-fs")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)  # connected and sent: nothing answers
        assert run.poll() is None
    finally:
        kill_and_wait(server)
    out, err = run.communicate(timeout=60)
    assert (run.returncode, out) == (7, "ran-once\n"), err
    assert os.listdir(zviz.root) == []


def test_killed_while_its_worker_runs_the_container(zviz, make_bundle):
    bundle = make_bundle(["sh", "-c", "echo started; read line; echo got-$line; exit 4"])
    server = _server_pid(make_bundle(["true"]), zviz)
    run = subprocess.Popen(
        [zviz.binary, "--root", zviz.root, "run", "--bundle", bundle, unique_id("zviz-rel-fs")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert run.stdout.readline() == "started\n"
    kill_and_wait(server)
    out, err = run.communicate("after-kill\n", timeout=60)
    assert (run.returncode, out) == (4, "got-after-kill\n"), err
    assert os.listdir(zviz.root) == []


def test_a_client_that_hangs_up_mid_request_does_not_end_the_server(zviz, make_bundle):
    """A client killed between connecting and its answer (a Ctrl-C) leaves the server
    serving the next runs, not exiting on the broken pipe."""
    server = _server_pid(make_bundle(["true"]), zviz)
    mine = (forkserver.install_identity(), forkserver.process_identity("self"))
    for _ in range(3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.connect(forkserver.socket_path(mine))
            client.send(b"half a request")  # and gone before the answer
    time.sleep(0.3)
    assert alive(server), "the fork server exited on a client that hung up"
    assert _server_pid(make_bundle(["true"]), zviz) == server
