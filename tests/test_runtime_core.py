"""Fast unit tests of the runtime core's pure parts (no root, no kernel features)."""

import os
import signal

import pytest

from runtime import errors, linux, rootfs, state
from runtime.commands import parse_signal
from runtime.sync import Sync, error_from_message


def test_merge_mounts_user_entry_replaces_the_auto_mount():
    user = [rootfs.Mount("/dev/shm", "tmpfs", "shm", ["size=1m"])]
    merged = rootfs.merge_mounts(user)
    destinations = [m.destination for m in merged]
    assert destinations.count("/dev/shm") == 1
    assert next(m for m in merged if m.destination == "/dev/shm").options == ["size=1m"]
    assert {"/proc", "/dev", "/dev/pts", "/sys"} <= set(destinations)


def test_merge_mounts_puts_auto_children_after_a_user_parent():
    user = [rootfs.Mount("/data", "bind", "/x", ["rbind"]), rootfs.Mount("/dev", "tmpfs", "tmpfs")]
    destinations = [m.destination for m in rootfs.merge_mounts(user)]
    assert destinations.index("/dev") < destinations.index("/dev/pts")
    assert destinations.index("/dev") < destinations.index("/dev/shm")
    assert destinations.index("/proc") < destinations.index("/sys")


def test_merge_mounts_treats_double_slash_destinations_as_the_same_path():
    destinations = [
        m.destination for m in rootfs.merge_mounts([rootfs.Mount("//proc", "proc", "proc")])
    ]
    assert destinations.count("/proc") == 0 and destinations.count("//proc") == 1


def test_parse_options_splits_flags_propagation_and_data():
    flags, propagation, data = rootfs.parse_options(
        ["ro", "nosuid", "rbind", "rslave", "mode=755", "size=1m"]
    )
    assert flags == linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_BIND | linux.MS_REC
    assert propagation == linux.MS_SLAVE | linux.MS_REC
    assert data == "mode=755,size=1m"
    assert rootfs.parse_options(["ro", "rw"])[0] == 0


def test_secure_join_never_leaves_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc", root / "abs")
    os.symlink("../../../../..", root / "up")
    assert rootfs.secure_join(str(root), "/abs/passwd") == str(root / "etc" / "passwd")
    assert rootfs.secure_join(str(root), "/up/etc") == str(root / "etc")
    assert rootfs.secure_join(str(root), "/../../x") == str(root / "x")
    assert rootfs.secure_join(str(root), "/missing/../etc") == str(root / "etc")


def test_secure_join_refuses_symlink_loops(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(errors.InvalidArgument):
        rootfs.secure_join(str(tmp_path), "/loop/x")


@pytest.mark.parametrize("text,number", [("9", 9), ("KILL", 9), ("sigterm", 15), ("SIGUSR1", 10)])
def test_parse_signal_accepts_runc_forms(text, number):
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["0", "99", "NOPE", ""])
def test_parse_signal_rejects_unknown(text):
    with pytest.raises(errors.InvalidArgument):
        parse_signal(text)


def test_exit_codes_from_wait_status():
    assert state.exit_code_from_wait_status(3 << 8) == 3
    assert state.exit_code_from_wait_status(signal.SIGKILL) == 137
    # neither exited nor killed (a stop report): no code to give, as runc's 255
    assert state.exit_code_from_wait_status((signal.SIGSTOP << 8) | 0x7F) == 255


@pytest.mark.parametrize("bad", ["", "a/b", "..", "x y", "a" * 1025])
def test_container_ids_are_validated(bad):
    with pytest.raises(errors.InvalidArgument):
        state.validate_id(bad)


def test_proc_stat_of_self_and_of_nothing():
    me = state.proc_stat(os.getpid())
    assert me is not None and me.state in ("R", "S") and me.start_time > 0
    assert state.process_alive(os.getpid(), me.start_time)
    assert not state.process_alive(os.getpid(), me.start_time + 1)  # a recycled pid
    assert state.proc_stat(2**22 + 7) is None


def test_sync_round_trip_and_structured_errors():
    parent, child = Sync.pair()
    try:
        child.send("pid", pid=5)
        assert parent.recv() == {"type": "pid", "pid": 5}
        assert child.send_error("mount", OSError(1, "mount(/proc): Operation not permitted"))
        error = error_from_message(parent.recv())
        assert isinstance(error, errors.FailedPrecondition)
        assert str(error) == "mount: mount(/proc): Operation not permitted"
        child.send_error("exec", errors.NotFound("'x': executable file not found in $PATH"))
        assert isinstance(error_from_message(parent.recv()), errors.NotFound)
        r, w = os.pipe()
        parent.send_fds("mapped", [r], idmapped=True)
        message, fds = child.recv_fds(1)
        assert message == {"type": "mapped", "idmapped": True} and len(fds) == 1
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"
        for fd in (r, w, *fds):
            os.close(fd)
        child.close()
        assert parent.recv() is None  # EOF when every peer closed
    finally:
        parent.close()
        child.close()


@pytest.mark.parametrize("with_fds", [False, True])
def test_a_childs_error_survives_it_closing_with_our_packets_unread(with_fds):
    # The child fails before reading the parent's next instruction, reports, and exits:
    # its end closes with our packet unread, which leaves ECONNRESET pending on ours.
    # Seen under load as "internal error: ConnectionResetError" instead of the message.
    parent, child = Sync.pair()
    try:
        parent.send("start")
        assert child.send_error("mount", errors.InvalidArgument("/sys is a symlink in the image"))
        child.close()
        message = parent.recv_fds(1)[0] if with_fds else parent.recv()
        assert str(error_from_message(message)) == "mount: /sys is a symlink in the image"
        assert parent.recv() is None
    finally:
        parent.close()
        child.close()


@pytest.mark.parametrize(
    "argv,plain",
    [
        (["run", "x"], True),
        (["--root", "/r", "--log", "l", "--log-format", "json", "run", "--bundle", "b", "x"], True),
        (["run", "-d", "x"], False),
        (["run", "--console-socket=/s", "x"], False),
        (["run", "--pid-file", "p", "x"], False),
        (["create", "x"], False),
        (["state", "run"], False),
        (["--profile", "hostile-tenant", "--verbose", "run", "x"], True),
        (["--profile=hostile-tenant", "run", "--profile", "ci-runner", "x"], True),
        (["--profile", "run", "create", "x"], False),
        (["run", "-dt", "x"], False),
        (["run", "-b", "b", "x"], True),
        (["exec", "x", "true"], True),
        (["--root", "/r", "exec", "x", "sh", "-c", "echo"], True),
        (["exec", "-t", "x", "sh"], False),
        (["exec", "--detach", "x", "sleep", "1"], False),
        (["exec", "x", "ls", "-la"], False),  # the command's own flag cluster: slow, not wrong
    ],
)
def test_fork_server_serves_only_plain_runs_and_execs(argv, plain, monkeypatch):
    from runtime import forkserver

    for name in forkserver.UNSERVED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert forkserver.is_served(argv) is plain


def test_fork_server_does_not_serve_a_run_with_its_own_seccomp_cache(monkeypatch):
    """The worker has the server's environment: ZVIZ_SECCOMP_CACHE would be ignored, or,
    in a server started by that run, kept for every later run."""
    from runtime import forkserver

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv("ZVIZ_NO_FORKSERVER", raising=False)
    monkeypatch.setenv("ZVIZ_SECCOMP_CACHE", "/tmp/zh9b-cache")
    assert forkserver.is_served(["run", "x"]) is False
    # The compiled client: tests/test_forkserver_parity.py (its list is generated from ours).


def test_fork_servers_of_different_installs_never_share_a_socket():
    """A CI clone's `zviz run` must not reach a server running another checkout's code."""
    from runtime import VERSION, forkserver

    here = (forkserver.install_identity(), forkserver.process_identity("self"))
    executable, package, version = here[0]
    clone = ((executable, "/tmp/clone/runtime", version), here[1])
    older = ((executable, package, "0.0.1"), here[1])
    other_python = (("/usr/bin/python3.12", package, version), here[1])
    paths = {forkserver.socket_path(identity) for identity in (here, clone, older, other_python)}
    assert len(paths) == 4
    assert package == os.path.realpath(os.path.dirname(forkserver.__file__))
    assert version == VERSION


def test_the_fork_server_never_reads_a_gone_peers_pid_as_the_peer(tmp_path):
    """A peer that exited before the server read /proc/<pid>/ is "client gone", even when
    its pid now names a process exactly like the server (here: this process itself),
    through SO_PEERPIDFD's pidfd (Linux 6.5)."""
    import socket

    from runtime import forkserver

    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    child = os.fork()
    if child == 0:
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).connect(path)
        os._exit(0)
    conn, _ = listener.accept()
    os.waitpid(child, 0)  # gone and reaped: its pid is free for anyone
    pidfd = forkserver._peer_pidfd(conn)
    try:
        if pidfd is None:
            pytest.skip("no SO_PEERPIDFD (Linux < 6.5): the pid-reuse race stays")
        mine = forkserver.process_identity("self")
        assert forkserver._peer_refusal(os.getpid(), pidfd, mine) == "client gone"
    finally:
        if pidfd is not None:
            os.close(pidfd)
        conn.close()
        listener.close()


def test_the_fork_server_names_the_inherited_attribute_that_differs():
    """--debug's reason says which attribute sent the run the slow way."""
    from runtime import forkserver

    ids, cgroup, inherited = forkserver.process_identity("self")
    names = list(forkserver._inherited_names())
    changed = list(inherited)
    changed[names.index("NoNewPrivs")] = b"NoNewPrivs:\t2"  # a value no process has
    mine = (ids, cgroup, tuple(changed))
    reason = forkserver._peer_refusal(os.getpid(), None, mine)
    assert reason == "other inherited attributes: NoNewPrivs"
    assert forkserver._peer_refusal(os.getpid(), None, (ids, cgroup, inherited)) == ""


@pytest.mark.parametrize(
    "argv,profile,verbose",
    [
        (["--profile=hostile-tenant", "run", "x"], "hostile-tenant", False),
        (["--profile", "hostile-tenant", "--verbose", "create", "x"], "hostile-tenant", True),
        (["run", "--profile", "hostile-tenant", "--verbose", "x"], "hostile-tenant", True),
        (
            ["--profile", "ci-runner", "run", "--profile", "hostile-tenant", "x"],
            "hostile-tenant",
            False,
        ),
        (["run", "x"], None, False),
    ],
)
def test_profile_and_verbose_are_global_or_per_command(argv, profile, verbose):
    from runtime import commands

    args = commands.parse_args(argv)
    assert (args.profile, args.verbose) == (profile, verbose)


def test_only_read_only_bind_volumes_are_id_mapped_and_never_under_cap_sys_admin():
    import types

    from runtime import idmap

    mounts = [
        types.SimpleNamespace(destination="/secret", options=["rbind", "ro"]),
        types.SimpleNamespace(destination="/data", options=["rbind", "rw"]),
        types.SimpleNamespace(destination="/proc", options=["nosuid"]),
    ]
    spec = types.SimpleNamespace(mounts=mounts)
    null = os.open(os.devnull, os.O_RDONLY)
    fds = [null, null, None]  # /proc is no bind: open_bind_sources gives it no clone
    plain = types.SimpleNamespace(user_namespace=True, capabilities=frozenset())
    try:
        chosen = idmap.read_only_volumes(spec, fds, plain)
        assert [destination for destination, _ in chosen] == ["/secret"]
        assert all(fd != null for _, fd in chosen)  # the parent's own dup, closed by it
        for _, fd in chosen:
            os.close(fd)
        # A container that may change mount flags could make a mapped volume writable.
        admin = types.SimpleNamespace(
            user_namespace=True, capabilities=frozenset({"CAP_SYS_ADMIN"})
        )
        assert idmap.read_only_volumes(spec, fds, admin) == []
        no_userns = types.SimpleNamespace(user_namespace=False, capabilities=frozenset())
        assert idmap.read_only_volumes(spec, fds, no_userns) == []
        assert idmap.read_only_volumes(spec, fds, None) == []
    finally:
        os.close(null)


@pytest.mark.parametrize(
    ("value", "gid_map", "written"),
    [
        # containerd 2.x CRI's "every group may ping", in the default profiles' 65536 groups
        ("0 2147483647", "         0     100000      65536\n", "0 65535"),
        ("1000 2000", "0 100000 65536\n", "1000 2000"),
        # the widest overlap of several mapped ranges
        ("0 2147483647", "0 100000 1\n1 200000 1000\n", "1 1000"),
        ("70000 80000", "0 100000 65536\n", None),
        ("not numbers", "0 100000 65536\n", None),
    ],
)
def test_ping_group_range_is_narrowed_to_the_mapped_groups(value, gid_map, written):
    from runtime.spawn.sysctl import ping_group_range_within

    assert ping_group_range_within(value, gid_map) == written


def test_a_failed_create_keeps_its_error_and_carries_the_cleanups_beside_it(tmp_path):
    """The undoing's failures (a cgroup that will not go, a state dir that cannot be
    removed) travel beside the create's error, which stays the one raised: the shim's
    error table then names both (tests/test_shim_errors.py)."""
    from runtime.container import Container

    class StuckCgroup:
        def destroy(self):
            raise errors.FailedPrecondition("cgroup s5states: processes remain")

    container = Container(str(tmp_path), "s5states-undo", {})
    os.mkdir(container.dir)
    os.mkdir(os.path.join(container.dir, "not-a-file"))  # the flat rm -r cannot unlink it
    failure = errors.InvalidArgument("config.json: process: is required")
    container._undo_create(StuckCgroup(), failure)
    carried = errors.cleanup_errors(failure)
    assert [type(e) for e in carried] == [errors.FailedPrecondition, IsADirectoryError]
    assert "processes remain" in str(carried[0])
