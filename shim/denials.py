"""The shim's denial feed: its containers' denials as `/zviz/denial` events (docs/denials.md).

Two writers fill a container's denials.jsonl: this feed, from the kernel's audit records
(seccomp denials, mapped to the container by audit session or pid namespace), and the
container's broker (its refusals). The file is the record: every line of it, whoever
wrote it, is published once as a containerd event and logged, so the event, the file
and `zviz audit` always show the same record.

The kernel's records come from the node's audit reader (shim/audit_reader.py: one
multicast reader per node, which hands each daemon its sessions' records), connected at
the first watched container and left with the last. When the reader cannot be reached
(not started yet, dead, switched off) the daemon reads the kernel itself (its own
audit socket, `KernelRecords`), logs it, and moves to a reader again once one answers.
Either source lives in the daemon's loop: reading is bounded per wakeup (READ_BATCH),
so a container flooding denied calls costs the loop a bounded slice; what could not be
queued for us meanwhile is counted (`lost`) and logged.
"""

import collections
import json
import logging
import os
import time

from api.gen.zviz.events.v1 import denial_pb2
from runtime import denials
from shim import audit_reader

log = logging.getLogger("shim.denials")

TOPIC = "/zviz/denial"
# How often the files are read for the broker's lines and rate-limit summaries are due.
POLL_SECONDS = 0.25
# Kernel records handled per loop wakeup; the rest wait for the next turn of the loop.
READ_BATCH = 256
# Reading the kernel ourselves, we start the node's reader again after this long without
# an answer, twice as long after each further failure, at most READER_RETRY_MAX apart
# (a reader that cannot start must not cost a Python start a second).
READER_RETRY_SECONDS = 1.0
READER_RETRY_MAX = 60.0
# After moving to the node's reader, its records read by our own socket too (the
# overlap) are skipped by serial for this long.
OVERLAP_SECONDS = 2.0
# The records' source (the node's reader, or our own audit socket) stays open this long
# after the daemon's last container is gone. The node's reader exits with its last
# daemon, so containers run one after another (`ctr run --rm` in a loop) started a
# reader each, a Python start beside every Create: 136 ms against 125 ms a `ctr run`
# (medians of 20, interleaved, this VM).
READER_LINGER_SECONDS = 3.0


def event(rec: dict) -> denial_pb2.Denial:
    """A record (a line of denials.jsonl) as the event body."""
    message = denial_pb2.Denial()
    for field in message.DESCRIPTOR.fields:
        value = rec.get(field.name)
        if value in (None, ""):
            continue
        if field.name == "args":
            message.args.update({k: str(v) for k, v in value.items()})
        elif field.name == "counts":
            message.counts.update({k: int(v) for k, v in value.items()})
        elif field.type == field.TYPE_STRING:
            setattr(message, field.name, str(value))
        else:
            setattr(message, field.name, int(value))
    return message


def _in_initial_network_namespace() -> bool:
    """Whether we share PID 1's network namespace; True when that cannot be told (a
    hardened PID 1 may refuse even root its /proc/1/ns: this machine's does)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return True


class DenialFeed:
    def __init__(self, loop, publish) -> None:
        self.loop = loop
        self.publish = publish
        # The node's reader (audit_reader.NodeReaderClient) or our own audit socket.
        self.kernel: denials.KernelRecords | audit_reader.NodeReaderClient | None = None
        self.kernel_unavailable = ""  # why the kernel's records cannot be read here
        self._retry_reader_at: float | None = None  # reading ourselves: try the node's then
        self._own_serials: collections.deque = collections.deque()  # (read at, serial)
        self._skip_serials: set[int] = set()
        self._skip_until = 0.0
        self._lost_logged = 0
        self._landlock_noted = False
        self._reader_started_at = 0.0
        self._reader_retry = READER_RETRY_SECONDS
        self.watcher = denials.KernelWatcher()
        self._files: dict[str, list] = {}  # container id -> [path, offset read up to]
        # container id -> [its cgroup, pids.max refusals recorded so far]
        self._pids_hits: dict[str, list] = {}
        self._ticker = None
        self._linger = None  # the close of the records' source, once no container is left

    # Records are never worth a container: these three are called from Create, Start and
    # Delete, and a failure here is logged, never raised.

    def watch(
        self, container_id: str, state_dir: str, init_pid: int, profile, annotations, cgroup=None
    ):
        """Start publishing a created container's denials (before it can make a call)."""
        if not denials.enabled():
            return
        try:
            self._watch(container_id, state_dir, init_pid, profile, annotations)
            if cgroup is not None:
                self._pids_hits[container_id] = [cgroup, cgroup.pids_limit_hits()]
        except Exception:  # noqa: BLE001
            log.exception("denial records of %s", container_id, extra={"container": container_id})

    def limit_hit(self, container_id: str, kind: str, count: int, cgroup) -> None:
        """`count` new hits of the container's `kind` limit (the shim saw an OOM kill)."""
        if container_id not in self._files:
            return
        try:
            if self.watcher.record_limit(container_id, kind, count, cgroup.limit(kind)):
                self._publish_new(container_id)
        except Exception:  # noqa: BLE001
            log.exception("a %s limit record of %s", kind, container_id)

    def _check_pids_limits(self) -> None:
        # pids.events is polled with the files (POLL_SECONDS): one small read per
        # container per tick, and a fork bomb makes one record per tick, not one per fork.
        for container_id, entry in list(self._pids_hits.items()):
            try:
                hits = entry[0].pids_limit_hits()
            except OSError:
                continue  # the group is gone with its container
            if hits > entry[1]:
                new, entry[1] = hits - entry[1], hits
                self.limit_hit(container_id, "pids", new, entry[0])

    def _watch(self, container_id: str, state_dir: str, init_pid: int, profile, annotations):
        path = denials.path_in(state_dir)
        try:
            offset = os.stat(path).st_size
        except FileNotFoundError:
            offset = 0
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._open_kernel_records()
        self.watcher.watch(container_id, state_dir, init_pid, profile, annotations)
        self._subscribe()
        self._files[container_id] = [path, offset]
        if self._ticker is None:
            self._ticker = self.loop.call_later(POLL_SECONDS, self._tick)

    def exec_started(self, container_id: str, pid: int) -> None:
        """An exec'd process of a watched container: its audit session is the container's."""
        try:
            # What our socket holds first: records of this exec already there are kept
            # waiting (by session) for the claim below.
            if container_id in self._files and self._read_kernel():
                self._publish_all()
            if container_id in self._files and self.watcher.add_session(container_id, pid):
                self._publish_new(container_id)
            self._subscribe()
        except Exception:  # noqa: BLE001
            log.exception("denial records of an exec in %s", container_id)

    def unwatch(self, container_id: str) -> None:
        """Publish what is left of the container's records; before its state dir goes."""
        if container_id not in self._files:
            return
        try:
            self._read_kernel()
            self._check_pids_limits()
            self._pids_hits.pop(container_id, None)
            self.watcher.unwatch(container_id)
            self._publish_new(container_id)
            self._subscribe()
        except Exception:  # noqa: BLE001
            log.exception("last denial records of %s", container_id)
        del self._files[container_id]
        if not self._files and self._linger is None:
            self._linger = self.loop.call_later(READER_LINGER_SECONDS, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._linger = None
        if not self._files:
            self._close()

    def _open_kernel_records(self) -> None:
        if self.kernel is not None or self.kernel_unavailable:
            return
        if not _in_initial_network_namespace():
            # The kernel multicasts audit records in the initial network namespace only.
            self.kernel_unavailable = "the shim is not in the initial network namespace"
            log.warning("seccomp denials will not be recorded: %s", self.kernel_unavailable)
            return
        self._note_landlock_records()
        if audit_reader.enabled():
            self.kernel = audit_reader.NodeReaderClient.connect(audit_reader.directory())
            if self.kernel is not None:
                self.loop.add_reader(self.kernel.fileno(), self._kernel_readable)
                return
            # None yet (or a dead one's socket): start it, and read ourselves until it
            # answers (_tick), so that no record of the meantime is missed.
            self._start_reader()
        self._read_ourselves()

    def _note_landlock_records(self) -> None:
        """Say once per daemon when the kernel will write no Landlock records. Not per
        reader opened: the reader closes with the group's last container, so a daemon
        serving one container at a time asked for each Create, and the kernel answers
        AUDIT_GET from a thread it starts for that (1-15 ms here, on the loop, before
        the Create's answer)."""
        if self._landlock_noted:
            return
        self._landlock_noted = True
        from runtime.security import landlock

        try:
            missing = denials.landlock_records_missing(landlock.abi_version())
        except OSError as e:
            missing = str(e)
        if missing:
            log.info("Landlock denials will not be recorded: %s (docs/denials.md)", missing)

    def _read_ourselves(self) -> None:
        try:
            self.kernel = denials.KernelRecords()
        except denials.KernelRecordsUnavailable as e:
            self.kernel_unavailable = str(e)
            log.warning("seccomp denials will not be recorded: %s", e)
            return
        self.loop.add_reader(self.kernel.fileno(), self._kernel_readable)

    def _start_reader(self) -> None:
        self._retry_reader_at = time.monotonic() + 0.05
        self._reader_started_at = time.monotonic()
        try:
            audit_reader.start(audit_reader.directory())
        except OSError as e:
            log.warning("cannot start the node's audit reader: %s", e)

    def _try_node_reader(self) -> None:
        """Reading ourselves: move to the node's reader if one answers now."""
        client = audit_reader.NodeReaderClient.connect(audit_reader.directory())
        if client is None:
            if time.monotonic() - self._reader_started_at > self._reader_retry:
                # It failed, or lost the race to one that then died.
                if self._reader_retry == READER_RETRY_SECONDS:
                    log.warning(
                        "the node's audit reader (%s) does not answer: reading the kernel's "
                        "records myself, starting it again now and then",
                        audit_reader.directory(),
                    )
                self._reader_retry = min(self._reader_retry * 2, READER_RETRY_MAX)
                self._start_reader()
            return
        try:
            client.subscribe(self.watcher.sessions())
        except audit_reader.ReaderGone:
            client.close()
            return
        self._reader_retry = READER_RETRY_SECONDS
        # From here on the reader has our sessions: what our socket still holds is read
        # (all of it: what came before the reader started is nowhere else), then it goes;
        # records in both are skipped from the reader by serial.
        if self._read_kernel(limit=1 << 30):
            self._publish_all()
        self._retry_reader_at = None
        own = self.kernel
        if own is not None:
            self.loop.remove_reader(own.fileno())
            own.close()
        self._skip_serials = {serial for _, serial in self._own_serials}
        self._skip_until = time.monotonic() + OVERLAP_SECONDS
        self._own_serials.clear()
        self.kernel = client
        self.loop.add_reader(client.fileno(), self._kernel_readable)
        log.info("reading the kernel's records through the node's audit reader")

    def _reader_gone(self, why: str) -> None:
        if not self._files:
            self._close()  # lingering without a container: no record to read for anyone
            return
        log.warning("%s: reading the kernel's records myself until a reader answers", why)
        if self.kernel is not None:
            self.loop.remove_reader(self.kernel.fileno())
            self.kernel.close()
            self.kernel = None
        self._read_ourselves()
        self._start_reader()

    def _subscribe(self) -> None:
        if isinstance(self.kernel, audit_reader.NodeReaderClient):
            try:
                self.kernel.subscribe(self.watcher.sessions())
            except audit_reader.ReaderGone as e:
                self._reader_gone(f"the node's audit reader is gone ({e})")

    def _close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.kernel is not None:
            self.loop.remove_reader(self.kernel.fileno())
            self.kernel.close()
            self.kernel = None
        self._retry_reader_at = None

    def _kernel_readable(self) -> None:
        if self._read_kernel():
            self._publish_all()

    def _read_kernel(self, limit: int = READ_BATCH) -> bool:
        if self.kernel is None:
            return False
        recorded = False
        own = isinstance(self.kernel, denials.KernelRecords)
        try:
            batch = self.kernel.read(limit)
        except audit_reader.ReaderGone as e:
            self._reader_gone(str(e))
            return False
        except OSError as e:
            log.warning("reading the kernel's audit records: %s", e)
            return False
        now = time.monotonic()
        if own and self._retry_reader_at is not None:
            # Moving to the node's reader soon: remember what we read, to skip it there.
            self._own_serials += ((now, denials.serial_of(text)) for _, text in batch)
            while self._own_serials and now - self._own_serials[0][0] > OVERLAP_SECONDS:
                self._own_serials.popleft()
        skip = self._skip_serials if not own and now < self._skip_until else ()
        for kind, text in batch:
            if skip and denials.serial_of(text) in skip:
                continue
            recorded |= self.watcher.handle(kind, text) is not None
        return recorded

    def _tick(self) -> None:
        self._ticker = None
        if not self._files:
            return
        if self._retry_reader_at is not None and time.monotonic() >= self._retry_reader_at:
            self._try_node_reader()
        lost = getattr(self.kernel, "lost", 0)
        if lost > self._lost_logged:
            log.warning("kernel records lost before we could read them: %d in all", lost)
            self._lost_logged = lost
        self._check_pids_limits()
        self.watcher.flush()
        self._publish_all()
        self._ticker = self.loop.call_later(POLL_SECONDS, self._tick)

    def _publish_all(self) -> None:
        for container_id in list(self._files):
            self._publish_new(container_id)

    def _publish_new(self, container_id: str) -> None:
        entry = self._files[container_id]
        try:
            if os.stat(entry[0]).st_size <= entry[1]:
                return
        except FileNotFoundError:
            return
        records, entry[1] = denials.read_lines(entry[0], entry[1])
        for rec in records:
            line = json.dumps(rec, separators=(",", ":"))
            log.info("denial %s", line, extra={"container": container_id})
            self.publish(TOPIC, event(rec))
