"""Denial records: every refused syscall or connect becomes one structured JSON record.

Where records come from (docs/denials.md):
- seccomp: the profile's filter is loaded with SECCOMP_FILTER_FLAG_LOG, so the kernel
  writes an audit record (type SECCOMP: pid, comm, exe, arch, syscall, the action) for
  each call the filter answers with an errno; allowed calls never reach that code. The
  records reach every root reader of the audit multicast group (AUDIT_NLGRP_READLOG)
  whether or not auditd runs or audit is enabled (`KernelRecords`).
- Landlock (ABI 7, Linux 6.15+): the ruleset is enforced with flags that log the
  workload's denials (landlock.log_flags); the kernel then writes LANDLOCK_ACCESS (the
  refused rights, the path) and, at a domain's first denial, LANDLOCK_DOMAIN records,
  followed by the call's SYSCALL record (pid, session, syscall, errno) -- but only
  while audit is enabled (`audit_enabled`), unlike seccomp's (`LandlockEvents`).
- the broker: its refusals (a connect, bind or send the profile does not allow), with
  the rule that refused and the address; it appends them to the same file itself.

Where records go: JSON lines in `<state dir>/denials.jsonl` (one file per container,
`RecordFile`); the shim publishes each line as a containerd event (/zviz/denial);
`zviz audit` reads the files.

A container that loops on a denied call is bounded here, not in the kernel: its first
RECORD_BURST records, then one summary per RECORD_INTERVAL counting the rest, a new
burst after a quiet interval (`RateLimiter`); the file stops at MAX_FILE_BYTES.
"""

import collections
import errno
import json
import os
import re
import time

DENIALS_FILE = "denials.jsonl"
# Per container: this many records per interval, then one summary of what was dropped.
RECORD_BURST = 100
RECORD_INTERVAL = 10.0
# A container's file stops growing here (~20 000 records; a looping container adds one
# summary line per interval once past its burst).
MAX_FILE_BYTES = 8 << 20
# Records off (the filter loaded without SECCOMP_FILTER_FLAG_LOG, no broker records):
# for a node that must keep denials out of the kernel log (see docs/denials.md).
RECORDS_SWITCH = "ZVIZ_DENIAL_RECORDS"

# The CRI annotations a pod's containers carry (containerd's CRI plugin sets them).
POD_ANNOTATIONS = {
    "pod_namespace": "io.kubernetes.cri.sandbox-namespace",
    "pod_name": "io.kubernetes.cri.sandbox-name",
    "pod_uid": "io.kubernetes.cri.sandbox-uid",
}

# linux/audit.h
NETLINK_AUDIT = 9
AUDIT_NLGRP_READLOG = 1
AUDIT_SYSCALL = 1300
AUDIT_EOE = 1320  # end of a multi-record event
AUDIT_SECCOMP = 1326
AUDIT_LANDLOCK_ACCESS = 1423
AUDIT_LANDLOCK_DOMAIN = 1424
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_SID_UNSET = 4294967295  # (unsigned)-1: no session (loginuid never set)
_NLMSG_HEADER = 16
# linux/seccomp.h: the action part of a filter's return value.
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
_ACTIONS = {
    0x80000000: "killed",  # SECCOMP_RET_KILL_PROCESS
    0x00000000: "killed",  # SECCOMP_RET_KILL_THREAD
    0x00030000: "trapped",  # SECCOMP_RET_TRAP
    0x7FFC0000: "audit",  # SECCOMP_RET_LOG: audit mode's answer (allowed, recorded)
}
SECCOMP_RET_ERRNO = 0x00050000


def enabled() -> bool:
    """Whether containers made now record their denials (on unless switched off)."""
    return os.environ.get(RECORDS_SWITCH, "1") not in ("0", "off", "false", "no")


def rfc3339(seconds: float) -> str:
    import datetime  # not on the start path: records are made by the shim and the broker

    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """An RFC 3339 time (or a duration back from now: 30s, 5m, 2h) as seconds since 1970."""
    import datetime

    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if match:
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return time.time() - float(match.group(1)) * scale
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def context(container_id: str, profile_name: str, annotations: dict | None) -> dict:
    """The fields every record of one container carries."""
    annotations = annotations or {}
    fields = {"container_id": container_id, "profile": profile_name}
    for field, key in POD_ANNOTATIONS.items():
        fields[field] = annotations.get(key, "")
    return fields


def record(
    ctx: dict,
    *,
    source: str,
    pid: int,
    comm: str,
    syscall: str,
    verdict: str,
    rule: str,
    args: dict | None = None,
    when: float | None = None,
    **extra,
) -> dict:
    """One denial record (the shape of the file's lines and of the /zviz/denial event)."""
    result = {"time": rfc3339(time.time() if when is None else when), **ctx}
    result.update(source=source, pid=pid, comm=comm, syscall=syscall, args=args or {})
    result.update(verdict=verdict, rule=rule, **extra)
    return result


AUDITED = "audit mode: recorded and allowed"
STILL_DENIED = "audit mode: escape class, denied"


def seccomp_rule(profile, syscall: str, verdict: str = "") -> str:
    """Which part of the profile refused `syscall` (the kernel does not say which rule);
    in audit mode, also whether the call went through (verdict "audit") or not."""
    rule = _profile_part(profile, syscall)
    if profile.mode != "audit":
        return rule
    return f"{rule}; {AUDITED if verdict == 'audit' else STILL_DENIED}"


def _profile_part(profile, syscall: str) -> str:
    if syscall in profile.deny:
        return f"profile {profile.name}: deny {syscall}"
    if syscall in ("clone", "clone3", "socket", "ioctl", "personality"):
        return f"profile {profile.name}: {syscall} arguments not allowed"
    if syscall not in profile.allow:
        return f"profile {profile.name}: not in allow (default {profile.default_action})"
    return f"profile {profile.name}: {syscall} arguments not allowed"


def seccomp_verdict(code: int, profile, syscall: str) -> str:
    """What the caller got. The record has the action only (its `code` carries no errno):
    the errno is the one the profile's filter answers for that syscall."""
    action = code & SECCOMP_RET_ACTION_FULL
    if action != SECCOMP_RET_ERRNO:
        return _ACTIONS.get(action, f"{code:#x}")
    if syscall == "clone3":
        return "ENOSYS"  # always: libc falls back to clone (seccomp.py)
    if syscall not in profile.deny and syscall not in profile.allow:
        return {"ENOSYS": "ENOSYS"}.get(profile.default_action, "EPERM")
    return "EPERM"


# What a cgroup limit refused, by limit kind: the record's syscall and verdict. A fork
# refused by pids.max fails with EAGAIN (fork, clone or clone3: the kernel does not say
# which); an OOM kill is not a call at all (syscall empty).
LIMIT_VERDICTS = {"pids": ("fork", "pids-limit"), "memory": ("", "oom-kill")}


def limit_rule(profile, kind: str, limit: int) -> str:
    """Who set the limit that was hit: the profile's cap (it lowers config.json's, never
    raises it: runtime/security) or else config.json's own linux.resources."""
    unit = "" if kind == "pids" else " bytes"
    cap = profile.pids_max if kind == "pids" else profile.memory_max
    if limit and cap == limit:
        return f"profile {profile.name}: {kind}_max {limit}{unit}"
    field = "pids.limit" if kind == "pids" else "memory.limit"
    return f"config.json linux.resources.{field} {limit or 'unlimited'}{unit}"


class RateLimiter:
    """The first `burst` records, then only counts: one summary per `interval` that dropped
    any. A container quiet for a whole interval gets a fresh burst (new behaviour is seen
    in full again); one that loops forever costs its file one summary per interval."""

    def __init__(self, burst: int = RECORD_BURST, interval: float = RECORD_INTERVAL, clock=None):
        self.burst = burst
        self.interval = interval
        self.clock = clock or time.monotonic
        self._window_start = self._last_seen = self.clock()
        self._admitted = 0
        self._suppressed: dict[str, int] = {}

    def admit(self, rec: dict) -> list[dict]:
        """The records to write now: `rec` itself or nothing, maybe after a summary."""
        out = self.flush(rec)
        now = self.clock()
        if now - self._last_seen >= self.interval:
            self._admitted = 0
        self._last_seen = now
        if self._admitted < self.burst:
            self._admitted += 1
            out.append(rec)
        else:
            key = f"{rec['source']} {rec['syscall']} {rec['verdict']}"
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
        return out

    def flush(self, like: dict, final: bool = False) -> list[dict]:
        """The summary of a finished interval (if it dropped any); a new interval begins.
        FINAL: the container is going, its unfinished interval's summary is due now (the
        counts name every syscall dropped: learning reads them)."""
        now = self.clock()
        if now - self._window_start < self.interval and not final:
            return []
        out = []
        if self._suppressed:
            ctx = {k: like[k] for k in ("container_id", "profile", *POD_ANNOTATIONS) if k in like}
            out.append(
                {
                    "time": rfc3339(time.time()),
                    **ctx,
                    "source": "rate-limit",
                    "verdict": "suppressed",
                    "count": sum(self._suppressed.values()),
                    "counts": dict(self._suppressed),
                    "interval": self.interval,
                }
            )
        self._window_start = now
        self._suppressed = {}
        return out


class RecordFile:
    """Appends records to one container's denials.jsonl (created 0600, never truncated).

    The state directory is usually on /run (memory): past MAX_FILE_BYTES no more lines
    are written (`dropped` counts the records lost); events stop with them.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.dropped = 0

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        # One write per batch with O_APPEND: writers (the shim, the broker) never interleave
        # within a line.
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        try:
            if os.fstat(self.fd).st_size + len(data) > MAX_FILE_BYTES:
                self.dropped += len(records)
                return
            os.write(self.fd, data.encode())
        except OSError:
            pass  # a full disk loses records, never the container

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, DENIALS_FILE)


def read_lines(path: str, offset: int = 0) -> tuple[list[dict], int]:
    """Whole records from `offset` on and the offset after the last whole line."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a torn line (crash mid-write) is skipped, the rest still read
    return records, offset + end


def record_time(rec: dict) -> float:
    try:
        return parse_time(rec["time"])
    except (KeyError, ValueError):
        return 0.0


# --- The kernel's records (audit multicast) ---


class KernelRecordsUnavailable(Exception):
    pass


class KernelRecords:
    """A non-blocking reader of the kernel's audit records (the multicast log group).

    Needs CAP_AUDIT_READ in the initial user namespace and the initial network namespace
    (the kernel multicasts only there). Every reader gets every record of the node:
    each shim keeps its own containers' and ignores the rest.
    """

    def __init__(self, rcvbuf: int = 4 << 20):
        import socket  # ~8 ms: only readers pay it, never the container's start path

        try:
            self.sock = socket.socket(
                socket.AF_NETLINK,
                socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                NETLINK_AUDIT,
            )
        except OSError as e:
            raise KernelRecordsUnavailable(f"no audit netlink socket: {e.strerror}") from None
        try:
            self.sock.bind((0, 1 << (AUDIT_NLGRP_READLOG - 1)))
        except OSError as e:
            self.sock.close()
            raise KernelRecordsUnavailable(
                f"joining the audit log group: {e.strerror} (needs CAP_AUDIT_READ)"
            ) from None
        try:  # room for a burst while the reader is busy (root may exceed rmem_max)
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            pass
        self.lost = 0  # overruns: records the kernel could not queue for us

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, limit: int = 1 << 30) -> list[tuple[int, str]]:
        """(type, text) of the records queued now, about `limit` at most; never blocks."""
        out = []
        while len(out) < limit:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                raise
            offset = 0
            while offset + _NLMSG_HEADER <= len(data):
                length, kind = (
                    int.from_bytes(data[offset : offset + 4], "little"),
                    int.from_bytes(data[offset + 4 : offset + 6], "little"),
                )
                if length < _NLMSG_HEADER:
                    break
                body = data[offset + _NLMSG_HEADER : offset + length]
                out.append((kind, body.rstrip(b"\0").decode(errors="replace")))
                offset += (length + 3) & ~3
        return out

    def close(self) -> None:
        self.sock.close()


AUDIT_GET = 1000
AUDIT_SET = 1001
AUDIT_STATUS_FIELDS = ("mask", "enabled", "failure", "pid", "rate_limit", "backlog_limit")
AUDIT_STATUS_FIELDS += ("lost", "backlog", "feature_bitmap", "backlog_wait_time")


def audit_status(set_enabled: int | None = None) -> dict[str, int]:
    """The kernel's audit status (AUDIT_GET: enabled, the auditd pid, the backlog...);
    with `set_enabled`, first AUDIT_SET it (tests only: zviz never changes the node's
    audit). Raises KernelRecordsUnavailable without audit or CAP_AUDIT_CONTROL."""
    import socket
    import struct

    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 9)
    except OSError as e:
        raise KernelRecordsUnavailable(f"no audit netlink socket: {e.strerror}") from None
    with sock:
        sock.settimeout(2)
        requests = []
        if set_enabled is not None:
            body = struct.pack("=10I", 1, set_enabled, *[0] * 8)  # mask: AUDIT_STATUS_ENABLED
            requests.append((AUDIT_SET, body))
        requests.append((AUDIT_GET, b""))
        for seq, (kind, body) in enumerate(requests, 1):
            flags = 0x1 | (0x4 if kind == AUDIT_SET else 0)  # NLM_F_REQUEST (| NLM_F_ACK)
            sock.send(struct.pack("=IHHII", _NLMSG_HEADER + len(body), kind, flags, seq, 0) + body)
            while True:
                try:
                    data = sock.recv(65536)
                except OSError as e:
                    raise KernelRecordsUnavailable(f"audit status: {e}") from None
                reply = int.from_bytes(data[4:6], "little")
                if reply == 2:  # NLMSG_ERROR: an ack (0) or the errno
                    error = -int.from_bytes(data[16:20], "little", signed=True)
                    if error:
                        raise KernelRecordsUnavailable(f"audit status: {os.strerror(error)}")
                    if kind == AUDIT_SET:
                        break
                elif reply == AUDIT_GET:
                    values = struct.unpack_from("=10I", data, _NLMSG_HEADER)
                    return dict(zip(AUDIT_STATUS_FIELDS, values, strict=True))
    raise KernelRecordsUnavailable("audit status: no answer")


def landlock_records_missing(abi: int) -> str:
    """Why the kernel writes no Landlock records here ("" when it does)."""
    if abi < 7:
        return f"Landlock ABI {abi} < 7 reports no denials (Linux 6.15+)"
    if not enabled():
        return f"switched off ({RECORDS_SWITCH})"
    try:
        status = audit_status()
    except KernelRecordsUnavailable as e:
        return str(e)
    if not status["enabled"]:
        return "audit is disabled: the kernel writes Landlock records only while it is enabled"
    return ""


_FIELD = r'(\w+)=("[^"]*"|\S+)'
_STAMP = r"audit\((\d+)\.(\d+):(\d+)\)"


def parse_fields(text: str) -> tuple[float, dict[str, str]]:
    """An audit record's time and its key=value fields (untrusted strings decoded)."""
    when = 0.0
    stamp = re.match(_STAMP, text)
    if stamp:
        when = int(stamp.group(1)) + int(stamp.group(2)) / 1000
    fields = {}
    for key, value in re.findall(_FIELD, text[stamp.end() if stamp else 0 :]):
        if value.startswith('"'):
            value = value[1:-1]
        elif key in ("comm", "exe", "path", "name") and re.fullmatch(r"(?:[0-9A-F]{2})+", value):
            # The kernel hex-encodes a string with spaces, quotes or control characters.
            value = bytes.fromhex(value).decode(errors="replace")
        fields[key] = value
    return when, fields


def syscall_name(nr: int, arch: int) -> str:
    from runtime.security import syscalls

    native = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}.get(os.uname().machine)
    if arch != native:
        return f"syscall_{nr}(arch {arch:#x})"
    return syscalls.name(nr)


def session_of(pid: int) -> int | None:
    """The audit session a process belongs to (None when unset or the process is gone)."""
    try:
        with open(f"/proc/{pid}/sessionid") as f:
            value = int(f.read())
    except (OSError, ValueError):
        return None
    return None if value == AUDIT_SID_UNSET else value


def pid_namespace_of(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def start_session(loginuid: int) -> None:
    """Give the calling process (a container's first process, still host root) its own
    audit session, which all its descendants inherit and cannot change (that takes
    CAP_AUDIT_CONTROL in the initial user namespace): the kernel's records then say which
    container a denied call came from even after the caller has exited. Best effort:
    a kernel without audit, or a loginuid made immutable, leaves the pid to decide."""
    try:
        with open("/proc/self/loginuid", "w") as f:
            f.write(str(loginuid))
    except OSError:
        pass


class Watched:
    """One container whose kernel records a reader keeps."""

    def __init__(self, container_id: str, state_dir: str, init_pid: int, profile, annotations):
        self.container_id = container_id
        self.profile = profile
        self.context = context(container_id, profile.name, annotations)
        # Its audit session (start_session) names it in records of exited callers too;
        # its pid namespace covers processes without that session (exec'd ones).
        self.session = session_of(init_pid)
        namespace = pid_namespace_of(init_pid)
        # A container in the host's pid namespace cannot be told from the host by it.
        self.pid_namespace = namespace if namespace != pid_namespace_of(os.getpid()) else None
        self.file = RecordFile(path_in(state_dir))
        self.limit = RateLimiter()
        self.sessions = {self.session} if self.session is not None else set()
        # The processes that enforced its Landlock rulesets (PID 1, each exec'd one): a
        # LANDLOCK_DOMAIN record names the domain's creator by pid.
        self.pids = {init_pid}


# A record of a session not (yet) known waits this long for add_session: an exec'd
# process can make its denied call and exit before the shim has learnt its session.
PENDING_SECONDS = 2.0
PENDING_MAX = 512


class KernelWatcher:
    """Turns the kernel's seccomp and Landlock records of the watched containers into
    denial records."""

    def __init__(self, clock=time.monotonic):
        self._containers: dict[str, Watched] = {}
        self._by_session: dict[int, Watched] = {}
        self._pending: collections.deque = collections.deque()  # (arrived, session, text)
        self.landlock = LandlockEvents(self)
        # Exec'd processes gone before their session could be read, none of whose records
        # had come yet: pid -> (when, container).
        self._exec_pids: dict[int, tuple[float, Watched]] = {}
        self.clock = clock
        self.ignored = 0  # records of processes that are not ours (other shims', the host's)

    def watch(self, container_id: str, state_dir: str, init_pid: int, profile, annotations) -> None:
        self.unwatch(container_id)
        watched = Watched(container_id, state_dir, init_pid, profile, annotations)
        self._containers[container_id] = watched
        if watched.session is not None:
            self._by_session[watched.session] = watched

    def add_session(self, container_id: str, pid: int) -> list[dict]:
        """A process started in the container later (exec) with a session of its own: its
        records are the container's too, those already waiting included (returned)."""
        watched = self._containers.get(container_id)
        if watched is None:
            return []
        watched.pids.add(pid)
        session = session_of(pid)
        if session is None:
            # Gone already (it denied, exited and was reaped before the shim got here):
            # its pid, which the kernel's records carry, names its session instead.
            session = next(
                (s for _, s, t in self._pending if _number_after(t, " pid=") == pid), None
            ) or self.landlock.pending_session(pid)
        if session is None:
            # Its records have not come yet (they are on their way through the reader,
            # or still queued): the first with this pid names the session (`_by_exec_pid`).
            self._exec_pids = {
                p: entry
                for p, entry in self._exec_pids.items()
                if self.clock() - entry[0] < PENDING_SECONDS
            }
            self._exec_pids[pid] = (self.clock(), watched)
            return []
        if session in self._by_session:
            return []
        return self._add_session(watched, session)

    def _add_session(self, watched: Watched, session: int) -> list[dict]:
        watched.sessions.add(session)
        self._by_session[session] = watched
        waiting = [text for _, s, text in self._pending if s == session]
        self._pending = collections.deque(p for p in self._pending if p[1] != session)
        recorded = [r for r in (self.handle(AUDIT_SECCOMP, text) for text in waiting) if r]
        return recorded + self.landlock.claim(session)

    def unwatch(self, container_id: str) -> None:
        watched = self._containers.pop(container_id, None)
        if watched is None:
            return
        for rec in watched.limit.flush({**watched.context, "source": "", "syscall": ""}, True):
            watched.file.write([rec])
        for session in watched.sessions:
            self._by_session.pop(session, None)
        self.landlock.forget(watched)
        watched.file.close()

    def __bool__(self) -> bool:
        return bool(self._containers)

    def sessions(self) -> set[int]:
        """The audit sessions of the watched containers (what the node's reader routes)."""
        return set(self._by_session)

    def handle(self, kind: int, text: str) -> dict | None:
        """Record one kernel record if it is a denial of a watched container's process."""
        if kind in LANDLOCK_EVENT_KINDS:
            return self.landlock.handle(kind, text) if self._containers else None
        if kind != AUDIT_SECCOMP or not self._containers:
            return None
        # Every shim gets every record of the node: whose it is is decided from two
        # fields found directly (no string the caller chose can hold " ses=" or " pid=":
        # the kernel hex-encodes one with a space); only our records are parsed whole.
        session = _number_after(text, " ses=")
        pid = _number_after(text, " pid=")
        if pid is None:
            return None
        watched = self._owner(pid, session) or self._by_exec_pid(pid, session)
        if watched is None:
            self._keep_pending(session, text)
            self.ignored += 1
            return None
        when, fields = parse_fields(text)
        try:
            code = int(fields.get("code", "0"), 16)
            nr = int(fields["syscall"])
            arch = int(fields.get("arch", "0"), 16)
        except (KeyError, ValueError):
            return None
        if code & SECCOMP_RET_ACTION_FULL == 0x7FC00000:
            return None  # a mediated call the broker answers (user_notif): not a denial
        syscall = syscall_name(nr, arch)
        verdict = seccomp_verdict(code, watched.profile, syscall)
        rec = record(
            watched.context,
            source="seccomp",
            pid=pid,
            comm=fields.get("comm", ""),
            syscall=syscall,
            verdict=verdict,
            rule=seccomp_rule(watched.profile, syscall, verdict),
            when=when or None,
            exe=fields.get("exe", ""),
            syscall_nr=nr,
        )
        watched.file.write(watched.limit.admit(rec))
        return rec

    def record_limit(self, container_id: str, kind: str, count: int, limit: int) -> dict | None:
        """`count` new hits of a cgroup limit (`kind`: pids or memory) of a watched
        container as one record (source "cgroup"); the cgroup does not say which process."""
        watched = self._containers.get(container_id)
        if watched is None or count <= 0:
            return None
        syscall, verdict = LIMIT_VERDICTS[kind]
        rec = record(
            watched.context,
            source="cgroup",
            pid=0,
            comm="",
            syscall=syscall,
            verdict=verdict,
            rule=limit_rule(watched.profile, kind, limit),
            count=count,
        )
        watched.file.write(watched.limit.admit(rec))
        return rec

    def flush(self) -> None:
        """Write the summaries of finished rate-limit windows (called now and then), and
        the Landlock denials whose event never got its SYSCALL record."""
        self.landlock.expire()
        for watched in self._containers.values():
            watched.file.write(
                watched.limit.flush({**watched.context, "source": "", "syscall": ""})
            )

    def _by_exec_pid(self, pid: int | None, session: int | None) -> Watched | None:
        """The container of an exec'd process add_session could not ask (it was gone):
        its first record's session becomes the container's."""
        entry = self._exec_pids.get(pid)
        if entry is None or session in (None, AUDIT_SID_UNSET):
            return None
        del self._exec_pids[pid]
        if (
            self.clock() - entry[0] >= PENDING_SECONDS
            or entry[1].container_id not in self._containers
        ):
            return None
        entry[1].sessions.add(session)
        self._by_session[session] = entry[1]
        return entry[1]

    def _keep_pending(self, session: int | None, text: str) -> None:
        now = self.clock()
        while self._pending and now - self._pending[0][0] >= PENDING_SECONDS:
            self._pending.popleft()
        if session is None or session == AUDIT_SID_UNSET:
            return  # no session to be learnt later: nothing will claim it
        if len(self._pending) < PENDING_MAX:
            self._pending.append((now, session, text))

    def _owner(self, pid: int, session: int | None) -> Watched | None:
        watched = self._by_session.get(session)
        if watched is not None:
            return watched
        if session not in (None, AUDIT_SID_UNSET) and all(
            w.session is not None for w in self._containers.values()
        ):
            # Another session (another container's, a login's, an exec not yet added):
            # none of ours is without one, so the pid namespace is not asked (a stat per
            # record of the node's other floods).
            return None
        namespace = pid_namespace_of(pid)
        if namespace is None:
            return None  # exited, outside every session of ours: cannot be told
        for watched in self._containers.values():
            if watched.pid_namespace == namespace:
                return watched
        return None


# --- Landlock's records (audit must be enabled) ---

LANDLOCK_EVENT_KINDS = frozenset((AUDIT_LANDLOCK_ACCESS, AUDIT_LANDLOCK_DOMAIN, AUDIT_SYSCALL))
LANDLOCK_EVENT_KINDS |= {AUDIT_EOE}
# An access record waits this long for its event's SYSCALL record: a task without an
# audit context (started before audit was first enabled) makes none.
LANDLOCK_EVENT_SECONDS = 0.5
LANDLOCK_OPEN_MAX = 512
_SERIAL = re.compile(r"audit\(\d+\.\d+:(\d+)\)")
# What the access record names besides the rights (net.*: the port; scope.*: the target).
_LANDLOCK_ARGS = ("path", "dev", "ino", "name", "daddr", "dest", "saddr", "src", "opid", "ocomm")
# The rights a profile's `writable` paths grant (landlock.WRITE), as the kernel names them.
_WRITE_RIGHTS = {"fs.write_file", "fs.remove_dir", "fs.remove_file", "fs.make_dir"}
_WRITE_RIGHTS |= {"fs.make_reg", "fs.make_sock", "fs.make_fifo", "fs.make_sym", "fs.refer"}
_WRITE_RIGHTS |= {"fs.truncate"}


def landlock_rule(profile, blockers: str, args: dict) -> str:
    """Which part of the profile's Landlock rules would have to allow the access (the
    kernel names the rights refused, not the rule)."""
    rights = set(blockers.split(","))
    path = args.get("path", "")
    name = f"profile {profile.name}"
    if rights & _WRITE_RIGHTS:
        where = ", ".join(profile.writable) or "none"
        volumes = " or a writable volume" if profile.writable_volumes else ""
        return f"{name}: {path or 'the path'} is not beneath its writable paths ({where}){volumes}"
    if rights & {"fs.make_char", "fs.make_block"}:
        return f"{name}: device nodes are never created"
    if "fs.ioctl_dev" in rights:
        return f"{name}: {path} is not in its device_ioctl ({', '.join(profile.device_ioctl)})"
    if rights & {"fs.execute", "fs.read_file", "fs.read_dir"}:
        return f"{name}: {path} is not readable (in /dev only its devices are)"
    if "net.bind_tcp" in rights:
        return f"{name}: tcp_bind does not list port {args.get('src', '?')}"
    if "net.connect_tcp" in rights:
        return f"{name}: tcp_connect does not list port {args.get('dest', '?')}"
    if any(r.startswith("scope.") for r in rights):
        return f"{name}: {blockers} outside the container (Landlock scope)"
    return f"{name}: Landlock refused {blockers}"


def _landlock_verdict(blockers: str, syscall_fields: dict) -> str:
    """The errno the call returned (its SYSCALL record); without one, Landlock's usual."""
    if syscall_fields.get("success") == "no":
        try:
            return errno.errorcode.get(-int(syscall_fields.get("exit", "")), "")
        except ValueError:
            pass
    return "EPERM" if blockers.startswith(("scope.", "ptrace")) else "EACCES"


class LandlockEvents:
    """Landlock denials of a KernelWatcher's containers, from the kernel's events.

    One denial is an event of several records sharing a serial: LANDLOCK_ACCESS (domain,
    rights, path), LANDLOCK_DOMAIN "allocated" at the domain's first denial (the pid
    that enforced it, so the domain's owner from then on), then -- where the task has an
    audit context -- SYSCALL (pid, ses, comm, syscall, exit) and EOE. The access record
    alone says neither who nor which container: the event's session says (as for
    seccomp), else the domain's creator (one of a container's pids).
    """

    def __init__(self, watcher: "KernelWatcher"):
        self.watcher = watcher
        self._open: dict[int, dict] = {}  # serial -> the event so far
        self._domains: dict[str, Watched] = {}  # domain id (hex) -> its container
        self._pending: collections.deque = collections.deque()  # (arrived, session, pid, event)
        self.events = 0  # Landlock denials seen (ours or not): `zviz node check`'s probe

    def handle(self, kind: int, text: str) -> dict | None:
        if kind == AUDIT_LANDLOCK_ACCESS:
            self.events += 1
            if len(self._open) >= LANDLOCK_OPEN_MAX:
                self.expire(everything=True)
            when, fields = parse_fields(text)
            arrived = self.watcher.clock()
            self._open[serial_of(text)] = {"when": when, "arrived": arrived, "access": fields}
            return None
        if kind == AUDIT_LANDLOCK_DOMAIN:
            _, fields = parse_fields(text)
            domain = fields.get("domain", "")
            if fields.get("status") == "allocated":
                owner = self._creator(_int(fields.get("pid")))
                if owner is not None:
                    self._domains[domain] = owner
            elif fields.get("status") == "deallocated":
                self._domains.pop(domain, None)
            return None
        if not self._open:
            return None  # SYSCALL and EOE of every audited event of the node: not ours
        event = self._open.pop(serial_of(text), None)
        if event is None:
            return None
        if kind == AUDIT_SYSCALL:
            event["syscall"] = parse_fields(text)[1]
        return self._finish(event)

    def expire(self, everything: bool = False) -> list[dict]:
        """Finish the events that waited long enough for a SYSCALL record."""
        now = self.watcher.clock()
        done = [
            serial
            for serial, event in self._open.items()
            if everything or now - event["arrived"] >= LANDLOCK_EVENT_SECONDS
        ]
        recorded = [self._finish(self._open.pop(serial)) for serial in done]
        while self._pending and now - self._pending[0][0] >= PENDING_SECONDS:
            self._pending.popleft()
        return [r for r in recorded if r]

    def pending_session(self, pid: int) -> int | None:
        return next((s for _, s, p, _ in self._pending if p == pid), None)

    def claim(self, session: int) -> list[dict]:
        """The waiting denials of a session the watcher has just learnt."""
        waiting = [event for _, s, _, event in self._pending if s == session]
        self._pending = collections.deque(p for p in self._pending if p[1] != session)
        return [r for r in (self._finish(event) for event in waiting) if r]

    def forget(self, watched: Watched) -> None:
        for domain in [d for d, w in self._domains.items() if w is watched]:
            del self._domains[domain]

    def _creator(self, pid: int | None) -> Watched | None:
        if pid is None:
            return None
        for watched in self.watcher._containers.values():
            if pid in watched.pids:
                return watched
        return self.watcher._owner(pid, session_of(pid))

    def _finish(self, event: dict) -> dict | None:
        access, call = event["access"], event.get("syscall", {})
        session, pid = _int(call.get("ses")), _int(call.get("pid")) or 0
        watched = self.watcher._by_session.get(session) if session is not None else None
        if watched is None:
            watched = self.watcher._by_exec_pid(pid, session)
        if watched is None:
            watched = self._domains.get(access.get("domain", ""))
        if watched is None:
            if session not in (None, AUDIT_SID_UNSET) and len(self._pending) < PENDING_MAX:
                self._pending.append((self.watcher.clock(), session, pid, event))
            self.watcher.ignored += 1
            return None
        blockers = access.get("blockers", "")
        args = {key: access[key] for key in _LANDLOCK_ARGS if key in access}
        syscall = ""
        if "syscall" in call:
            try:
                syscall = syscall_name(int(call["syscall"]), int(call.get("arch", "0"), 16))
            except ValueError:
                pass
        rec = record(
            watched.context,
            source="landlock",
            pid=pid,
            comm=call.get("comm", ""),
            syscall=syscall,
            verdict=_landlock_verdict(blockers, call),
            rule=landlock_rule(watched.profile, blockers, args),
            args=args,
            when=event["when"] or None,
            exe=call.get("exe", ""),
            access=blockers,
            domain=access.get("domain", ""),
        )
        watched.file.write(watched.limit.admit(rec))
        return rec


def serial_of(text: str) -> int:
    """The serial of an audit record (shared by the records of one event); -1 if none."""
    match = _SERIAL.match(text)
    return int(match.group(1)) if match else -1


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _number_after(text: str, key: str) -> int | None:
    start = text.find(key)
    if start < 0:
        return None
    start += len(key)
    end = start
    while end < len(text) and text[end].isdigit():
        end += 1
    return int(text[start:end]) if end > start else None


# --- `zviz audit` ---

TABLE_COLUMNS = ("time", "container_id", "pod", "source", "pid", "comm", "syscall", "args")
TABLE_COLUMNS += ("verdict", "rule")


def _files_under(root: str, container_id: str | None) -> list[tuple[str, str]]:
    if container_id is not None:
        return [(container_id, path_in(os.path.join(root, container_id)))]
    try:
        names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except FileNotFoundError:
        return []
    return [(name, path_in(os.path.join(root, name))) for name in names]


def format_record(rec: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rec, separators=(",", ":"))
    pod = "/".join(p for p in (rec.get("pod_namespace"), rec.get("pod_name")) if p) or "-"
    args = " ".join(f"{k}={v}" for k, v in (rec.get("args") or {}).items())
    if rec.get("verdict") == "suppressed":
        args = " ".join(f"{k}:{v}" for k, v in (rec.get("counts") or {}).items())
    cells = {**rec, "pod": pod, "args": args or "-"}
    return "  ".join(_printable(cells.get(column, "") or "-") for column in TABLE_COLUMNS)


def _printable(value) -> str:
    """A cell for a terminal: the container chooses its command name and paths, so control
    characters (a newline forging a row, escape sequences) are shown escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def audit(
    root: str,
    container_id: str | None,
    *,
    follow: bool,
    since: float | None,
    fmt: str,
    out,
    poll: float = 0.25,
    stop=None,
) -> int:
    """`zviz audit`: the records of one container or all under `root`, oldest first."""
    if container_id is not None and not os.path.isdir(os.path.join(root, container_id)):
        from runtime import errors

        raise errors.NotFound(f"container {container_id!r} does not exist")
    if fmt == "table":
        print("  ".join(c.upper() for c in TABLE_COLUMNS), file=out, flush=True)
    offsets: dict[str, int] = {}
    while True:
        batch = []
        for _, path in _files_under(root, container_id):
            records, offsets[path] = read_lines(path, offsets.get(path, 0))
            batch += [r for r in records if since is None or record_time(r) >= since]
        batch.sort(key=record_time)
        for rec in batch:
            print(format_record(rec, fmt), file=out, flush=True)
        if not follow or (stop is not None and stop()):
            return 0
        if container_id is not None and not os.path.isdir(os.path.join(root, container_id)):
            return 0  # deleted: nothing more will come
        time.sleep(poll)


# --- `zviz metrics` (Prometheus text format) ---

_METRIC_LABELS = ("container_id", "pod_namespace", "pod_name", "profile", "source", "syscall")
_METRIC_LABELS += ("verdict",)


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics(root: str) -> str:
    """Counters of every container's denials under `root`, counted from its records (a
    rate-limit summary adds what it dropped), in Prometheus' text format."""
    seen: dict[tuple, int] = {}
    dropped: dict[tuple, int] = {}
    for _, path in _files_under(root, None):
        records, _ = read_lines(path)
        for rec in records:
            if rec.get("source") != "rate-limit":
                key = tuple(str(rec.get(label, "")) for label in _METRIC_LABELS)
                # A cgroup record counts every hit since the last one (`count`).
                seen[key] = seen.get(key, 0) + int(rec.get("count") or 1)
                continue
            for what, count in (rec.get("counts") or {}).items():
                source, syscall, verdict = (what.split(" ") + ["", "", ""])[:3]
                labels = {**rec, "source": source, "syscall": syscall, "verdict": verdict}
                key = tuple(str(labels.get(label, "")) for label in _METRIC_LABELS)
                seen[key] = seen.get(key, 0) + int(count)
                dropped[key] = dropped.get(key, 0) + int(count)
    lines = []
    for name, help_text, values in (
        ("zviz_denials_total", "Denied calls, recorded or counted by the rate limit.", seen),
        ("zviz_denial_records_dropped_total", "Denied calls the rate limit only counted.", dropped),
    ):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        for key, value in sorted(values.items()):
            labels = ",".join(
                f'{k}="{_label(v)}"' for k, v in zip(_METRIC_LABELS, key, strict=True)
            )
            lines.append(f"{name}{{{labels}}} {value}")
    return "\n".join(lines) + "\n"
