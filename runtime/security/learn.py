"""Profile learning, the pure part: what a workload did under audit mode -> the smallest
profile that extends the base and lets it run (`zviz profile learn`, docs/profiles.md
"Learning a profile"; the run itself is runtime/security/learn_run.py).

Three kinds of observations go in, each already narrowed to one container:
- denial records (runtime/denials.py): seccomp calls the base refused and audit mode let
  through (verdict "audit"), the broker's audited connects, sends and binds (with their
  address), and what stayed refused (the escape class), which is never learned;
- the paths the workload wrote, as a before/after comparison of its rootfs (`Snapshot`);
- nothing else: capabilities, resource limits, devices and socket families leave no
  record that says what was asked for, so they are reported as not learnable.

A learned profile only ever adds what audit mode allowed, within the base's ceiling: the
escape class, argument-filtered calls and the base's `egress_deny` are never learned.
"""

import ipaddress
import os
import stat
from dataclasses import dataclass, field

from runtime.security.profiles import ESCAPE_CLASS, NO_NETWORK_MEDIATED

# Calls the filter decides by argument (socket family, clone flags, ioctl request,
# personality): `allow` does not change them, and the kernel's record has no arguments
# to learn the argument from.
ARGUMENT_FILTERED = ("clone", "clone3", "socket", "ioctl", "personality")
# Broker calls whose audited record means "send to this destination" (egress), and the
# one that means "listen on this local address" (bind).
EGRESS_CALLS = ("connect", "sendto", "sendmsg", "sendmmsg")


@dataclass
class Learned:
    """What the records and the rootfs say the workload needs beyond the base."""

    syscalls: set[str] = field(default_factory=set)
    writable: set[str] = field(default_factory=set)
    # (address, port) reached through connect/send, and bound; port 0: any.
    egress: set[tuple[str, int]] = field(default_factory=set)
    binds: set[tuple[str, int]] = field(default_factory=set)
    # Addresses the container got from DNS answers, by the name asked (learn_dns.py).
    names: dict[str, str] = field(default_factory=dict)
    # The nameservers the container asked (address, port): never written as a name.
    dns_servers: set[tuple[str, int]] = field(default_factory=set)
    # Seen but not learnable, with why (shown as comments in the profile).
    not_learned: dict[str, str] = field(default_factory=dict)


def from_records(records: list[dict], base) -> Learned:
    """The syscalls and endpoints of one container's denial records (its audit-mode run)."""
    learned = Learned()
    for rec in records:
        source = rec.get("source")
        if source == "seccomp":
            _learn_syscall(learned, base, rec.get("syscall", ""), rec.get("verdict", ""))
        elif source == "rate-limit":
            # A summary counted what it dropped by "source syscall verdict": the syscall
            # names survive it, the broker's addresses do not.
            for key in rec.get("counts") or {}:
                parts = key.split(" ")
                if len(parts) == 3 and parts[0] == "seccomp":
                    _learn_syscall(learned, base, parts[1], parts[2])
                elif len(parts) == 3 and parts[0] == "broker" and parts[2] == "audit":
                    learned.not_learned[f"{parts[1]} (more endpoints)"] = (
                        "the record rate limit dropped their addresses: learn again with "
                        "fewer distinct endpoints per 10 s"
                    )
        elif source == "broker":
            _learn_endpoint(learned, rec)
    return learned


def _learn_syscall(learned: Learned, base, name: str, verdict: str) -> None:
    if not name:
        return
    if name in ESCAPE_CLASS:
        learned.not_learned[name] = "escape class: refused in every mode, never learned"
    elif verdict != "audit":
        learned.not_learned[name] = f"refused even in audit mode ({verdict})"
    elif name in ARGUMENT_FILTERED:
        learned.not_learned[name] = (
            "decided by its arguments (socket family, clone flags, ioctl request, "
            "personality), which the kernel's record does not carry: edit by hand"
        )
    elif name.startswith("syscall_"):
        learned.not_learned[name] = "a foreign architecture's call: never allowed"
    elif name in base.allow and name not in base.deny:
        learned.not_learned[name] = "allowed by the base, refused by an argument rule"
    else:
        learned.syscalls.add(name)


def _learn_endpoint(learned: Learned, rec: dict) -> None:
    syscall = rec.get("syscall", "")
    args = rec.get("args") or {}
    if rec.get("verdict") != "audit":
        # Refused for good (egress_deny, a socket not of the container's namespace, a
        # malformed call): the workload failed there while learning too.
        what = f"{syscall} {args.get('address', '?')}"
        learned.not_learned[what] = f"refused even in audit mode: {rec.get('rule', '')}"
        return
    endpoint = parse_address(args.get("address", ""))
    if endpoint is None:
        learned.not_learned[f"{syscall} {args.get('address', '?')}"] = (
            "not an IP destination (a unix socket path): not a network rule"
        )
        return
    if syscall in EGRESS_CALLS:
        learned.egress.add(endpoint)
    elif syscall == "bind":
        learned.binds.add(endpoint)


def parse_address(text: str) -> tuple[str, int] | None:
    """ "1.2.3.4:80" or "[::1]:80" (the broker's records) as (address, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return str(address), int(port)


# --- what was written: a before/after comparison of the rootfs ---

# A file's data or metadata changing sets its ctime, which no call can set back
# (utimensat sets mtime and atime only: `tar -p` restoring them hides nothing); a
# replaced file has another inode. A chmod or chown alone changes ctime too, so it
# counts as a write of the file's directory (learning errs towards running). A
# directory counts as written when its entries change, not by its own ctime: an
# overlay's copy-up (a write beneath it) changes the ctime of every directory above.
Snapshot = dict[str, tuple[int, int, bool]]  # container path -> (inode, ctime ns, is dir)


def snapshot(rootfs: str, skip: tuple[str, ...] = ()) -> Snapshot:
    """Every entry of the host directory ROOTFS by container path (no symlink followed,
    nothing beneath SKIP: container paths whose contents are not the rootfs's)."""
    entries: Snapshot = {}
    st = os.lstat(rootfs)
    entries["/"] = (st.st_ino, st.st_ctime_ns, True)
    stack = [("/", rootfs)]
    while stack:
        container_dir, host_dir = stack.pop()
        try:
            listing = os.scandir(host_dir)
        except OSError:
            continue
        with listing:
            for entry in listing:
                path = os.path.join(container_dir, entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                entries[path] = (st.st_ino, st.st_ctime_ns, is_dir)
                if is_dir and path not in skip:
                    stack.append((path, entry.path))
    return entries


def _entries_by_dir(snap: Snapshot) -> dict[str, set[str]]:
    by_dir: dict[str, set[str]] = {}
    for path in snap:
        if path != "/":
            by_dir.setdefault(os.path.dirname(path), set()).add(path)
    return by_dir


def written_dirs(before: Snapshot, after: Snapshot) -> set[str]:
    """The directories that existed before and whose contents the workload changed: a
    directory with entries made, removed or renamed, the directory of a changed file.
    Entries made during the run are beneath one of these (making one changes its
    directory's entries), and a Landlock rule needs a directory that exists in the image."""
    entries_before, entries_after = _entries_by_dir(before), _entries_by_dir(after)
    dirs = set()
    for path, (inode, ctime, is_dir) in before.items():
        now = after.get(path)
        if is_dir:
            if now is None or now[0] != inode or not now[2]:
                dirs.add(os.path.dirname(path))  # removed or replaced: its parent changed
            elif entries_before.get(path, set()) != entries_after.get(path, set()):
                dirs.add(path)
        elif now is None or now[0] != inode or now[1] != ctime:
            dirs.add(os.path.dirname(path))
    return dirs


def overlay_written(before: Snapshot, upper_before: Snapshot, upper_after: Snapshot) -> set[str]:
    """written_dirs for a rootfs that is an overlay, from its upper directory: the runtime
    mounts an overlay of its own over the same layers (runtime/idmap.py), so the caller's
    mount of it does not see the run's writes. BEFORE is the merged tree before the run.
    What the run put into the upper layer is a copied-up or new entry (a whiteout for a
    removed one); a directory of the image copied up only because something beneath it
    was written is not itself written. Each entry counts for the nearest directory above
    it that existed before."""
    changed = [
        path
        for path, now in upper_after.items()
        if path != "/" and upper_before.get(path, (None, None))[:2] != now[:2]
    ]
    changed += [path for path in upper_before if path not in upper_after]  # made, then removed
    dirs = set()
    for path in changed:
        now = upper_after.get(path)
        if now is not None and now[2] and before.get(path, (0, 0, False))[2]:
            continue  # an image directory copied up: what was written is beneath it
        target = os.path.dirname(path)
        while target not in before and target != "/":
            target = os.path.dirname(target)
        dirs.add(target)
    return dirs


def beneath(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top.rstrip("/") + "/")


def smallest_dirs(dirs: set[str], already: tuple[str, ...] = ()) -> list[str]:
    """DIRS without those beneath another of them or beneath a path ALREADY writable."""
    kept: list[str] = []
    for path in sorted(dirs, key=lambda p: (p.count("/") if p != "/" else 0, p)):
        if any(beneath(path, top) for top in already) or any(beneath(path, k) for k in kept):
            continue
        kept.append(path)
    return sorted(kept)


# --- the learned profile, as TOML ---


@dataclass
class Plan:
    """The learned profile's keys by table (written by `to_toml`) and its comments."""

    tables: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan(learned: Learned, base, base_ref: str, name: str) -> Plan:
    """The smallest extension of BASE that grants what LEARNED saw."""
    out = Plan()
    out.tables["profile"] = {
        "name": name,
        "extends": base_ref,
        "description": f"{base.name} and what a learning run of the workload needed",
    }
    for path in learned.writable:
        if not path.isprintable() or not _utf8(path):
            learned.not_learned[f"a directory named {path!r}"] = (
                "a name with control characters or not UTF-8: write it by hand"
            )
    writable = smallest_dirs(
        {p for p in learned.writable if p.isprintable() and _utf8(p)}, base.writable
    )
    if writable:
        out.tables["landlock"] = {"writable_add": writable}
    syscalls = sorted(learned.syscalls)
    seccomp: dict = {}
    if syscalls:
        seccomp["allow_add"] = syscalls
        denied = [s for s in syscalls if s in base.deny]
        if denied:
            seccomp["deny_remove"] = denied
        out.tables["seccomp"] = seccomp
    network = _network(learned, base)
    if network:
        out.tables["network"] = network
    for what, why in sorted(learned.not_learned.items()):
        out.notes.append(f"{what}: {why}")
    return out


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a name os.scandir kept as surrogate escapes
        return False
    return True


def _network(learned: Learned, base) -> dict:
    reached = sorted(
        (a, p) for a, p in learned.egress if not any(r.matches(a, p) for r in base.egress_deny)
    )
    # An address the workload got from a DNS answer is written as that name: the broker
    # resolves it when enforcing (egress_hosts never reach loopback or link-local).
    hosts = sorted(
        {
            f"{learned.names[a]}:{p}"
            for a, p in reached
            if a in learned.names
            and p
            and (a, p) not in learned.dns_servers
            and not _loopback_or_link_local(a)
        }
    )
    egress = [(a, p) for a, p in reached if f"{learned.names.get(a)}:{p}" not in hosts]
    binds = sorted(learned.binds)
    if not reached and not binds:
        return {}
    network: dict = {}
    if hosts:
        network["egress_hosts_add"] = hosts
    if egress:
        network["egress_add"] = _rules(egress)
    if reached:
        if base.network == "none":
            # Egress rules need the broker to decide them: the workload's connects and
            # sends go through it, and everything else stays refused.
            network["mode"] = "namespace"
            network["mediate_add"] = [c for c in NO_NETWORK_MEDIATED if c not in base.mediate]
        if base.tcp_connect is not None:
            ports = sorted({p for _, p in reached if p} - set(base.tcp_connect))
            if ports:
                network["tcp_connect_add"] = ports
    if binds:
        network["bind_add"] = _rules(binds)
        if base.tcp_bind is not None:
            ports = sorted({p for _, p in binds if p} - set(base.tcp_bind))
            if ports:
                network["tcp_bind_add"] = ports
    return network


def _loopback_or_link_local(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_link_local


def _rules(endpoints: list[tuple[str, int]]) -> list[dict]:
    """One rule per address (a /32 or /128), with the ports seen at it (0: any port)."""
    by_address: dict[str, set[int]] = {}
    for address, port in endpoints:
        by_address.setdefault(address, set()).add(port)
    rules = []
    for address, ports in sorted(by_address.items()):
        prefix = 32 if ipaddress.ip_address(address).version == 4 else 128
        rule: dict = {"cidr": f"{address}/{prefix}"}
        if 0 not in ports:
            rule["ports"] = sorted(ports)
        rules.append(rule)
    return rules


def _comment(text: str) -> str:
    """A comment line: the notes quote what the container chose (a unix socket path, a
    command name), so a newline must not end the comment and start a key of its own."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def to_toml(learned_plan: Plan, header: list[str]) -> str:
    lines = [f"# {_comment(line)}" if line else "#" for line in header]
    for table, keys in learned_plan.tables.items():
        lines += ["", f"[{table}]"]
        lines += [f"{key} = {_value(value)}" for key, value in keys.items()]
    if learned_plan.notes:
        lines += ["", "# Seen during learning, not learned (see docs/profiles.md):"]
        lines += [f"#   {_comment(note)}" for note in learned_plan.notes]
    return "\n".join(lines) + "\n"


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    return "[" + ", ".join(_value(v) for v in value) + "]"


def _string(text: str) -> str:
    """A TOML basic string: the paths come from the workload's rootfs, any byte may be
    in a name, so quotes, backslashes and control characters are escaped."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'
