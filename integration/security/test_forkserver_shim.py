"""A host user other than root and the fork server's shim `start` and `delete`
(runtime/forkserver.py).

The fork server runs as root and, for SHIM_ENTRY, runs shim.manager.start or delete
with the client's cwd, environment and stdio: a start launches a root shim daemon, a
delete kills a container's processes and removes its state, cgroups and the group
directory the bundle's state file names. Only root in the server's own namespaces and
cgroup may ask. Its socket is root's (0600 in /run/zviz); behind that the server checks
SO_PEERCRED, which these tests reach by giving uid 65534 a socket it can open: a
request it sends is handed back, and nothing runs as root. The installed compiled
client, run by that user, does not ask the server at all.
"""

import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from integration.ids import tagged
from runtime import forkserver
from shim import config as shim_config

NOBODY = 65534
# Sends REQUEST (hex, argv[1]) with its stdin, stdout and stderr to the socket argv[2];
# prints the reply, or the error connecting. Standard library only: runs as 65534.
RAW_CLIENT = """
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    sock.connect(sys.argv[2])
except OSError as error:
    print("connect:", error.strerror)
    sys.exit(0)
fds = struct.pack("3i", 0, 1, 2)
sock.sendmsg([bytes.fromhex(sys.argv[1])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
print("reply:", sock.recv(4096).decode())
"""


@pytest.fixture
def area():
    """A shim state root, a bundle 65534 may use, and a private server directory."""
    base = tempfile.mkdtemp(prefix=tagged("zviz-fs-shim") + "-", dir="/tmp")
    os.chmod(base, 0o755)
    paths = {
        "base": base,
        "state": os.path.join(base, "state"),
        "bundle": os.path.join(base, "bundle"),
        "servers": os.path.join(base, "servers"),
    }
    os.mkdir(paths["state"], 0o755)
    os.mkdir(paths["bundle"], 0o777)
    with open(os.path.join(paths["bundle"], "config.json"), "w") as f:
        f.write('{"ociVersion": "1.2.0", "annotations": {}}')
    os.chmod(paths["bundle"], 0o777)
    try:
        yield paths
    finally:
        for pid in _processes_with(f"ZVIZ_SHIM_ROOT={paths['state']}"):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def _processes_with(variable: str) -> dict[int, int]:
    """{pid: uid} of the processes whose environment holds VARIABLE (KEY=VALUE)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if variable.encode() not in f.read().split(b"\0"):
                    continue
            found[int(pid)] = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
    found.pop(os.getpid(), None)
    return found


def _start_command(state: str) -> list[str]:
    return ["-namespace", "s-" + os.path.basename(state)[:20], "-address", "/run/none.sock"] + [
        "-publish-binary",
        "/bin/true",
        "-id",
        "nobody-start",
        "start",
    ]


def _delete_command(state: str) -> list[str]:
    return ["-namespace", "s-" + os.path.basename(state)[:20], "-address", "/run/none.sock"] + [
        "-id",
        "nobody-delete",
        "delete",
    ]


def _dead_daemons_group(area) -> str:
    """What a root `delete` of nobody-delete would remove: the group directory of a dead
    daemon (no socket), holding only that container's reservation, named by the bundle."""
    group = os.path.join(area["state"], "g", "dead")
    os.makedirs(os.path.join(group, "tasks"))
    open(os.path.join(group, "tasks", "nobody-delete"), "w").close()
    shim_config.write_bundle_state(
        os.path.join(area["bundle"], shim_config.BUNDLE_STATE_FILE),
        {"group_dir": group, "root": os.path.join(area["state"], "r")},
    )
    return os.path.join(group, "tasks", "nobody-delete")


# Each action's command line, and what it leaves that must be there afterwards: a start
# nothing (the state root stays empty), a delete the dead daemon's reservation.
ACTIONS = {"start": (_start_command, None), "delete": (_delete_command, _dead_daemons_group)}


@pytest.mark.parametrize("action", ACTIONS)
def test_the_server_hands_back_a_shim_action_from_a_user_other_than_root(area, action):
    """Even on a socket that user can open, the server refuses (SO_PEERCRED): no group
    directory made or removed, no daemon, nothing run as root."""
    command, prepare = ACTIONS[action]
    kept = prepare(area) if prepare else None
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from runtime import forkserver; forkserver.serve({area['servers']!r})",
        ],
        cwd=os.path.dirname(os.path.dirname(os.path.realpath(forkserver.__file__))),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        mine = (forkserver.install_identity(), forkserver.process_identity("self"))
        path = os.path.join(area["servers"], os.path.basename(forkserver.socket_path(mine)))
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert server.poll() is None, "the fork server exited"
            assert time.monotonic() < deadline, "the fork server never listened"
            time.sleep(0.05)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # The mistake this guards against: a socket any user can open.
        os.chmod(area["servers"], 0o755)
        os.chmod(path, 0o666)
        environment = [f"ZVIZ_SHIM_ROOT={area['state']}".encode(), b"PATH=/usr/bin:/bin"]
        argv = ["containerd-shim-zviz-v2", *command(area["state"])]
        request = (forkserver.SHIM_ENTRY, area["bundle"], argv, environment)
        # The request bytes exactly as a client sends them (send_request).
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with left, right:
            forkserver.send_request(left, forkserver.install_identity(), request, (0, 1, 2))
            payload, ancillary, _, _ = right.recvmsg(forkserver.MAX_REQUEST, socket.CMSG_SPACE(12))
        for _, _, data in ancillary:
            for fd in struct.unpack(f"{len(data) // 4}i", data):
                os.close(fd)
        result = subprocess.run(
            ["/usr/bin/python3", "-I", "-c", RAW_CLIENT, payload.hex(), path],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            capture_output=True,
            encoding="utf-8",
            errors="replace",  # a delete a worker ran would write its binary answer here
            timeout=60,
            cwd=area["bundle"],
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "reply: fallback client not root"
        time.sleep(0.5)  # a daemon a worker had launched would be up by now
        if kept:
            assert os.path.exists(kept), "a shim delete ran for the other user"
        else:
            assert os.listdir(area["state"]) == [], "a shim start ran for the other user"
        assert _processes_with(f"ZVIZ_SHIM_ROOT={area['state']}") == {}
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("action", ACTIONS)
def test_the_installed_shim_client_run_by_another_user_makes_root_run_nothing(area, action):
    """The compiled client as 65534 does not even ask (not root: the Python entry, as
    that user, which cannot launch or remove anything as root)."""
    command, prepare = ACTIONS[action]
    kept = prepare(area) if prepare else None
    client = os.path.join(forkserver.scripts_dir(), forkserver.ENTRY_NAMES[forkserver.SHIM_ENTRY])
    with open(client, "rb") as f:
        if f.read(4) != b"\x7fELF":
            pytest.skip(f"{client} is not the compiled client (`make install` builds it)")
    result = subprocess.run(
        [client, *command(area["state"])],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        env={"ZVIZ_SHIM_ROOT": area["state"], "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
        cwd=area["bundle"],
        input=b"",
    )
    time.sleep(0.5)
    runs = _processes_with(f"ZVIZ_SHIM_ROOT={area['state']}")
    assert 0 not in runs.values(), f"root runs for another user's {action}: {runs}"
    if kept:
        assert os.path.exists(kept), f"root deleted for another user: {result.stderr}"
        return
    for dirpath, dirnames, filenames in os.walk(area["state"]):
        for name in dirnames + filenames:
            owner = os.lstat(os.path.join(dirpath, name)).st_uid
            assert owner == NOBODY, f"{name} made by uid {owner}: {result.stderr}"
