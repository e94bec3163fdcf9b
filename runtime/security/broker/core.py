"""The broker's core: the notify loop, deadlines, the watchdog, answering.

The loop receives each notification and hands a mediated call to its handler
(handlers.HANDLERS, by syscall number) on a worker thread; any other notified call
(--verbose) is refused and logged. A handler's verdict (verdict.py) is answered here, in
one place, with its log line and denial or audit records. Fail closed: whatever a
handler raises becomes a refusal; a call not performed by its deadline is answered
ETIMEDOUT by the watchdog; a broker that stops serving is killed by its warden (warden.py).
"""

import errno
import fcntl
import json
import os
import select
import struct
import threading
import time

from runtime import denials
from runtime.security import syscalls
from runtime.security.broker import handlers
from runtime.security.broker.caller import Call
from runtime.security.broker.egress_hosts import EgressHosts
from runtime.security.broker.verdict import Answered, Denied, Verdict

# linux/seccomp.h ioctls on the listener fd.
NOTIF_RECV = 0xC0502100
NOTIF_SEND = 0xC0182101
NOTIF_ID_VALID = 0x40082102
NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, nr, arch, ip, args[6]
RESP = struct.Struct("=QqiI")  # id, val, error, flags

# The most bytes all calls in flight may hold copied at once (a few of the largest).
MAX_COPIED = 4 * handlers.MAX_SEND
MAX_IN_FLIGHT = 256
DEFAULT_TIMEOUT = 10.0
# A received call is WAITING until its worker claims it right before the side effect
# (PERFORMING); it leaves the registry when answered, by the worker or the watchdog.
WAITING, PERFORMING = range(2)


class CopyBudget:
    """Bytes the broker may hold copied from its container, shared by the calls in flight.

    The broker's memory is bounded by what it copies: without a budget, 256 calls in
    flight of MAX_SEND each (or one sendmmsg naming the same 4 MiB 64 times) would
    grow it far beyond the container's own memory limit. A call waits for room until
    its deadline, then fails with ENOBUFS.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._changed = threading.Condition()

    def take(self, size: int, deadline: float) -> None:
        with self._changed:
            while self.used + size > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Denied("the broker's copy budget is used up", errno.ENOBUFS)
                self._changed.wait(left)
            self.used += size

    def give(self, size: int) -> None:
        if size:
            with self._changed:
                self.used -= size
                self._changed.notify_all()


class Notification:
    __slots__ = ("id", "pid", "nr", "arch", "args")

    def __init__(self, raw: bytes):
        fields = NOTIF.unpack(raw)
        self.id, self.pid, _, self.nr, self.arch, _ = fields[:6]
        self.args = fields[6:]


class Broker:
    """Serves one listener fd until every task using the filter is gone."""

    def __init__(
        self,
        listener_fd: int,
        profile,
        *,
        verbose: bool = False,
        container_id: str = "",
        log_fd: int = 2,
        heartbeat_fd: int = -1,
        records=None,
        record_context: dict | None = None,
    ):
        self.fd = listener_fd
        self.profile = profile
        self.verbose = verbose
        self.container_id = container_id
        self.log_fd = log_fd
        # The chain: a notified call goes to its handler, or, not mediated, is refused
        # (and logged under --verbose).
        self.handlers = {syscalls.number(n): handlers.HANDLERS[n] for n in profile.mediate}
        self._log_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self.copies = CopyBudget(MAX_COPIED)
        self.egress_hosts = EgressHosts(profile) if profile.egress_hosts else None
        self.timeout = float(getattr(profile, "broker_timeout", DEFAULT_TIMEOUT))
        self.heartbeat_fd = heartbeat_fd
        # Refusals become denial records (runtime/denials.py) in the container's file.
        self.records = records
        self.record_context = record_context or {}
        self._record_limit = denials.RateLimiter()
        self._calls: dict[int, list] = {}  # id -> [deadline, state, note]
        self._calls_changed = threading.Condition()
        self._serving = True
        # When the main loop took its current notification (None: waiting in poll).
        self._busy_since: float | None = None

    # --- the loop ---

    def serve(self) -> None:
        watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        watchdog.start()
        try:
            self._serve()
        finally:
            with self._calls_changed:
                self._serving = False
                self._calls_changed.notify()
            self._drain()

    def _drain(self) -> None:
        """Wait for the calls still in flight (each ends by its deadline): a call writes its
        records after its answer, and the broker's process ends (os._exit) as soon as
        serve returns, the last task gone, so a workload that exited right after an
        answer lost the record of that call: a learning run then missed the connect it
        had just let through (test_profile_learn's endpoint test, now and then)."""
        deadline = time.monotonic() + self.timeout + 1
        taken = 0
        while taken < MAX_IN_FLIGHT and self._slots.acquire(
            timeout=max(0.0, deadline - time.monotonic())
        ):
            taken += 1
        for _ in range(taken):
            self._slots.release()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            events = poller.poll()
            if any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in events):
                if not any(ev & select.POLLIN for _, ev in events):
                    return  # no task uses the filter any more
            self._busy_since = time.monotonic()
            buf = bytearray(NOTIF.size)
            try:
                fcntl.ioctl(self.fd, NOTIF_RECV, buf)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR):
                    continue  # the caller died (or a signal) before we took it
                raise
            note = Notification(bytes(buf))
            handler = self.handlers.get(note.nr)
            if handler is not None:
                with self._calls_changed:
                    self._calls[note.id] = [time.monotonic() + self.timeout, WAITING, note]
                    self._calls_changed.notify()
                # A bounded number of calls in flight: a container flooding connects
                # waits for its own earlier calls instead of growing the broker (which
                # lives outside the container's cgroup) without limit. Calls waiting
                # here in the kernel are still covered by the warden's heartbeat.
                # Waiting for a slot is not a stall: each call in flight ends by its deadline.
                self._busy_since = None
                self._slots.acquire()
                self._busy_since = time.monotonic()
                threading.Thread(target=self._mediate, args=(note, handler), daemon=True).start()
            else:
                self._deny(note, "denied by profile")
            self._busy_since = None

    def respond(self, note: Notification, val: int = 0, err: int = 0) -> None:
        try:
            fcntl.ioctl(self.fd, NOTIF_SEND, RESP.pack(note.id, val, -err if err else 0, 0))
        except OSError as e:
            # ENOENT: the caller is gone; EINPROGRESS: already answered (the kernel
            # keeps the first answer only).
            if e.errno not in (errno.ENOENT, errno.EINPROGRESS):
                raise

    # --- deadlines ---

    def claim(self, note: Notification) -> bool:
        """The worker is about to perform the call: False if it has been answered already."""
        with self._calls_changed:
            call = self._calls.get(note.id)
            if call is None or call[1] != WAITING:
                return False
            call[1] = PERFORMING
            return True

    def deadline(self, note: Notification) -> float:
        with self._calls_changed:
            call = self._calls.get(note.id)
        return call[0] if call else time.monotonic()

    def answer(self, note: Notification, verdict: Verdict) -> None:
        """The worker's one answer, unless the watchdog gave one first; the refusals
        audit mode let through are recorded either way."""
        with self._calls_changed:
            call = self._calls.pop(note.id, None)
        # Audit mode: a call the profile refuses goes through, recorded (verdict audit).
        audits = [
            self._denial_record(note, audit.decoded, "audit", f"{audit.rule}; {denials.AUDITED}")
            for audit in verdict.audits
        ]
        if call is not None and not verdict.answered:
            self._answer_and_log(
                note, verdict.reason, verdict.value, verdict.errno, verdict.decoded
            )
        self._write_records(audits)

    def _watch(self) -> None:
        """Answers calls that passed their deadline unperformed; beats for the warden."""
        beat = self.timeout / 4
        while True:
            expired = []
            with self._calls_changed:
                if not self._serving:
                    return
                now = time.monotonic()
                for call_id, call in list(self._calls.items()):
                    if call[1] == WAITING and call[0] <= now:
                        expired.append(self._calls.pop(call_id)[2])
                # A performing call is bounded by its worker (same deadline): answering
                # it here could report a failure for a connect that then succeeds.
                waiting = [c[0] for c in self._calls.values() if c[1] == WAITING]
                wait = min([beat, *(d - now for d in waiting)])
                if not expired:
                    self._calls_changed.wait(max(wait, 0.001))
            for note in expired:
                self._answer_and_log(note, "broker did not answer in time", 0, errno.ETIMEDOUT)
            self._heartbeat()

    def _heartbeat(self) -> None:
        busy_since = self._busy_since
        if self.heartbeat_fd < 0 or (
            busy_since is not None and time.monotonic() - busy_since > self.timeout
        ):
            return  # the main loop is stuck on one notification: the rest go unreceived
        try:
            os.write(self.heartbeat_fd, b".")
        except BlockingIOError:
            pass  # the warden has not read the earlier beats yet: it knows we live

    def _deny(self, note: Notification, reason: str, err: int = errno.EPERM) -> None:
        self._answer_and_log(note, reason, 0, err)

    def _answer_and_log(
        self, note: Notification, reason: str, val: int, err: int, decoded=None
    ) -> None:
        # The record is taken while the caller still waits (its command name), written
        # after the answer: a log write may block on a full pipe, the caller must not.
        line = self._log_line(note, reason, err) if reason else None
        denial = (
            self._denial_record(note, decoded, _errno_name(err), reason) if reason and err else None
        )
        self.respond(note, val=val, err=err)
        if line:
            self._write_log(line)
        self._write_records([denial])

    def _write_records(self, records: list) -> None:
        records = [record for record in records if record is not None]
        if records:
            with self._log_lock:
                for record in records:
                    self.records.write(self._record_limit.admit(record))

    def _denial_record(
        self, note: Notification, args: dict | None, verdict: str, rule: str
    ) -> dict | None:
        """A refusal, or a call audit mode let through, as a denial record
        (docs/denials.md), when the container keeps them."""
        if self.records is None:
            return None
        return denials.record(
            self.record_context,
            source="broker",
            pid=note.pid,
            comm=_comm(note.pid),
            syscall=syscalls.name(note.nr),
            args=args,
            verdict=verdict,
            rule=rule,
        )

    def _log_line(self, note: Notification, reason: str, err: int) -> bytes | None:
        if not self.verbose:
            return None
        record = {
            "time": denials.rfc3339(time.time()),
            "container": self.container_id,
            "profile": self.profile.name,
            "pid": note.pid,
            "command": _comm(note.pid),
            "syscall": syscalls.name(note.nr),
            "nr": note.nr,
            "args": [f"{a:#x}" for a in note.args],
            "verdict": _errno_name(err),
            "reason": reason,
        }
        return (json.dumps(record) + "\n").encode()

    def debug(self, message: str) -> None:
        """A line of the runtime's log format (runtime/log.py, json), under --verbose."""
        if self.verbose:
            stamp = denials.rfc3339(time.time())
            line = {"level": "debug", "msg": f"broker: {message}", "time": stamp}
            self._write_log((json.dumps(line) + "\n").encode())

    def _write_log(self, line: bytes) -> None:
        # A log nobody reads (a full pipe) must not stall the broker: a record that
        # cannot be written within the timeout is dropped.
        writable = select.poll()
        writable.register(self.log_fd, select.POLLOUT)
        with self._log_lock:
            try:
                if writable.poll(int(self.timeout * 1000)):
                    os.write(self.log_fd, line)
            except OSError:
                pass

    def valid(self, note: Notification) -> bool:
        try:
            fcntl.ioctl(self.fd, NOTIF_ID_VALID, struct.pack("=Q", note.id))
            return True
        except OSError:
            return False

    # --- mediated calls ---

    def _mediate(self, note: Notification, handler: handlers.Handler) -> None:
        try:
            self.answer(note, verdict_of(self, note, handler))
        finally:
            self._slots.release()


def verdict_of(broker: Broker, note: Notification, handler: handlers.Handler) -> Verdict:
    """The handler's verdict on the call; every way it can end becomes one, failing
    closed: anything unexpected refuses the call."""
    call = None
    try:
        call = Call(broker, note, writable=handler.writes_back)
        try:
            return handler.perform(call)
        finally:
            call.close()
    except Answered:
        return Verdict(answered=True, audits=_audits(call))
    except Denied as d:
        return Verdict.refused(d, _audits(call))
    except OSError as e:
        # The call itself failed (e.g. ECONNREFUSED): that is its answer.
        return Verdict.failed(e.errno or errno.EPERM, _audits(call))
    except Exception as e:  # noqa: BLE001 - fail closed on anything unexpected
        return Verdict.refused(Denied(f"broker error: {type(e).__name__}: {e}"), _audits(call))


def _audits(call) -> tuple:
    return tuple(call.audits) if call is not None else ()


def _errno_name(err: int) -> str:
    """A refusal's verdict, in the log line and the record alike: EPERM, ETIMEDOUT..."""
    return errno.errorcode.get(err, str(err))


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
