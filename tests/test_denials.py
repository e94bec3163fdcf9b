"""Denial records (runtime/denials.py, shim/denials.py): parsing, mapping, rate limit, files.

The kernel and containerd paths are proven in integration/test_denials.py; here the parts
that decide what a record says, with the kernel's record text as it arrives.
"""

import io
import json
import os

import pytest

from runtime import denials
from runtime.security import seccomp
from runtime.security.broker import policy
from runtime.security.profiles import load_profile
from shim.denials import event

# A record as this kernel (6.18) multicasts it, from a busybox `unshare -n` under ci-runner.
UNSHARE = (
    "audit(1796500837.570:256): auid=100000 uid=100000 gid=100000 ses=7 pid=28058 "
    'comm="unshare" exe="/bin/busybox" sig=0 arch=c000003e syscall=272 compat=0 '
    "ip=0x4815c7 code=0x50000"
)


def test_parse_fields_reads_time_and_fields():
    when, fields = denials.parse_fields(UNSHARE)
    assert when == pytest.approx(1796500837.570)
    assert fields["comm"] == "unshare" and fields["exe"] == "/bin/busybox"
    assert fields["ses"] == "7" and fields["syscall"] == "272" and fields["code"] == "0x50000"


def test_parse_fields_decodes_a_hex_encoded_command():
    # The kernel hex-encodes untrusted strings with spaces or quotes: `comm="a b"` would
    # let a process forge fields, so it arrives as 612062.
    _, fields = denials.parse_fields("audit(1.000:1): pid=5 comm=6120622220783D31 syscall=1")
    assert fields["comm"] == 'a b" x=1'
    assert fields["pid"] == "5"


def _watcher_with(monkeypatch, tmp_path, profile_name="ci-runner", session=7):
    monkeypatch.setattr(denials, "session_of", lambda pid: session)
    watcher = denials.KernelWatcher()
    annotations = {
        "io.kubernetes.cri.sandbox-namespace": "team-a",
        "io.kubernetes.cri.sandbox-name": "build-1",
        "io.kubernetes.cri.sandbox-uid": "uid-1",
    }
    watcher.watch("c1", str(tmp_path), os.getpid(), load_profile(profile_name), annotations)
    return watcher


def test_a_kernel_record_of_our_session_becomes_one_record(monkeypatch, tmp_path):
    watcher = _watcher_with(monkeypatch, tmp_path)
    rec = watcher.handle(denials.AUDIT_SECCOMP, UNSHARE)
    assert rec is not None
    expected = {
        "container_id": "c1",
        "profile": "ci-runner",
        "pod_namespace": "team-a",
        "pod_name": "build-1",
        "pod_uid": "uid-1",
        "source": "seccomp",
        "pid": 28058,
        "comm": "unshare",
        "exe": "/bin/busybox",
        "syscall": "unshare",
        "syscall_nr": 272,
        "verdict": "EPERM",
        "rule": "profile ci-runner: deny unshare",
        "args": {},
    }
    assert {k: rec[k] for k in expected} == expected
    assert rec["time"] == "2026-12-05T20:00:37.570000Z"
    records, _ = denials.read_lines(denials.path_in(str(tmp_path)))
    assert records == [rec]


def test_records_of_other_sessions_and_mediated_calls_are_ignored(monkeypatch, tmp_path):
    watcher = _watcher_with(monkeypatch, tmp_path)
    other = UNSHARE.replace("ses=7", "ses=8").replace("pid=28058", "pid=999999999")
    assert watcher.handle(denials.AUDIT_SECCOMP, other) is None
    assert watcher.ignored == 1
    notified = UNSHARE.replace("code=0x50000", "code=0x7fc00000")  # the broker's connect
    assert watcher.handle(denials.AUDIT_SECCOMP, notified) is None
    assert watcher.handle(1300, UNSHARE) is None  # another record type
    assert denials.read_lines(denials.path_in(str(tmp_path)))[0] == []


def test_verdict_and_rule_follow_the_profile():
    profile = load_profile("ci-runner")
    errno_action = 0x50000
    assert denials.seccomp_verdict(errno_action, profile, "clone3") == "ENOSYS"
    assert denials.seccomp_verdict(0x80000000, profile, "mount") == "killed"
    assert (
        denials.seccomp_rule(profile, "socket") == "profile ci-runner: socket arguments not allowed"
    )
    unknown = "syscall_not_in_any_list"
    assert "not in allow" in denials.seccomp_rule(profile, unknown)


def test_rate_limit_lets_a_burst_through_then_counts():
    now = [0.0]
    limiter = denials.RateLimiter(burst=3, interval=10, clock=lambda: now[0])
    rec = {"container_id": "c1", "profile": "p", "source": "seccomp"}
    rec.update(syscall="unshare", verdict="EPERM")
    written = [r for _ in range(10) for r in limiter.admit(dict(rec))]
    assert len(written) == 3
    now[0] = 5
    assert [r for _ in range(5) for r in limiter.admit(dict(rec))] == []
    now[0] = 10.5  # still looping: a summary of the 12 dropped, and no new burst
    (summary,) = limiter.admit(dict(rec))
    assert summary["verdict"] == "suppressed" and summary["count"] == 12
    assert summary["counts"] == {"seccomp unshare EPERM": 12}
    assert summary["container_id"] == "c1"
    now[0] = 21  # the next interval's summary counts the one dropped at 10.5
    assert [r["count"] for r in limiter.flush(rec)] == [1]
    assert limiter.flush(rec) == []  # nothing dropped since: no summary
    now[0] = 40  # quiet for a whole interval: records again
    assert limiter.admit(dict(rec)) == [rec]


def test_a_record_file_stops_at_its_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(denials, "MAX_FILE_BYTES", 200)
    f = denials.RecordFile(str(tmp_path / denials.DENIALS_FILE))
    f.write([{"n": i, "pad": "x" * 40} for i in range(3)])
    f.write([{"n": 3, "pad": "x" * 40}, {"n": 4, "pad": "x" * 40}])
    f.close()
    records, _ = denials.read_lines(f.path)
    assert [r["n"] for r in records] == [0, 1, 2] and f.dropped == 2


def test_the_table_escapes_what_the_container_chose():
    rec = {"time": "t", "container_id": "c1", "source": "seccomp", "pid": 1}
    rec.update(comm="x\nFORGED\x1b[2J", syscall="unshare", verdict="EPERM", rule="r")
    row = denials.format_record(rec, "table")
    assert "\n" not in row and "\x1b" not in row
    assert "x\\nFORGED\\x1b[2J" in row


def test_a_torn_last_line_waits_for_the_rest(tmp_path):
    path = str(tmp_path / denials.DENIALS_FILE)
    with open(path, "w") as f:
        f.write('{"a":1}\n{"b":')
    records, offset = denials.read_lines(path)
    assert records == [{"a": 1}] and offset == 8
    with open(path, "a") as f:
        f.write("2}\n")
    assert denials.read_lines(path, offset) == ([{"b": 2}], 16)


def test_zviz_audit_prints_one_container_since_a_time(tmp_path):
    for cid, times in (("c1", (100.0, 200.0)), ("c2", (150.0,))):
        os.mkdir(tmp_path / cid)
        f = denials.RecordFile(denials.path_in(str(tmp_path / cid)))
        ctx = denials.context(cid, "ci-runner", {})
        fields = dict(source="seccomp", pid=1, comm="x", syscall="unshare", verdict="EPERM")
        f.write([denials.record(ctx, rule="r", when=t, **fields) for t in times])
        f.close()
    out = io.StringIO()
    denials.audit(str(tmp_path), None, follow=False, since=120.0, fmt="json", out=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["container_id"], r["time"]) for r in lines] == [
        ("c2", "1970-01-01T00:02:30.000000Z"),
        ("c1", "1970-01-01T00:03:20.000000Z"),
    ]
    out = io.StringIO()
    denials.audit(str(tmp_path), "c1", follow=False, since=None, fmt="table", out=out)
    header, *rows = out.getvalue().splitlines()
    assert header.split()[:3] == ["TIME", "CONTAINER_ID", "POD"] and len(rows) == 2
    with pytest.raises(Exception, match="does not exist"):
        denials.audit(str(tmp_path), "nope", follow=False, since=None, fmt="json", out=out)


def test_since_takes_a_duration_or_an_rfc3339_time():
    assert denials.parse_time("1970-01-01T00:01:00Z") == 60
    assert denials.parse_time("1970-01-01T01:01:00+01:00") == 60
    assert abs(denials.parse_time("10m") - (denials.time.time() - 600)) < 5


def test_the_event_carries_every_field_of_the_line():
    rec = dict(time="2026-12-05T20:00:37.570000Z", container_id="c1", profile="web-server")
    rec.update(pod_namespace="", source="broker", pid=42, comm="nc", syscall="connect")
    rec.update(args={"family": "AF_INET", "address": "10.0.0.1:80"}, verdict="EPERM")
    rec.update(rule="egress to 10.0.0.1 port 80 not allowed")
    message = event(rec)
    assert message.container_id == "c1" and message.pid == 42 and message.comm == "nc"
    assert dict(message.args) == rec["args"] and message.rule == rec["rule"]
    summary = event({"verdict": "suppressed", "count": 7, "counts": {"seccomp x EPERM": 7}})
    assert summary.count == 7 and dict(summary.counts) == {"seccomp x EPERM": 7}


def test_the_broker_describes_a_refused_address():
    import socket
    import struct

    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 80) + socket.inet_aton("10.0.0.1")
    assert policy.describe_address(v4 + bytes(8)) == {
        "family": "AF_INET",
        "address": "10.0.0.1:80",
    }
    v6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 443, 0)
    v6 += socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack("=I", 0)
    assert policy.describe_address(v6)["address"] == "[2001:db8::1]:443"
    unix = struct.pack("=H", socket.AF_UNIX) + b"/run/x.sock\0"
    assert policy.describe_address(unix) == {"family": "AF_UNIX", "address": "/run/x.sock"}


def test_switched_off_the_filter_loads_without_the_log_flag(monkeypatch):
    monkeypatch.setenv(denials.RECORDS_SWITCH, "off")
    assert not seccomp.kernel_logs_denials(listener=False)
    monkeypatch.setenv(denials.RECORDS_SWITCH, "1")
    try:
        with open(seccomp.ACTIONS_LOGGED) as f:
            logged = f.read().split()
    except OSError:
        pytest.skip(f"{seccomp.ACTIONS_LOGGED} unreadable: the kernel has no seccomp logging")
    assert seccomp.kernel_logs_denials(listener=False) == ("errno" in logged)
    # A listener's every mediated call would be logged while user_notif is.
    assert seccomp.kernel_logs_denials(listener=True) == (
        "errno" in logged and "user_notif" not in logged
    )


def test_metrics_count_records_and_what_the_rate_limit_dropped(tmp_path):
    os.mkdir(tmp_path / "c1")
    f = denials.RecordFile(denials.path_in(str(tmp_path / "c1")))
    ctx = denials.context("c1", "ci-runner", {"io.kubernetes.cri.sandbox-name": 'p"1'})
    fields = dict(source="seccomp", pid=1, comm="x", verdict="EPERM", rule="r")
    f.write([denials.record(ctx, syscall="unshare", **fields) for _ in range(3)])
    summary = {**ctx, "source": "rate-limit", "verdict": "suppressed", "count": 5}
    f.write([{**summary, "counts": {"seccomp unshare EPERM": 5}}])
    f.close()
    text = denials.metrics(str(tmp_path))
    labels = (
        'container_id="c1",pod_namespace="",pod_name="p\\"1",profile="ci-runner",'
        'source="seccomp",syscall="unshare",verdict="EPERM"'
    )
    assert f"zviz_denials_total{{{labels}}} 8" in text.splitlines()
    assert f"zviz_denial_records_dropped_total{{{labels}}} 5" in text.splitlines()
    assert "# TYPE zviz_denials_total counter" in text


def test_an_exec_session_claims_its_records_that_came_first(monkeypatch, tmp_path):
    """An exec'd process can deny, exit and have its record read before the shim learns
    its session: the record waits (PENDING_SECONDS) and is claimed by add_session."""
    now = [0.0]
    watcher = _watcher_with(monkeypatch, tmp_path)
    watcher.clock = lambda: now[0]
    exec_record = UNSHARE.replace("ses=7", "ses=9").replace("pid=28058", "pid=999999999")
    assert watcher.handle(denials.AUDIT_SECCOMP, exec_record) is None
    monkeypatch.setattr(denials, "session_of", lambda pid: 9)
    (claimed,) = watcher.add_session("c1", 4242)
    assert claimed["container_id"] == "c1" and claimed["pid"] == 999999999
    assert watcher.add_session("c1", 4242) == []  # known already: nothing again
    # Later records of that session are the container's at once.
    assert watcher.handle(denials.AUDIT_SECCOMP, exec_record)["container_id"] == "c1"
    # One that waited too long is gone.
    late = exec_record.replace("ses=9", "ses=10")
    watcher.handle(denials.AUDIT_SECCOMP, late)
    now[0] = denials.PENDING_SECONDS + 1
    watcher.handle(denials.AUDIT_SECCOMP, UNSHARE.replace("ses=7", "ses=11"))  # prunes
    monkeypatch.setattr(denials, "session_of", lambda pid: 10)
    assert watcher.add_session("c1", 4343) == []
    watcher.unwatch("c1")
    records, _ = denials.read_lines(denials.path_in(str(tmp_path)))
    assert [r["pid"] for r in records] == [999999999, 999999999]


def test_an_exec_already_reaped_is_known_by_its_pid(monkeypatch, tmp_path):
    """The exec denied, exited and was reaped before the shim asked for its session
    (/proc/<pid> gone): the pid in its waiting records names the session."""
    watcher = _watcher_with(monkeypatch, tmp_path)
    exec_record = UNSHARE.replace("ses=7", "ses=9").replace("pid=28058", "pid=4242")
    other = UNSHARE.replace("ses=7", "ses=12").replace("pid=28058", "pid=5151")
    assert watcher.handle(denials.AUDIT_SECCOMP, exec_record) is None
    assert watcher.handle(denials.AUDIT_SECCOMP, other) is None
    monkeypatch.setattr(denials, "session_of", lambda pid: None)
    (claimed,) = watcher.add_session("c1", 4242)
    assert claimed["pid"] == 4242
    # Its session is the container's from now on; another process's is not.
    assert watcher.handle(denials.AUDIT_SECCOMP, exec_record)["container_id"] == "c1"
    assert watcher.handle(denials.AUDIT_SECCOMP, other) is None
    watcher.unwatch("c1")


def test_node_check_says_what_is_recorded(monkeypatch):
    from runtime.node import check

    monkeypatch.setenv(denials.RECORDS_SWITCH, "0")
    assert check._denial_records(7).status == check.WARN
    monkeypatch.setenv(denials.RECORDS_SWITCH, "1")
    found = check._denial_records(6)
    try:
        denials.KernelRecords().close()
        readable = seccomp.kernel_logs_denials(listener=False)
    except denials.KernelRecordsUnavailable:
        readable = False  # not root (CAP_AUDIT_READ), or no audit in this kernel
    assert found.status == (check.OK if readable else check.WARN), found
    if readable:
        assert "Landlock ABI 6 < 7" in found.detail
        status = denials.audit_status()
        with_audit = check._denial_records(7).detail
        if status["enabled"]:
            assert "Landlock denials (audit is enabled)" in with_audit
        else:
            assert "audit is disabled (`auditctl -e 1`" in with_audit


def test_a_limit_record_names_who_set_the_limit():
    profile = load_profile("hostile-tenant")  # pids_max 64, memory_max 512M
    assert denials.limit_rule(profile, "pids", 64) == "profile hostile-tenant: pids_max 64"
    assert denials.limit_rule(profile, "pids", 10) == "config.json linux.resources.pids.limit 10"
    assert (
        denials.limit_rule(profile, "memory", 1 << 20)
        == "config.json linux.resources.memory.limit 1048576 bytes"
    )


def test_cgroup_limit_hits_are_records_counted_by_their_count(monkeypatch, tmp_path):
    (tmp_path / "c1").mkdir()
    watcher = _watcher_with(monkeypatch, tmp_path / "c1", "hostile-tenant")
    rec = watcher.record_limit("c1", "pids", 5, 64)
    assert (rec["source"], rec["syscall"], rec["verdict"], rec["count"]) == (
        "cgroup",
        "fork",
        "pids-limit",
        5,
    )
    assert watcher.record_limit("c1", "memory", 1, 0)["verdict"] == "oom-kill"
    assert watcher.record_limit("c1", "pids", 0, 64) is None  # nothing new, nothing written
    assert watcher.record_limit("other", "pids", 1, 64) is None  # not watched
    counters = denials.metrics(str(tmp_path))
    assert 'syscall="fork",verdict="pids-limit"} 5' in counters
    assert 'verdict="oom-kill"} 1' in counters


# A Landlock denial as this kernel (6.18, audit enabled) multicasts it: `sh -c 'echo >
# /etc/x'` under a ruleset that does not let it write /etc, enforced with log_flags.
LANDLOCK_EVENT = [
    (
        denials.AUDIT_LANDLOCK_ACCESS,
        'audit(1796511883.403:583): domain=182f5ba01 blockers=fs.make_reg path="/etc" '
        'dev="vda" ino=19',
    ),
    (
        denials.AUDIT_LANDLOCK_DOMAIN,
        "audit(1796511883.403:583): domain=182f5ba01 status=allocated mode=enforcing "
        f'pid={os.getpid()} uid=0 exe="/usr/bin/python3" comm="python3"',
    ),
    (
        denials.AUDIT_SYSCALL,
        "audit(1796511883.403:583): arch=c000003e syscall=257 success=no exit=-13 "
        "a0=ffffff9c a1=55eaced5cbd8 a2=241 a3=1b6 items=0 ppid=28801 pid=28904 auid=0 uid=0 "
        'gid=0 euid=0 tty=(none) ses=7 comm="sh" exe="/usr/bin/dash" key=(null)',
    ),
    (denials.AUDIT_EOE, "audit(1796511883.403:583): "),
]


def test_a_landlock_event_becomes_one_record_at_its_syscall_record(monkeypatch, tmp_path):
    watcher = _watcher_with(monkeypatch, tmp_path)
    results = [watcher.handle(kind, text) for kind, text in LANDLOCK_EVENT]
    assert results[:2] == [None, None] and results[3] is None
    rec = results[2]
    expected = {
        "container_id": "c1",
        "source": "landlock",
        "pid": 28904,
        "comm": "sh",
        "exe": "/usr/bin/dash",
        "syscall": "openat",
        "args": {"path": "/etc", "dev": "vda", "ino": "19"},
        "access": "fs.make_reg",
        "verdict": "EACCES",
        "domain": "182f5ba01",
    }
    assert {k: rec[k] for k in expected} == expected
    assert rec["rule"].startswith("profile ci-runner: /etc is not beneath its writable paths (/tmp")
    assert event(rec).access == "fs.make_reg" and event(rec).args["path"] == "/etc"
    assert denials.read_lines(denials.path_in(str(tmp_path)))[0] == [rec]


def test_a_landlock_event_without_a_syscall_record_is_known_by_its_domain(monkeypatch, tmp_path):
    """A task without an audit context (started before audit was enabled) makes no
    SYSCALL record: the domain's creator (the container's PID 1) names the container,
    and the record is written once the event has waited LANDLOCK_EVENT_SECONDS."""
    now = [0.0]
    watcher = _watcher_with(monkeypatch, tmp_path, session=None)
    watcher.clock = lambda: now[0]
    for kind, text in LANDLOCK_EVENT[:2]:
        assert watcher.handle(kind, text) is None
    watcher.flush()
    assert denials.read_lines(denials.path_in(str(tmp_path)))[0] == []
    now[0] = denials.LANDLOCK_EVENT_SECONDS
    watcher.flush()
    (rec,) = denials.read_lines(denials.path_in(str(tmp_path)))[0]
    assert (rec["source"], rec["pid"], rec["syscall"], rec["verdict"]) == (
        "landlock",
        0,
        "",
        "EACCES",
    )
    # Later denials of that domain are the container's too; another domain's are not.
    later = [(k, t.replace(":583)", ":584)")) for k, t in LANDLOCK_EVENT[:1]]
    other = [(k, t.replace("182f5ba01", "99").replace(":584)", ":585)")) for k, t in later]
    for kind, text in later + other:
        watcher.handle(kind, text)
    now[0] *= 3
    watcher.flush()
    assert len(denials.read_lines(denials.path_in(str(tmp_path)))[0]) == 2
    assert watcher.ignored == 1


def test_landlock_rules_name_what_would_allow_the_access():
    profile = load_profile("ci-runner")
    assert "not in its device_ioctl" in denials.landlock_rule(
        profile, "fs.ioctl_dev", {"path": "/dev/tty"}
    )
    assert "never created" in denials.landlock_rule(profile, "fs.make_char", {"path": "/dev"})
    assert "tcp_connect does not list port 25" in denials.landlock_rule(
        profile, "net.connect_tcp", {"dest": "25"}
    )


def test_landlock_logs_the_workloads_denials_only_where_records_are_on():
    from runtime.security import landlock

    workload = landlock.RESTRICT_SELF_LOG_NEW_EXEC_ON | landlock.RESTRICT_SELF_LOG_SUBDOMAINS_OFF
    assert landlock.log_flags(7, records=True) == workload
    assert landlock.log_flags(7, records=False) == 0
    assert landlock.log_flags(6, records=True) == 0  # the kernel would refuse the flags


def test_an_exec_gone_before_its_records_came_is_known_by_its_first_record(monkeypatch, tmp_path):
    """The exec denied and was reaped, and its record is still on its way (through the
    node's reader) when the shim asks for its session: its first record claims it."""
    watcher = _watcher_with(monkeypatch, tmp_path)
    monkeypatch.setattr(denials, "session_of", lambda pid: None)
    assert watcher.add_session("c1", 4242) == []
    exec_record = UNSHARE.replace("ses=7", "ses=9").replace("pid=28058", "pid=4242")
    assert watcher.handle(denials.AUDIT_SECCOMP, exec_record)["container_id"] == "c1"
    assert 9 in watcher.sessions()
    # Once: another process that gets the pid later is not the container's by it.
    reused = exec_record.replace("ses=9", "ses=12")
    assert watcher.handle(denials.AUDIT_SECCOMP, reused) is None
    watcher.unwatch("c1")


def test_a_containers_last_interval_is_summed_up_when_it_goes(monkeypatch, tmp_path):
    """Records dropped in the interval a container ends in are counted in its file at
    unwatch, not lost with the interval (the shim's learn mode learns syscalls from them)."""
    watcher = _watcher_with(monkeypatch, tmp_path)
    for _ in range(denials.RECORD_BURST + 5):
        watcher.handle(denials.AUDIT_SECCOMP, UNSHARE)
    watcher.unwatch("c1")
    records, _ = denials.read_lines(denials.path_in(str(tmp_path)))
    assert len(records) == denials.RECORD_BURST + 1
    assert records[-1]["source"] == "rate-limit"
    assert records[-1]["counts"] == {"seccomp unshare EPERM": 5}
