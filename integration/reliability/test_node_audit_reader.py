"""The node's audit reader (shim/audit_reader.py, docs/denials.md) through containerd.

Three containers, each with a shim daemon of its own, under one private containerd whose
shims use a reader directory of this session's own: their seccomp denials are recorded while no shim daemon holds an
audit socket (the reader alone does); the reader killed, every daemon reads the kernel
itself at once (no container's records stop), starts a new reader and moves to it.
"""

import os
import shutil
import signal
import time

import pytest

from integration.ids import tagged, unique_id
from runtime import denials
from shim import audit_reader
from shim import config as shim_config
from tools.containerd import PrivateContainerd
from tools.mkimage import DEFAULT_REF

pytestmark = pytest.mark.containerd

ZVIZ = "io.containerd.zviz.v2"
CONTAINERS = 3
LOOP = "while true; do unshare -n true; sleep 0.2; done"


@pytest.fixture(scope="module")
def node(busybox_archive):
    where = os.path.join("/run", tagged("zviz-audit-reader"))
    instance = PrivateContainerd()
    instance.env[audit_reader.DIR_VARIABLE] = where
    instance.start()
    try:
        instance.import_image(busybox_archive)
        yield instance, where
    finally:
        instance.stop()
        reader = _reader_pid(where)
        if reader is not None:  # exits with its last daemon; never left behind
            os.kill(reader, signal.SIGKILL)
        shutil.rmtree(where, ignore_errors=True)


def _reader_pid(where: str) -> int | None:
    """The reader holding the lock (its pid in the lock file), if it runs."""
    try:
        with open(os.path.join(where, audit_reader.LOCK_NAME)) as f:
            pid = int(f.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            alive = b"shim.audit_reader" in f.read()
    except (OSError, ValueError):
        return None
    return pid if alive else None


def _audit_group_sockets() -> set[int]:
    """Inodes of the node's NETLINK_AUDIT sockets bound to the log group."""
    inodes = set()
    with open("/proc/net/netlink") as f:
        next(f)
        for line in f:
            fields = line.split()
            protocol, groups, inode = int(fields[1]), int(fields[3], 16), int(fields[9])
            if protocol == denials.NETLINK_AUDIT and groups & (
                1 << (denials.AUDIT_NLGRP_READLOG - 1)
            ):
                inodes.add(inode)
    return inodes


def _holders(pids: set[int]) -> set[int]:
    """Which of `pids` hold an audit log-group socket."""
    inodes = _audit_group_sockets()
    holding = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                    holding.add(pid)
        except OSError:
            continue
    return holding


def _shim_pids(address: str) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"containerd-shim-zviz-v2" in cmdline and address.encode() in cmdline:
            pids.add(int(entry))
    return pids


def _seccomp_records_after(path: str, since: float) -> int:
    records, _ = denials.read_lines(path)
    return sum(1 for r in records if r["source"] == "seccomp" and denials.record_time(r) > since)


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_one_reader_serves_every_daemon_and_is_replaced_when_it_dies(node):
    containerd, where = node
    state_root = shim_config.runtime_root(containerd.address, containerd.namespace)
    ids = [unique_id("zviz-audit-reader") for _ in range(CONTAINERS)]
    files = [os.path.join(state_root, cid, denials.DENIALS_FILE) for cid in ids]
    try:
        for cid in ids:
            # A daemon each (outside CRI one daemon serves a whole namespace by default).
            containerd.ctr("run", "-d", "--runtime", ZVIZ, "--annotation",
                           f"{shim_config.GROUP_ANNOTATION}={cid}", DEFAULT_REF, cid, "sh", "-c",
                           LOOP)  # fmt: skip
        started = time.time()
        for path in files:
            _wait(lambda p=path: _seccomp_records_after(p, started - 5), 30, f"records in {path}")
        reader = _wait(lambda: _reader_pid(where), 10, "a node reader")
        shims = _shim_pids(containerd.address)
        assert len(shims) == CONTAINERS, shims
        # Every daemon has moved to the reader: the reader alone holds an audit socket.
        _wait(lambda: _holders(shims | {reader}) == {reader}, 10, "the reader as the only holder")

        os.kill(reader, signal.SIGKILL)
        killed = time.time()
        # No container's records stop: each daemon reads the kernel itself meanwhile...
        for path in files:
            _wait(
                lambda p=path: _seccomp_records_after(p, killed),
                10,
                f"records after the kill in {path}",
            )
        # ...and a new reader takes over, the daemons leaving their own sockets for it.
        replacement = _wait(
            lambda: (pid := _reader_pid(where)) not in (None, reader) and pid, 15, "a new reader"
        )
        _wait(
            lambda: _holders(shims | {replacement}) == {replacement},
            15,
            "the new reader as the only holder",
        )
        moved = time.time()
        for path in files:
            _wait(
                lambda p=path: _seccomp_records_after(p, moved),
                10,
                f"records through the new reader in {path}",
            )
        # Records read by both in the overlap were not written twice (one per kernel record).
        for path in files:
            records, _ = denials.read_lines(path)
            stamps = [(r["time"], r["pid"]) for r in records if r["source"] == "seccomp"]
            assert len(stamps) == len(set(stamps)), f"duplicates in {path}"
    finally:
        for cid in ids:
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            containerd.ctr("tasks", "delete", "-f", cid, check=False)
            containerd.ctr("containers", "delete", cid, check=False)
    # The reader leaves with its last daemon.
    _wait(lambda: _reader_pid(where) is None, 10, "the reader gone with the last container")
    assert not os.path.exists(os.path.join(where, audit_reader.SOCKET_NAME))


def test_a_daemon_that_cannot_reach_a_reader_reads_the_kernel_itself(busybox_archive):
    """Fail-safe: a reader directory that cannot be made (beneath a regular file), so no
    reader ever answers: the daemon's records still come, from its own audit socket,
    and its log says so."""
    blocker = os.path.join("/run", tagged("zviz-audit-reader-file"))
    with open(blocker, "w"):
        pass
    containerd = PrivateContainerd()
    containerd.env[audit_reader.DIR_VARIABLE] = os.path.join(blocker, "reader")
    containerd.start()
    cid = unique_id("zviz-audit-reader-failsafe")
    try:
        containerd.import_image(busybox_archive)
        state_root = shim_config.runtime_root(containerd.address, containerd.namespace)
        path = os.path.join(state_root, cid, denials.DENIALS_FILE)
        containerd.ctr("run", "-d", "--runtime", ZVIZ, DEFAULT_REF, cid, "sh", "-c", LOOP)
        started = time.time()
        _wait(lambda: _seccomp_records_after(path, started - 5), 30, "records without a reader")
        shims = _shim_pids(containerd.address)
        assert _holders(shims) == shims and len(shims) == 1
        with open(containerd.log_path, errors="replace") as f:
            _wait(
                lambda: "reading the kernel's records myself" in f.read(), 10, "the fallback logged"
            )
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        containerd.ctr("tasks", "delete", "-f", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)
        containerd.stop()
        os.unlink(blocker)
