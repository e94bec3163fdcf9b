"""The broker's denial and audit records (runtime/security/broker/core.py), byte for byte.

Both kinds come from one builder; these tests pin every field of each so that neither
can drift from the other or from the shape docs/denials.md gives (the file's lines are
read back by `zviz audit`, the shim's /zviz/denial events and profile learning).
Without root or a kernel listener: the broker's answer to the kernel is replaced.
"""

import errno
import json
import os

import pytest

from runtime import denials
from runtime.security import syscalls
from runtime.security.broker import core
from runtime.security.broker.verdict import Audit, Denied, Verdict
from runtime.security.profiles import load_profile

FIXED_TIME = 1e9  # 2001-09-09T01:46:40Z


@pytest.fixture
def broker(tmp_path, monkeypatch):
    monkeypatch.setattr(denials.time, "time", lambda: FIXED_TIME)
    context = denials.context(
        "s6hbmem-records", "web-server", {"io.kubernetes.cri.sandbox-name": "pod-a"}
    )
    records = denials.RecordFile(str(tmp_path / "denials.jsonl"))
    made = core.Broker(-1, load_profile("web-server"), records=records, record_context=context)
    answered = []
    monkeypatch.setattr(made, "respond", lambda note, val=0, err=0: answered.append((val, err)))
    made.answered = answered
    yield made
    records.close()


def notification(nr: int) -> core.Notification:
    # A caller that exists (this process) so that its command name is read.
    return core.Notification(
        core.NOTIF.pack(7, os.getpid(), 0, nr, 0xC000003E, 0, 1, 2, 3, 4, 5, 6)
    )


def written(broker) -> bytes:
    with open(broker.records.path, "rb") as f:
        return f.read()


def my_comm() -> str:
    with open("/proc/self/comm") as f:
        return f.read().strip()


def expected_line(*, syscall: str, args: str, verdict: str, rule: str) -> bytes:
    pod = '"pod_namespace":"","pod_name":"pod-a","pod_uid":""'
    context = f'"container_id":"s6hbmem-records","profile":"web-server",{pod}'
    line = (
        f'{{"time":"2001-09-09T01:46:40.000000Z",{context},"source":"broker",'
        f'"pid":{os.getpid()},"comm":"{my_comm()}","syscall":"{syscall}","args":{args},'
        f'"verdict":"{verdict}","rule":"{rule}"}}\n'
    )
    return line.encode()


def test_a_refusal_and_an_audit_are_the_same_record_but_verdict_and_rule(broker):
    connect = syscalls.number("connect")
    refused = Denied("egress to 10.0.0.1 port 80 denied by egress_deny")
    refused.decoded = {"family": "AF_INET", "address": "10.0.0.1:80"}
    audit = Audit(
        "egress to 198.51.100.1 port 9999 not allowed by profile",
        {"family": "AF_INET", "address": "198.51.100.1:9999"},
    )
    broker._calls[7] = [float("inf"), core.WAITING, None]
    broker.answer(notification(connect), Verdict.refused(refused, [audit]))

    assert broker.answered == [(0, errno.EPERM)]
    # The refusal is written as it is answered, the audits the call met after it.
    assert written(broker) == expected_line(
        syscall="connect",
        args='{"family":"AF_INET","address":"10.0.0.1:80"}',
        verdict="EPERM",
        rule="egress to 10.0.0.1 port 80 denied by egress_deny",
    ) + expected_line(
        syscall="connect",
        args='{"family":"AF_INET","address":"198.51.100.1:9999"}',
        verdict="audit",
        rule=f"egress to 198.51.100.1 port 9999 not allowed by profile; {denials.AUDITED}",
    )
    # The shape the kernel-side records have too (one field set for every source).
    seccomp = denials.record(
        broker.record_context, source="seccomp", pid=1, comm="x", syscall="y",
        verdict="EPERM", rule="z",
    )  # fmt: skip
    lines = [line for line in written(broker).splitlines() if line]
    assert all(list(json.loads(line)) == list(seccomp) for line in lines)


def test_a_call_not_mediated_is_refused_with_no_arguments(broker):
    broker._deny(notification(syscalls.number("bind")), "denied by profile")
    assert broker.answered == [(0, errno.EPERM)]
    assert written(broker) == expected_line(
        syscall="bind", args="{}", verdict="EPERM", rule="denied by profile"
    )


def test_an_audit_without_decoded_arguments_and_a_failed_call(broker):
    # The call itself failed (ECONNREFUSED): its answer, no refusal record; the audit
    # met on the way is still recorded, with empty arguments.
    broker._calls[7] = [float("inf"), core.WAITING, None]
    verdict = Verdict.failed(errno.ECONNREFUSED, [Audit("some rule", {})])
    broker.answer(notification(syscalls.number("sendto")), verdict)
    assert broker.answered == [(0, errno.ECONNREFUSED)]
    assert written(broker) == expected_line(
        syscall="sendto", args="{}", verdict="audit", rule=f"some rule; {denials.AUDITED}"
    )


def test_no_records_without_a_record_file(broker):
    path = broker.records.path
    broker.records.close()
    broker.records = None
    broker._calls[7] = [float("inf"), core.WAITING, None]
    broker.answer(
        notification(syscalls.number("connect")),
        Verdict.refused(Denied("no"), [Audit("rule", {})]),
    )
    assert broker.answered == [(0, errno.EPERM)]
    with open(path, "rb") as f:
        assert f.read() == b""


def test_the_records_of_calls_in_flight_are_written_before_the_broker_ends(broker, monkeypatch):
    """serve() returns when the last task is gone and the broker's process ends at once:
    a call answered just before must still get its record written (drain)."""
    import threading
    import time

    release = threading.Event()

    def slow_verdict(_broker, note, _handler):
        release.wait()
        time.sleep(0.2)  # the answer and its record come after the loop has ended
        return Verdict(audits=[Audit("connect to 10.0.0.1:80", {"addr": "10.0.0.1:80"})])

    monkeypatch.setattr(core, "verdict_of", slow_verdict)
    note = notification(syscalls.number("connect"))
    broker._slots.acquire()
    worker = threading.Thread(target=broker._mediate, args=(note, None), daemon=True)
    with broker._calls_changed:
        broker._calls[note.id] = [time.monotonic() + broker.timeout, core.WAITING, note]
    worker.start()
    monkeypatch.setattr(broker, "_serve", lambda: release.set())  # the last task is gone
    broker.serve()
    assert b'"verdict":"audit"' in written(broker)
