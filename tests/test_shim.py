"""Unit tests of the shim's parts that need neither root nor containerd: flags, config and
grouping, runtime options decoding, stdio URIs, metrics conversion, mount options,
the reaper (with real child processes) and the log format."""

import asyncio
import functools
import os
import signal
import threading
import time
import types

import pytest

from api import typeurl
from api.gen.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from api.gen.containerd.runtimeoptions.v1 import api_pb2 as runtimeoptions
from runtime import linux
from runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from runtime.state import exit_code_from_wait_status as exit_code
from shim import config as shim_config
from shim.log import LogrusFormatter
from shim.main import UsageError, parse_flags
from shim.mounts import parse_options
from shim.process import Process, State
from shim.reaper import Reaper
from shim.stats import metrics_any, metrics_v1, metrics_v2
from shim.stdio import Stdio, parse_uri
from tests.privileges import needs_root

# ---- flags -------------------------------------------------------------------------


def test_flags_parse_like_go_flag_package():
    flags = parse_flags(
        [
            "-namespace",
            "k8s.io",
            "--address=/run/c.sock",
            "-publish-binary",
            "/bin/c",
            "-id",
            "x",
            "-debug",
            "start",
        ]
    )
    assert (flags.namespace, flags.address, flags.publish_binary, flags.id) == (
        "k8s.io",
        "/run/c.sock",
        "/bin/c",
        "x",
    )
    assert flags.debug is True
    assert flags.action == "start"


def test_flags_without_action_mean_serve_and_round_trip():
    flags = parse_flags(["-namespace", "ns", "-id", "a", "-socket", "unix:///s", "-debug=false"])
    assert flags.action == ""
    assert flags.debug is False
    again = parse_flags(flags.to_args())
    assert (again.namespace, again.id, again.socket) == ("ns", "a", "unix:///s")


def test_flags_reject_unknown_and_missing_values():
    with pytest.raises(UsageError, match="-bogus"):
        parse_flags(["-bogus", "start"])
    with pytest.raises(UsageError, match="-id"):
        parse_flags(["-id"])
    with pytest.raises(UsageError, match="boolean"):
        parse_flags(["-debug=maybe"])


# ---- config and grouping ------------------------------------------------------------


def test_grouping_modes():
    pod = {shim_config.SANDBOX_ID_ANNOTATION: "sb1"}
    namespace = shim_config.ShimConfig(grouping="namespace")
    per_pod = shim_config.ShimConfig(grouping="pod")
    per_container = shim_config.ShimConfig(grouping="container")
    assert shim_config.group_id("a", {}, namespace) == shim_config.group_id("b", pod, namespace)
    assert shim_config.group_id("a", pod, per_pod) == shim_config.group_id("b", pod, per_pod)
    assert shim_config.group_id("a", {}, per_pod) != shim_config.group_id("b", {}, per_pod)
    assert shim_config.group_id("a", pod, per_container) != shim_config.group_id(
        "b", pod, per_container
    )
    explicit = {shim_config.GROUP_ANNOTATION: "g"}
    assert shim_config.group_id("a", explicit, per_container) == shim_config.group_id(
        "b", explicit, per_container
    )


def test_default_grouping_is_per_pod_under_cri_and_per_namespace_elsewhere():
    unset = shim_config.ShimConfig()
    pod_a = {shim_config.SANDBOX_ID_ANNOTATION: "sandbox-a"}
    pod_b = {shim_config.SANDBOX_ID_ANNOTATION: "sandbox-b"}
    assert shim_config.group_id("a1", pod_a, unset) == shim_config.group_id("a2", pod_a, unset)
    assert shim_config.group_id("a1", pod_a, unset) != shim_config.group_id("b1", pod_b, unset)
    assert shim_config.group_id("x", {}, unset) == shim_config.group_id("y", {}, unset)
    # The operator may still put every pod of a namespace in one daemon.
    namespace = shim_config.ShimConfig(grouping="namespace")
    assert shim_config.group_id("a1", pod_a, namespace) == shim_config.group_id(
        "b1", pod_b, namespace
    )


def test_a_pod_cannot_choose_its_daemon_with_the_group_annotation():
    chosen = {shim_config.GROUP_ANNOTATION: "shared"}
    pod_a = {shim_config.SANDBOX_ID_ANNOTATION: "sandbox-a", **chosen}
    pod_b = {shim_config.SANDBOX_ID_ANNOTATION: "sandbox-b", **chosen}
    for config in (shim_config.ShimConfig(), shim_config.ShimConfig(grouping="container")):
        assert shim_config.group_id("a1", pod_a, config) != shim_config.group_id(
            "b1", pod_b, config
        )
    # Outside CRI (ctr, nerdctl: root's own choice) the annotation still groups.
    assert shim_config.group_id("x", chosen, shim_config.ShimConfig()) == "group:shared"


def test_config_file_without_grouping_leaves_it_to_the_default(tmp_path):
    path = tmp_path / "shim.toml"
    path.write_text('profile = "ci-runner"\n')
    assert shim_config.load_config(str(path)).grouping is None


def test_group_socket_paths_are_short_and_distinct():
    one = shim_config.group_dir("/run/containerd/containerd.sock", "default", "namespace")
    two = shim_config.group_dir("/run/containerd/containerd.sock", "k8s.io", "namespace")
    three = shim_config.group_dir("/run/other.sock", "default", "namespace")
    assert len({one, two, three}) == 3
    assert len(shim_config.socket_path(one)) <= shim_config.SOCKET_PATH_LIMIT


def test_config_file(tmp_path):
    path = tmp_path / "shim.toml"
    path.write_text(
        'profile = "strict"\ngrouping = "pod"\nidle_exit_seconds = 0\nstall_timeout_seconds = 2\n'
    )
    config = shim_config.load_config(str(path))
    assert (config.profile, config.grouping, config.idle_exit_seconds) == ("strict", "pod", 0.0)
    assert config.stall_timeout_seconds == 2.0
    assert shim_config.load_config(None).stall_timeout_seconds == 30.0


@pytest.mark.parametrize(
    "text, problem",
    [
        ('grouping = "everything"\n', "grouping"),
        ("idle_exit_seconds = -1\n", "idle_exit_seconds"),
        ("stall_timeout_seconds = 0\n", "stall_timeout_seconds"),
        ('profile = ""\n', "profile"),
        ('colour = "blue"\n', "unknown keys"),
        ("grouping = \n", "shim config"),
        ('allow_host_network = "yes"\n', "allow_host_network: must be true or false"),
    ],
)
def test_config_file_errors_name_the_problem(tmp_path, text, problem):
    path = tmp_path / "shim.toml"
    path.write_text(text)
    with pytest.raises(shim_config.ConfigError, match=problem):
        shim_config.load_config(str(path))


def test_allow_host_network_per_handler_over_the_node_file(tmp_path):
    node = tmp_path / "node.toml"
    node.write_text("allow_host_network = true\n")
    handler = tmp_path / "handler.toml"
    handler.write_text("allow_host_network = false\n")
    base = shim_config.load_config(str(node))
    assert shim_config.ShimConfig().allow_host_network is None  # unset: refused
    assert shim_config.load_config(str(handler)).over(base).allow_host_network is False
    unset = tmp_path / "unset.toml"
    unset.write_text('profile = "batch-job"\n')
    assert shim_config.load_config(str(unset)).over(base).allow_host_network is True


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(shim_config.ConfigError, match="No such file"):
        shim_config.load_config(str(tmp_path / "absent.toml"))


def test_runtime_options_decoded_by_hand_match_protobuf():
    packed = typeurl.pack(runtimeoptions.Options(type_url="x", config_path="/etc/zviz/shim.toml"))
    assert shim_config.decode_runtime_options(packed.SerializeToString()) == "/etc/zviz/shim.toml"
    assert shim_config.decode_runtime_options(b"") is None
    other = typeurl.pack(runtimeoptions.Options(config_path="/x"))
    other.type_url = "containerd.runc.v1.Options"
    assert shim_config.decode_runtime_options(other.SerializeToString()) is None
    with pytest.raises(shim_config.ConfigError, match="truncated"):
        shim_config.decode_runtime_options(packed.SerializeToString()[:-3] + b"\x80")


def test_start_input_in_both_forms_decoded_by_hand_match_protobuf():
    options = typeurl.pack(runtimeoptions.Options(config_path="/etc/zviz/a.toml"))
    other = typeurl.pack(runtimeoptions.Options(config_path="/x"))
    other.type_url = "containerd.runc.v1.Options"
    decode = shim_config.decode_start_input
    assert decode(options.SerializeToString(), "c1", "ns") == ("/etc/zviz/a.toml", False)
    assert decode(b"", "c1", "ns") == (None, False)
    params = bootstrap_pb2.BootstrapParams(
        instance_id="c1",
        namespace="ns",
        log_level=bootstrap_pb2.LOG_LEVEL_TRACE,
        socket_dir="/run/s",
        extensions=[bootstrap_pb2.Extension(value=v) for v in (other, options)],
    )
    assert decode(params.SerializeToString(), "c1", "ns") == ("/etc/zviz/a.toml", True)
    del params.extensions[1]
    assert decode(params.SerializeToString(), "c1", "ns") == (None, True)
    # Another container's parameters are not taken for ours (nor for runtime options).
    assert decode(params.SerializeToString(), "c2", "ns") == (None, False)
    with pytest.raises(shim_config.ConfigError, match="truncated"):
        decode(params.SerializeToString()[:-2], "c1", "ns")


def test_start_reply_matches_the_bootstrap_result_containerd_reads():
    address = "unix:///run/zviz-shim/g/abc/sock"
    assert shim_config.start_reply(address, bootstrap=False) == address.encode()
    reply = bootstrap_pb2.BootstrapResult.FromString(shim_config.start_reply(address, True))
    assert reply == bootstrap_pb2.BootstrapResult(version=2, address=address, protocol="ttrpc")


# ---- stdio ---------------------------------------------------------------------------


def test_stdio_uris():
    assert parse_uri("") == ("", "", [])
    assert parse_uri("/run/fifo/x-stdout") == ("fifo", "/run/fifo/x-stdout", [])
    assert parse_uri("fifo:///run/f") == ("fifo", "/run/f", [])
    assert parse_uri("file:///var/log/c.log") == ("file", "/var/log/c.log", [])
    assert parse_uri("binary:///usr/bin/logger?tag=web&debug=") == (
        "binary",
        "/usr/bin/logger",
        ["tag", "web", "debug"],
    )
    with pytest.raises(InvalidArgument, match="unsupported scheme"):
        parse_uri("http://example.com/x")


# ---- metrics ---------------------------------------------------------------------------

V1_STATS = {
    "version": 1,
    "pids": {"current": 3, "limit": 100},
    "cpu": {
        "usage_ns": 5000,
        "user_ns": 3000,
        "system_ns": 2000,
        "per_cpu_ns": [2500, 2500],
        "periods": 7,
    },
    "memory": {
        "usage": 4096,
        "limit": 1 << 30,
        "max_usage": 8192,
        "failcnt": 1,
        "cache": 10,
        "rss": 20,
        "swap": {"usage": 1, "limit": 2, "max_usage": 3, "failcnt": 0},
        "kernel": {"usage": 5},
        "kernel_tcp": {},
        "stat": {
            "pgfault": 11,
            "pgmajfault": 12,
            "pgpgin": 13,
            "total_rss": 20,
            "hierarchical_memory_limit": 99,
        },
    },
    "memory_oom_control": {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 2},
    "blkio": {"io_service_bytes_recursive": [{"major": 8, "minor": 0, "op": "Read", "value": 512}]},
}


def test_metrics_v1_carry_memory_pids_and_cpu():
    m = metrics_v1(V1_STATS)
    assert (m.pids.current, m.pids.limit) == (3, 100)
    assert (m.cpu.usage.total, m.cpu.usage.user, m.cpu.usage.kernel) == (5000, 3000, 2000)
    assert list(m.cpu.usage.per_cpu) == [2500, 2500]
    assert (m.memory.usage.usage, m.memory.usage.limit, m.memory.usage.max) == (4096, 1 << 30, 8192)
    assert (m.memory.pg_fault, m.memory.pg_maj_fault, m.memory.pg_pg_in) == (11, 12, 13)
    assert m.memory.hierarchical_memory_limit == 99
    assert m.memory.swap.usage == 1 and m.memory.kernel.usage == 5
    assert m.memory_oom_control.oom_kill == 2
    assert m.blkio.io_service_bytes_recursive[0].value == 512
    packed = metrics_any(V1_STATS)
    assert packed.type_url == "io.containerd.cgroups.v1.Metrics"


def test_metrics_v2():
    stats = {
        "version": 2,
        "pids": {"current": 1, "limit": 0},
        "cpu": {"usage_ns": 7_000_000, "user_ns": 4_000_000, "system_ns": 3_000_000},
        "memory": {
            "usage": 100,
            "limit": 200,
            "stat": {"anon": 50, "file": 25},
            "swap": {"usage": 0, "limit": 0},
        },
        "memory_events": {"oom": 1, "oom_kill": 1},
        "io": [{"major": 8, "minor": 0, "rbytes": 10, "wbytes": 20}],
    }
    m = metrics_v2(stats)
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (7000, 4000, 3000)
    assert (m.memory.usage, m.memory.usage_limit, m.memory.anon, m.memory.file) == (
        100,
        200,
        50,
        25,
    )
    assert m.memory_events.oom_kill == 1
    assert m.io.usage[0].wbytes == 20
    assert metrics_any(stats).type_url == "io.containerd.cgroups.v2.Metrics"


def test_metrics_clamp_nonsense_values():
    m = metrics_v1({"version": 1, "pids": {"current": -5, "limit": "x"}})
    assert (m.pids.current, m.pids.limit) == (0, 0)


# ---- mounts ---------------------------------------------------------------------------


def test_mount_options_split_flags_and_data():
    flags, propagation, data = parse_options(
        ["ro", "nosuid", "index=off", "lowerdir=/a:/b", "upperdir=/u", "workdir=/w", "rprivate"]
    )
    assert flags == linux.MS_RDONLY | linux.MS_NOSUID
    assert propagation == linux.MS_PRIVATE | linux.MS_REC
    assert data == "index=off,lowerdir=/a:/b,upperdir=/u,workdir=/w"
    flags, _, data = parse_options(["rbind", "ro", "rw"])
    assert flags == linux.MS_BIND | linux.MS_REC and data == ""
    flags, _, data = parse_options(["defaults", "nodev"])
    assert flags == linux.MS_NODEV and data == ""


# ---- reaper ---------------------------------------------------------------------------


def _child(code: int | None = None, sig: int | None = None, delay: float = 0.0) -> int:
    pid = os.fork()
    if pid == 0:
        time.sleep(delay)
        if sig is not None:
            os.kill(os.getpid(), sig)
        os._exit(code or 0)
    return pid


def test_the_shim_reads_exit_statuses_with_the_runtimes_one_function():
    """Containerd's exit_status and state.json's exitStatus come from one function."""
    from shim import process

    assert process.exit_code_from_wait_status is exit_code
    from shim import reaper

    assert not hasattr(reaper, "exit_code")


def test_exit_code_of_wait_statuses():
    pid = _child(code=3)
    assert exit_code(os.waitpid(pid, 0)[1]) == 3
    pid = _child(sig=signal.SIGKILL)
    assert exit_code(os.waitpid(pid, 0)[1]) == 137


def test_reaper_routes_exits_and_keeps_early_ones():
    async def scenario():
        loop = asyncio.get_running_loop()
        reaper = Reaper()
        reaper.install(loop)
        got: dict[int, int] = {}
        done = asyncio.Event()

        def record(pid):
            def on_exit(status):
                got[pid] = exit_code(status)
                if len(got) == 3:
                    done.set()

            return on_exit

        early = _child(code=7)
        await asyncio.sleep(0.2)  # exits and is reaped before anyone registered it
        late = _child(code=0, delay=0.2)
        killed = _child(sig=signal.SIGTERM, delay=0.1)
        for pid in (early, late, killed):
            reaper.register(pid, record(pid))
        async with asyncio.timeout(10):
            await done.wait()
        loop.remove_signal_handler(signal.SIGCHLD)
        return got, early, late, killed

    try:
        got, early, late, killed = asyncio.run(scenario())
    finally:
        # install() made this test process a subreaper: undo it, or every orphan of later
        # tests (shim daemons) would become a zombie child of pytest.
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 0)
    assert got == {early: 7, late: 0, killed: 128 + signal.SIGTERM}


def test_reaper_never_takes_a_child_a_worker_thread_waits_for():
    """The core waits for its children by pid in the shim's worker threads while the loop
    reaps: the loop must take the orphans (a container init, once its parent, the
    namespace child, exits), never the worker's own child, and what a worker's call left
    unreaped is handed to the loop when the call ends."""

    def core_call(pid_pipe):
        # Like the core's namespace child: forks the "init", reports its pid, exits.
        middle = os.fork()
        if middle == 0:
            init = os.fork()
            if init == 0:
                time.sleep(0.2)
                os._exit(5)
            os.write(pid_pipe, str(init).encode())
            os._exit(3)
        time.sleep(0.5)  # the orphan exits and is reaped by the loop meanwhile
        status = os.waitpid(middle, 0)[1]  # ECHILD if the loop took it
        left_unwaited = _child(code=9, delay=0.2)  # still running when the call returns
        left_killed = _child(sig=signal.SIGTERM, delay=0.2)
        return exit_code(status), (left_unwaited, left_killed)

    async def scenario():
        loop = asyncio.get_running_loop()
        reaper = Reaper()
        reaper.install(loop)
        got: dict[int, int] = {}
        read_end, write_end = os.pipe()
        try:
            worker = loop.run_in_executor(None, _in_worker_thread, reaper, core_call, write_end)
            await asyncio.sleep(0.1)
            init = int(os.read(read_end, 32))
            reaper.register(init, lambda status: got.setdefault(init, exit_code(status)))
            middle_code, left = await worker
            for pid in left:
                reaper.register(pid, lambda s, pid=pid: got.setdefault(pid, exit_code(s)))
            async with asyncio.timeout(10):
                while len(got) < 3:
                    await asyncio.sleep(0.02)
        finally:
            os.close(read_end)
            os.close(write_end)
            loop.remove_signal_handler(signal.SIGCHLD)
        return middle_code, got, init, left

    try:
        middle_code, got, init, (left_unwaited, left_killed) = asyncio.run(scenario())
    finally:
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 0)  # as above
    assert middle_code == 3
    assert got == {init: 5, left_unwaited: 9, left_killed: 128 + signal.SIGTERM}


def _in_worker_thread(reaper, call, *args):
    """What shim.service runs in a worker: the call, then the collection of its leftovers."""
    try:
        return call(*args)
    finally:
        reaper.collect_thread_children()


def test_signalling_an_exec_answers_as_runcs_shim_does():
    """Not yet started: FAILED_PRECONDITION (nothing to signal yet); finished: NOT_FOUND
    (CRI reads NOT_FOUND as "already exited", which a created exec is not)."""
    task = types.SimpleNamespace(id="zviz-shim-unit")
    created = Process(task, "e1", None)
    with pytest.raises(FailedPrecondition, match="not started"):
        created.signal(signal.SIGKILL)

    # Running as the shim last knew, but reaped already (its exit not handled yet).
    finished = Process(task, "e2", None)
    finished.pid = _child(code=0)
    os.waitpid(finished.pid, 0)
    finished.to(State.RUNNING)
    with pytest.raises(NotFound, match="process already finished"):
        finished.signal(signal.SIGKILL)
    finished.to(State.STOPPED)
    with pytest.raises(NotFound, match="process already finished"):
        finished.signal(signal.SIGKILL)


# ---- log format ----------------------------------------------------------------------------


def test_log_lines_are_logrus_text():
    import logging

    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, 'bad "thing"\nhappened', None, None
    )
    record.container = "c1"
    line = LogrusFormatter("k8s.io").format(record)
    assert line.startswith('time="')
    assert 'level=warning msg="bad \\"thing\\"\\nhappened" id=c1 namespace=k8s.io' in line
    assert line.endswith("runtime=io.containerd.zviz.v2\n")


# ---- hand-encoded protobuf on the fast paths ------------------------------------------------


@pytest.mark.parametrize(
    "pid, status, when", [(0, 0, 0.0), (1, 137, 1700000000.25), (2**31, 255, 1.5)]
)
def test_hand_encoded_delete_response_matches_protobuf(pid, status, when):
    from api.gen.containerd.task.v2 import shim_pb2
    from shim.cleanup import encode_delete_response

    decoded = shim_pb2.DeleteResponse.FromString(encode_delete_response(pid, status, when))
    assert (decoded.pid, decoded.exit_status) == (pid, status)
    assert decoded.exited_at.seconds == int(when)
    assert abs(decoded.exited_at.nanos - (when - int(when)) * 1e9) < 1000


def test_hand_encoded_process_details_is_a_string_field():
    from shim import wire

    raw = wire.field_bytes(1, b"exec-1")
    assert wire.length_delimited_fields(raw) == {1: b"exec-1"}
    with pytest.raises(wire.WireError):
        wire.length_delimited_fields(raw[:-1])


# ---- stdio with real fifos --------------------------------------------------------------------


def _stdio_scenario(tmp_path, body):
    from shim.stdio import Stdio

    stdin_path = str(tmp_path / "stdin")
    stdout_path = str(tmp_path / "stdout")
    os.mkfifo(stdin_path)
    os.mkfifo(stdout_path)

    async def run():
        out_reader = os.open(stdout_path, os.O_RDONLY | os.O_NONBLOCK)  # the client's end
        stdio = await Stdio.open(
            stdin_path,
            stdout_path,
            "",
            terminal=False,
            container_id="c",
            namespace="n",
            console_dir=str(tmp_path),
        )
        try:
            return await body(stdio, stdin_path, out_reader)
        finally:
            stdio.close()
            os.close(out_reader)

    return asyncio.run(run())


async def _read_until_eof(fd: int, timeout: float = 10) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            if not chunk:
                return data
            data += chunk


@needs_root("chowns the process's fifos and pipes to its host uid")
def test_stdio_is_given_to_the_process_user_fifos_and_pipes_only(tmp_path):
    # /dev/stdout reopens the fifo: its owner must be the process's host uid (a user
    # namespace's root, a runAsUser), not the shim's root.
    async def body(stdio, stdin_path, _):
        stdio.give_to(123456, 234567)
        owners = [(os.fstat(fd).st_uid, os.fstat(fd).st_gid) for fd in stdio.child[:2]]
        stdout_on_disk = os.stat(tmp_path / "stdout")
        return owners, (stdout_on_disk.st_uid, stdout_on_disk.st_gid), os.fstat(stdio.child[2])

    owners, on_disk, stderr = _stdio_scenario(tmp_path, body)
    assert owners == [(123456, 234567)] * 2  # the stdin pipe and the stdout fifo
    assert on_disk == (123456, 234567)
    assert (stderr.st_uid, stderr.st_gid) == (0, 0)  # /dev/null (no stderr) is left alone


def test_stdin_ends_when_the_client_closes_even_if_it_connects_late(tmp_path):
    async def body(stdio, stdin_path, _):
        process_stdin = stdio.child[0]
        await asyncio.sleep(0.1)  # no writer yet: the process must not see EOF
        os.set_blocking(process_stdin, False)
        with pytest.raises(BlockingIOError):
            os.read(process_stdin, 10)
        writer = os.open(stdin_path, os.O_WRONLY)
        os.write(writer, b"hello\n")
        os.close(writer)
        return await _read_until_eof(process_stdin)

    assert _stdio_scenario(tmp_path, body) == b"hello\n"


def test_close_io_ends_stdin_while_the_client_still_holds_it(tmp_path):
    async def body(stdio, stdin_path, _):
        writer = os.open(stdin_path, os.O_WRONLY)
        try:
            os.write(writer, b"partial")
            await asyncio.sleep(0.05)
            stdio.close_stdin()
            return await _read_until_eof(stdio.child[0])
        finally:
            os.close(writer)

    assert _stdio_scenario(tmp_path, body) == b"partial"


def test_stdout_is_the_fifo_itself_and_ends_with_the_process(tmp_path):
    async def body(stdio, _, out_reader):
        process_stdout = os.dup(stdio.child[1])
        stdio.spawned()  # the shim drops its copy: only the "process" writes now
        os.write(process_stdout, b"output\n")
        os.close(process_stdout)  # the process exits
        return await _read_until_eof(out_reader)

    assert _stdio_scenario(tmp_path, body) == b"output\n"


# ---- event publisher -------------------------------------------------------------------


def _socket_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass
    return count


def test_publisher_makes_one_connection_when_an_event_races_the_first_connect(tmp_path):
    """The daemon connects at startup and its first Create publishes at once: both must
    share one connection to containerd (a second one would stay open, unused, forever)."""
    from google.protobuf import empty_pb2

    from api.gen.containerd.events import task_pb2 as task_events
    from api.gen.containerd.services.ttrpc.events.v1 import events_ttrpc
    from api.ttrpc import Server
    from shim.events import Publisher

    class Recorder(events_ttrpc.EventsService):
        def __init__(self) -> None:
            self.topics: list[str] = []

        async def Forward(self, request, context):
            self.topics.append(request.envelope.topic)
            return empty_pb2.Empty()

    async def scenario():
        recorder = Recorder()
        server = Server()
        server.register(recorder)
        address = "unix://" + str(tmp_path / "events.sock")
        await server.start(address)
        before = _socket_fds()
        publisher = Publisher(address, "zviz-shim-unit")
        connecting = asyncio.get_running_loop().create_task(publisher.connect())
        publisher.publish("/tasks/create", task_events.TaskCreate(container_id="c"))
        await connecting
        assert await publisher.drain(10)
        opened = _socket_fds() - before  # our client end and the server's accepted end
        await publisher.close()
        await server.shutdown(timeout=5)
        return recorder.topics, opened

    topics, opened = asyncio.run(scenario())
    assert topics == ["/tasks/create"]
    assert opened == 2


def _pipe_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        except FileNotFoundError:
            pass
    return count


def test_a_stream_not_sent_to_the_logger_keeps_no_pipe_to_it(tmp_path):
    """stdout to a logger, stderr nowhere: the logger's stderr pipe must be closed at once,
    so the logger sees that stream end and the daemon holds no fd for it."""
    logger = tmp_path / "logger"
    logger.write_text("#!/bin/sh\nexit 0\n")  # exiting closes fd 5: ready
    logger.chmod(0o755)

    async def scenario():
        before = _pipe_fds()
        stdio = await Stdio.open(
            "",
            f"binary://{logger}",
            "",
            terminal=False,
            container_id="c",
            namespace="n",
            console_dir=str(tmp_path),
        )
        held = _pipe_fds() - before
        child_stderr = os.readlink(f"/proc/self/fd/{stdio.child[2]}")
        stdio.close()
        os.waitpid(stdio.logger_pid, 0)
        return held, child_stderr, _pipe_fds() - before

    held, child_stderr, left = asyncio.run(scenario())
    assert child_stderr == "/dev/null"
    assert held == 1  # the write end of the logger's stdout pipe, for the process
    assert left == 0


# ---- worker threads (shim/workers.py) ---------------------------------------------------


def test_workers_run_jobs_at_once_up_to_the_limit_and_never_block_the_loop():
    from shim.workers import Workers

    limit = 3
    release = threading.Event()
    running: list[str] = []
    most_at_once = 0

    def job(name):
        nonlocal most_at_once
        running.append(name)
        most_at_once = max(most_at_once, len(running))
        release.wait(10)
        running.remove(name)
        if name == "fails":
            raise ValueError(name)
        return name

    async def scenario():
        loop = asyncio.get_running_loop()
        workers = Workers(limit)
        began = time.monotonic()
        futures = [workers.submit(loop, functools.partial(job, f"job{i}")) for i in range(5)]
        futures.append(workers.submit(loop, functools.partial(job, "fails")))
        submitted_in = time.monotonic() - began
        while len(running) < limit:
            await asyncio.sleep(0.01)  # the loop runs while every thread is busy
        await asyncio.sleep(0.1)
        blocked = len(running)
        release.set()
        results = await asyncio.gather(*futures, return_exceptions=True)
        return submitted_in, blocked, results

    submitted_in, blocked, results = asyncio.run(scenario())
    assert submitted_in < 0.5  # starting a thread does not wait for it
    assert blocked == limit and most_at_once == limit
    assert results[:5] == [f"job{i}" for i in range(5)]
    assert isinstance(results[5], ValueError)
