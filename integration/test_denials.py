"""Denial records through containerd (docs/denials.md): one record in three places.

A container under ci-runner calls a denied syscall (busybox `unshare -n`: seccomp
answers EPERM, the kernel's audit record is mapped to the container by the shim), and
a web-server container makes a connect its profile refuses (the broker's record). Each
shows up as a `/zviz/denial` event through containerd's events API, as a line of the
container's denials.jsonl and in `zviz audit`, with the same fields.

`ctr events` cannot print the event: it decodes event bodies only with the types compiled
into it (1.6 and 2.x alike), so for ours it logs "cannot unmarshal an event from Any"
naming our type; the test checks that it received it.
"""

import asyncio
import json
import os
import subprocess
import time

import pytest

from api import typeurl
from api.gen.zviz.events.v1 import denial_pb2
from integration.ids import unique_id
from integration.test_ttrpc_events import subscribe
from runtime import denials
from shim import config as shim_config
from shim.denials import event as denial_event

pytestmark = [pytest.mark.containerd, pytest.mark.every_containerd]

ZVIZ = "io.containerd.zviz.v2"
TOPIC = "/zviz/denial"
DENIAL_TYPE = "zviz.events.v1.Denial"


def _as_dict(message: denial_pb2.Denial) -> dict:
    fields = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        fields[field.name] = dict(value) if field.name in ("args", "counts") else value
    return fields


def _record_as_event_fields(rec: dict) -> dict:
    """A file line as the event carries it (absent fields: the proto's zero values)."""
    return _as_dict(denial_event(rec))


def _run_until_recorded(containerd, image, zviz_bin, script, annotations, wanted, ctr_args=()):
    """Run `script` in a detached container until a /zviz/denial event of it matches
    `wanted(event)`; return (event, file records, `zviz audit` records, ctr's stderr)."""
    cid = unique_id("zviz-denial")
    state_root = shim_config.runtime_root(containerd.address, containerd.namespace)

    async def main():
        received: asyncio.Queue = asyncio.Queue()
        filters = [f'topic=="{TOPIC}",namespace=="{containerd.namespace}"']
        subscriber = asyncio.create_task(subscribe(containerd.address, filters, received))
        ctr_events = await asyncio.create_subprocess_exec(
            containerd.ctr_bin, "--address", containerd.address, "events",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=containerd.env,
        )  # fmt: skip
        await asyncio.sleep(1)  # neither subscription says when it is ready
        cmd = ["run", "-d", "--runtime", ZVIZ, *ctr_args]
        for key, value in annotations:
            cmd += ["--annotation", f"{key}={value}"]
        result = await asyncio.to_thread(
            containerd.ctr, *cmd, image, cid, "sh", "-c", script, check=False
        )
        assert result.returncode == 0, result.stderr
        try:
            async with asyncio.timeout(30):
                while True:
                    envelope = await received.get()
                    assert envelope.event.type_url == DENIAL_TYPE
                    event = typeurl.unpack(envelope.event)
                    if event.container_id == cid and wanted(event):
                        break
            path = os.path.join(state_root, cid, denials.DENIALS_FILE)
            records, _ = denials.read_lines(path)
            audited = subprocess.run(
                [zviz_bin, "--root", state_root, "audit", cid, "--format", "json"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert audited.returncode == 0, audited.stderr
            audit_records = [json.loads(line) for line in audited.stdout.splitlines()]
            counted = subprocess.run(
                [zviz_bin, "--root", state_root, "metrics"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert counted.returncode == 0, counted.stderr
            audit_records.append(counted.stdout)  # the counters, checked with the records
        finally:
            subscriber.cancel()
            await asyncio.to_thread(
                containerd.ctr, "tasks", "kill", "-s", "SIGKILL", cid, check=False
            )
            await asyncio.to_thread(containerd.ctr, "tasks", "delete", "-f", cid, check=False)
            await asyncio.to_thread(containerd.ctr, "containers", "delete", cid, check=False)
            ctr_events.kill()
            # Reaped here, also when the test fails: a subprocess transport the loop never
            # closed is collected later, at any moment, and its __del__ raises ("Event loop
            # is closed"). Once that happened while pytest was formatting this test's
            # failure: the traceback of that unraisable exception ran ast.parse inside
            # pytest's own ast.parse, and CPython 3.11's AST recursion-depth counter,
            # shared by both, raised SystemError: an INTERNALERROR that ended the whole
            # session and skipped every teardown (its containerds and daemons left running).
            _, ctr_stderr = await ctr_events.communicate()
        return event, records, audit_records, ctr_stderr.decode()

    return asyncio.run(main())


def _check_same_record_everywhere(event, records, audit_records, ctr_stderr):
    *audit_records, counters = audit_records
    fields = _as_dict(event)
    in_file = [r for r in records if _record_as_event_fields(r) == fields]
    assert in_file, f"event {fields} not in the file: {records}"
    assert in_file[0] in audit_records, f"{in_file[0]} not in zviz audit: {audit_records}"
    # zviz metrics counts every record of the file (read after it: the loop may add more).
    same = [r for r in records if (r["source"], r["syscall"]) == (event.source, event.syscall)]
    counted = [
        line
        for line in counters.splitlines()
        if line.startswith("zviz_denials_total{")
        and f'container_id="{event.container_id}"' in line
        and f'syscall="{event.syscall}"' in line
    ]
    assert len(counted) == 1 and int(counted[0].rsplit(" ", 1)[1]) >= len(same) > 0, counters
    # ctr got the event too, and says why it cannot print it.
    assert f"type with url {DENIAL_TYPE}: not found" in ctr_stderr, ctr_stderr


def test_seccomp_denial_under_ci_runner(containerd, busybox_image, zviz_bin):
    script = "while true; do unshare -n true; sleep 0.2; done"
    event, records, audit_records, ctr_stderr = _run_until_recorded(
        containerd, busybox_image, zviz_bin, script, (), lambda e: e.syscall == "unshare"
    )
    assert event.source == "seccomp"
    assert event.profile == "ci-runner"
    assert event.comm == "unshare"
    assert event.verdict == "EPERM"
    assert event.rule == "profile ci-runner: deny unshare"
    assert event.pid > 1  # the host's pid of the caller
    assert event.time.endswith("Z") and "T" in event.time
    _check_same_record_everywhere(event, records, audit_records, ctr_stderr)


def test_broker_refusal_under_web_server(containerd, busybox_image, zviz_bin):
    script = "while true; do echo x | nc 10.0.0.1 80; sleep 0.2; done"
    event, records, audit_records, ctr_stderr = _run_until_recorded(
        containerd,
        busybox_image,
        zviz_bin,
        script,
        [("io.zviz.profile", "web-server")],
        lambda e: e.source == "broker",
    )
    assert event.profile == "web-server"
    assert event.syscall == "connect"
    assert event.comm == "nc"
    assert dict(event.args) == {"family": "AF_INET", "address": "10.0.0.1:80"}
    assert event.verdict == "EPERM"
    assert "10.0.0.1" in event.rule
    _check_same_record_everywhere(event, records, audit_records, ctr_stderr)


@pytest.fixture
def audit_enabled():
    """Landlock writes its records only while audit is enabled (docs/denials.md); this
    node runs with it disabled. The test enables it for its own duration and puts back
    the value it found. What cannot be put back: the kernel remembers that audit was
    once enabled (`audit_ever_enabled`) and from then on gives each new task an audit
    context (a few ns a syscall while audit is disabled again)."""
    from runtime.security import landlock

    abi = landlock.abi_version()
    if abi < landlock.LOG_ABI:
        pytest.skip(
            f"Landlock ABI {abi} < {landlock.LOG_ABI}: the kernel writes no Landlock records"
        )
    try:
        before = denials.audit_status()["enabled"]
    except denials.KernelRecordsUnavailable as e:
        pytest.skip(f"no audit status: {e}")
    if before == 2:
        pytest.skip("audit is locked (enabled=2): cannot be changed until reboot")
    if not before:
        denials.audit_status(set_enabled=1)
    try:
        yield
    finally:
        if not before:
            denials.audit_status(set_enabled=before)
            assert denials.audit_status()["enabled"] == before


def test_landlock_denial_under_ci_runner(containerd, busybox_image, zviz_bin, audit_enabled):
    """A write outside ci-runner's writable paths: Landlock refuses it (EACCES) and, with
    the log flags zviz passes, the kernel writes its records; the shim maps them to the
    container by the call's audit session."""
    script = "while true; do echo x > /etc/zviz-landlock-probe; sleep 0.2; done"
    event, records, audit_records, ctr_stderr = _run_until_recorded(
        containerd, busybox_image, zviz_bin, script, (), lambda e: e.source == "landlock"
    )
    assert event.profile == "ci-runner"
    assert event.comm == "sh"
    assert event.syscall in ("open", "openat", "creat")
    assert dict(event.args)["path"] == "/etc"
    assert event.access == "fs.make_reg"
    assert event.verdict == "EACCES"
    assert event.rule.startswith("profile ci-runner: /etc is not beneath its writable paths (/tmp")
    assert event.pid > 1
    _check_same_record_everywhere(event, records, audit_records, ctr_stderr)


def test_landlock_denials_of_exec_processes_are_the_containers(
    containerd, busybox_image, audit_enabled
):
    """`ctr tasks exec` processes that write outside the writable paths and exit at once:
    each one's Landlock denial (its own domain, enforced by the exec) is the container's,
    though the caller is gone by the time the shim learns its session."""
    cid = unique_id("zviz-denial-ll-exec")
    execs = 3

    async def main():
        received: asyncio.Queue = asyncio.Queue()
        filters = [f'topic=="{TOPIC}",namespace=="{containerd.namespace}"']
        subscriber = asyncio.create_task(subscribe(containerd.address, filters, received))
        await asyncio.sleep(1)
        result = await asyncio.to_thread(
            containerd.ctr, "run", "-d", "--runtime", ZVIZ, busybox_image, cid, "sleep", "60",
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        paths = {}
        try:
            for n in range(execs):
                done = await asyncio.to_thread(
                    containerd.ctr, "tasks", "exec", "--exec-id", f"w{n}", cid, "mkdir",
                    f"/etc/zviz-ll-{n}", check=False,
                )  # fmt: skip
                assert done.returncode != 0  # EACCES
            async with asyncio.timeout(10):
                while len(paths) < execs:
                    event = typeurl.unpack((await received.get()).event)
                    if event.container_id == cid and event.source == "landlock":
                        paths[event.pid] = (event.comm, event.access, dict(event.args)["path"])
        except TimeoutError:
            pass
        finally:
            subscriber.cancel()
            for args in (("tasks", "kill", "-s", "SIGKILL", cid), ("tasks", "delete", "-f", cid),
                         ("containers", "delete", cid)):  # fmt: skip
                await asyncio.to_thread(containerd.ctr, *args, check=False)
        return paths

    paths = asyncio.run(main())
    assert len(paths) == execs, f"{len(paths)} of {execs} exec'd callers recorded: {paths}"
    assert set(paths.values()) == {("mkdir", "fs.make_dir", "/etc")}


def test_pids_limit_hits_under_hostile_tenant(containerd, busybox_image, zviz_bin):
    """A fork bomb under hostile-tenant's pids_max (64): the forks pids.max refuses become
    cgroup records, several refusals of one poll in one record with their count."""
    script = "for i in $(seq 200); do sleep 60 & done; wait"
    event, records, audit_records, ctr_stderr = _run_until_recorded(
        containerd,
        busybox_image,
        zviz_bin,
        script,
        [("io.zviz.profile", "hostile-tenant")],
        lambda e: e.verdict == "pids-limit",
    )
    assert event.source == "cgroup"
    assert event.profile == "hostile-tenant"
    assert event.syscall == "fork"
    assert event.rule == "profile hostile-tenant: pids_max 64"
    assert event.count >= 1
    _check_same_record_everywhere(event, records, audit_records, ctr_stderr)


def test_oom_kill_under_a_memory_limit(containerd, busybox_image, zviz_bin):
    """A memory hog under config.json's 32 MiB limit (lower than ci-runner's 4G): its OOM
    kill is a record naming config.json's limit, next to containerd's /tasks/oom."""
    limit = 32 * 1024 * 1024
    event, records, audit_records, ctr_stderr = _run_until_recorded(
        containerd,
        busybox_image,
        zviz_bin,
        "tail /dev/zero",
        (),
        lambda e: e.verdict == "oom-kill",
        ctr_args=("--memory-limit", str(limit)),
    )
    assert event.source == "cgroup"
    assert event.profile == "ci-runner"
    assert event.syscall == ""
    assert event.rule == f"config.json linux.resources.memory.limit {limit} bytes"
    assert event.count == 1
    _check_same_record_everywhere(event, records, audit_records, ctr_stderr)


def test_a_flood_is_rate_limited_and_the_shim_keeps_answering(containerd, busybox_image):
    """Four loops of denied calls: the container's file gets RECORD_BURST records in the
    first window, then a summary counting the rest; containerd's calls to the shim
    (`ctr tasks ls` asks it the task's state) keep being answered meanwhile."""
    cid = unique_id("zviz-denial-flood")
    state_root = shim_config.runtime_root(containerd.address, containerd.namespace)
    loop = "while :; do unshare -n true 2>/dev/null; done"
    script = f"{loop} & {loop} & {loop} & {loop}"

    async def main():
        received: asyncio.Queue = asyncio.Queue()
        filters = [f'topic=="{TOPIC}",namespace=="{containerd.namespace}"']
        subscriber = asyncio.create_task(subscribe(containerd.address, filters, received))
        await asyncio.sleep(1)
        result = await asyncio.to_thread(
            containerd.ctr, "run", "-d", "--runtime", ZVIZ, busybox_image, cid, "sh", "-c",
            script, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        latencies = []
        try:
            async with asyncio.timeout(40):
                while True:
                    started = time.monotonic()
                    listed = await asyncio.to_thread(containerd.ctr, "tasks", "ls", check=False)
                    latencies.append(time.monotonic() - started)
                    assert listed.returncode == 0 and cid in listed.stdout, listed.stderr
                    try:
                        envelope = await asyncio.wait_for(received.get(), 0.5)
                    except TimeoutError:
                        continue
                    event = typeurl.unpack(envelope.event)
                    if event.container_id == cid and event.source == "rate-limit":
                        break
            records, _ = denials.read_lines(os.path.join(state_root, cid, denials.DENIALS_FILE))
        finally:
            subscriber.cancel()
            for args in (("tasks", "kill", "-s", "SIGKILL", cid), ("tasks", "delete", "-f", cid),
                         ("containers", "delete", cid)):  # fmt: skip
                await asyncio.to_thread(containerd.ctr, *args, check=False)
        return event, records, latencies

    summary, records, latencies = asyncio.run(main())
    first_window = []
    for rec in records:
        if rec["source"] == "rate-limit":
            break
        first_window.append(rec)
    assert len(first_window) == denials.RECORD_BURST, len(first_window)
    assert all(r["syscall"] == "unshare" for r in first_window)
    assert summary.verdict == "suppressed" and summary.count > 0
    assert dict(summary.counts) == {"seccomp unshare EPERM": summary.count}
    # Answered throughout: no `ctr tasks ls` took more than a few seconds on this busy node.
    counted, calls, slowest = summary.count, len(latencies), max(latencies)
    print(f"flood: {counted} calls only counted; ctr tasks ls {calls} times, max {slowest:.2f} s")
    assert max(latencies) < 5, latencies


def test_denials_of_exec_processes_are_the_containers(containerd, busybox_image):
    """`ctr tasks exec` processes that call a denied syscall and exit at once: each of
    their records is attributed to the container (the caller is gone when it is read)."""
    cid = unique_id("zviz-denial-exec")
    execs = 5

    async def main():
        received: asyncio.Queue = asyncio.Queue()
        filters = [f'topic=="{TOPIC}",namespace=="{containerd.namespace}"']
        subscriber = asyncio.create_task(subscribe(containerd.address, filters, received))
        await asyncio.sleep(1)
        result = await asyncio.to_thread(
            containerd.ctr, "run", "-d", "--runtime", ZVIZ, busybox_image, cid, "sleep", "60",
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        pids = set()
        try:
            for n in range(execs):
                done = await asyncio.to_thread(
                    containerd.ctr, "tasks", "exec", "--exec-id", f"x{n}", cid, "unshare", "-n",
                    "true", check=False,
                )  # fmt: skip
                assert done.returncode != 0  # EPERM: busybox unshare fails
            async with asyncio.timeout(10):
                while len(pids) < execs:
                    event = typeurl.unpack((await received.get()).event)
                    if event.container_id == cid and event.syscall == "unshare":
                        pids.add(event.pid)
        except TimeoutError:
            pass
        finally:
            subscriber.cancel()
            for args in (("tasks", "kill", "-s", "SIGKILL", cid), ("tasks", "delete", "-f", cid),
                         ("containers", "delete", cid)):  # fmt: skip
                await asyncio.to_thread(containerd.ctr, *args, check=False)
        return pids

    pids = asyncio.run(main())
    assert len(pids) == execs, f"{len(pids)} of {execs} exec'd callers recorded"
