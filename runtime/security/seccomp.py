"""seccomp: compile a profile (and config.json's `linux.seccomp`) to BPF once, load it fast.

Compiling needs libseccomp (pyseccomp, ~17 ms to import plus the compile): it happens
in the parent at create time, only on a cache miss. The BPF is cached on disk under
CACHE_DIR keyed by sha256(profile content, verbose, arch, libseccomp version, this
compiler's version). PID 1 then only loads bytes with one seccomp(2) call via ctypes.

Filters stack, never merge: config.json's filter (if any) is loaded first, the
profile's last; the kernel applies the strictest answer of the two. The profile's
filter is the only one with a user-notification listener (the broker's).
"""

import ctypes
import errno

try:  # CPython's own SHA-256: hashlib would load OpenSSL (~2 ms) on the start path
    from _sha256 import sha256
except ImportError:  # pragma: no cover - other Pythons
    from hashlib import sha256
import json
import os
from dataclasses import dataclass, replace

from runtime import linux
from runtime.errors import InvalidArgument, NotImplementedByZviz, SecurityLayerError
from runtime.private_dir import makedirs_private
from runtime.security import syscalls

# ZVIZ_SECCOMP_CACHE moves it (the tests use an empty directory of their own); a
# directory anyone but this user can write is not used (see _open_cache_dir).
CACHE_DIR = os.environ.get("ZVIZ_SECCOMP_CACHE", "/run/zviz/seccomp-cache")
# /run is memory: every distinct profile content (users' own, each --verbose variant,
# config.json filters) adds ~4 KiB. Past this many entries the oldest half goes; a
# dropped entry costs one recompile (2-14 ms).
CACHE_MAX_ENTRIES = 256
# Bump when the compiler below changes what it emits for the same profile.
COMPILER_VERSION = "4"

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
SECCOMP_FILTER_FLAG_LOG = 1 << 1
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1 << 2
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

# All namespace-creating clone flags: clone() with any of them is refused.
CLONE_NAMESPACE_FLAGS = (
    linux.CLONE_NEWNS
    | linux.CLONE_NEWCGROUP
    | linux.CLONE_NEWUTS
    | linux.CLONE_NEWIPC
    | linux.CLONE_NEWUSER
    | linux.CLONE_NEWPID
    | linux.CLONE_NEWNET
    | linux.CLONE_NEWTIME
)
TIOCSTI = 0x5412
SOCK_TYPE_MASK = 0xF
SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 1, 2, 5
# The inet protocols a container may open: the default (0), TCP, UDP, MPTCP and ping
# sockets. Each reaches a destination only through connect/sendto/sendmsg, which the
# broker decides where a profile mediates. Others have their own ways out that no
# mediated syscall sees (SCTP connects and binds through setsockopt SCTP_SOCKOPT_CONNECTX
# / BINDX and picks destinations with SCTP_DSTADDRV4 control messages), or are rarely
# needed kernel code (DCCP, UDP-Lite, L2TP).
INET_PROTOCOLS = (0, 1, 6, 17, 58, 262)  # IPPROTO_ IP, ICMP, TCP, UDP, ICMPV6, MPTCP
# personality(2) values that change nothing dangerous (docker's list): PER_LINUX,
# PER_LINUX32, UNAME26 variants, and the query 0xffffffff.
SAFE_PERSONALITIES = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)

# Handled specially below (argument filters), never as a plain allow.
_SPECIAL = ("clone", "clone3", "socket", "ioctl", "personality")


@dataclass(frozen=True, slots=True)
class Program:
    """A compiled filter: raw `struct sock_filter[]` bytes and how to load it."""

    name: str  # "profile ci-runner" or "config.json"
    bpf: bytes
    flags: int = 0
    listener: bool = False  # load with SECCOMP_FILTER_FLAG_NEW_LISTENER


def _arch_tag() -> str:
    return os.uname().machine


def _cache_key(kind: str, content: str) -> str:
    h = sha256()
    for part in (kind, content, _arch_tag(), syscalls.libseccomp_version(), COMPILER_VERSION):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _open_cache_dir() -> int | None:
    """An fd on CACHE_DIR if no one but us can write it, else None (no cache).

    Whoever can plant a .bpf file there chooses the filter the next container loads, and
    ZVIZ_SECCOMP_CACHE may name any path (a /tmp directory someone else made). The fd,
    not the path, is used afterwards: a directory swapped in after the check is not read.
    """
    try:
        fd = os.open(CACHE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    if not _written_by_us_only(fd):
        os.close(fd)
        return None
    return fd


def _written_by_us_only(fd: int) -> bool:
    """Whether `fd`'s file is ours and no one else may write it."""
    st = os.fstat(fd)
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _cached(key: str) -> bytes | None:
    dirfd = _open_cache_dir()
    if dirfd is None:
        return None
    try:
        fd = os.open(key + ".bpf", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    finally:
        os.close(dirfd)
    with os.fdopen(fd, "rb") as f:
        if not _written_by_us_only(f.fileno()):
            return None  # not written by _store: never load it
        data = f.read()
    # A torn or foreign file is never loaded: BPF is a whole number of 8-byte instructions.
    return data if data and len(data) % 8 == 0 else None


def _store(key: str, data: bytes) -> None:
    try:
        makedirs_private(CACHE_DIR)
    except OSError:
        return  # a cache we cannot write only costs the next compile
    dirfd = _open_cache_dir()
    if dirfd is None:
        return  # nor one others can write: compile every time instead
    try:
        tmp = f".{key}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, key + ".bpf", src_dir_fd=dirfd, dst_dir_fd=dirfd)
        _prune(dirfd)
    except OSError:
        return
    finally:
        os.close(dirfd)


def _prune(dirfd: int) -> None:
    entries = []
    try:
        for entry in os.scandir(dirfd):
            if entry.name.endswith(".bpf"):
                entries.append((entry.stat().st_mtime_ns, entry.name))
    except OSError:
        return  # a concurrent prune removed one: the next store prunes again
    if len(entries) <= CACHE_MAX_ENTRIES:
        return
    for _, name in sorted(entries)[: len(entries) - CACHE_MAX_ENTRIES // 2]:
        try:
            os.unlink(name, dir_fd=dirfd)
        except OSError:
            pass


def profile_cache_key(profile, verbose: bool = False) -> str:
    """The cache file's name (without .bpf) of the profile's compiled filter."""
    # The mode is not always the file's (the operator's or an annotation's): keyed apart.
    return _cache_key("profile", f"{profile.digest}:{int(verbose)}:{profile.mode}")


def profile_program(profile, verbose: bool = False) -> Program:
    """The profile's filter, from the cache or compiled now."""
    key = profile_cache_key(profile, verbose)
    bpf = _cached(key)
    if bpf is None:
        bpf = _compile_profile(profile, verbose)
        _store(key, bpf)
    listener = verbose or bool(profile.mediate)
    flags = SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV if listener else 0
    if listener:
        flags |= SECCOMP_FILTER_FLAG_NEW_LISTENER
    if kernel_logs_denials(listener):
        flags |= SECCOMP_FILTER_FLAG_LOG
    return Program(f"profile {profile.name}", bpf, flags, listener)


def allows_plainly(profile, oci_seccomp: dict | None, name: str) -> bool:
    """Whether the call NAME (no argument rules) passes every filter PID 1 loads (the
    profile's, then config.json's) as allowed: neither refused nor logged nor mediated,
    so it leaves no denial record. Mirrors _compile_profile and _compile_oci."""
    if not syscalls.exists_here(name) or name in _SPECIAL:
        return False
    if name not in profile.allow or name in profile.deny or name in profile.mediate:
        return False
    if not oci_seccomp:
        return True
    rules = [r for r in oci_seccomp.get("syscalls") or () if name in r.get("names", ())]
    if not rules:
        return oci_seccomp.get("defaultAction") == "SCMP_ACT_ALLOW"
    return all(r.get("action") == "SCMP_ACT_ALLOW" and not r.get("args") for r in rules)


ACTIONS_LOGGED = "/proc/sys/kernel/seccomp/actions_logged"


def kernel_logs_denials(listener: bool) -> bool:
    """Whether to load the profile's filter with SECCOMP_FILTER_FLAG_LOG (denial records).

    The flag costs allowed calls nothing: the kernel logs only the actions the node's
    actions_logged lists, and only for calls the filter did not allow. But a filter with
    a listener would also log every mediated call (a user_notif action) while the node
    logs user_notif (the kernel's default): one audit record per connect or send of a
    busy server, read and dropped by every shim. Such filters get the flag only on a
    node that does not log user_notif; their refused connects are the broker's records.
    """
    from runtime import denials

    if not denials.enabled():
        return False
    try:
        with open(ACTIONS_LOGGED) as f:
            logged = f.read().split()
    except OSError:
        return False
    return "errno" in logged and not (listener and "user_notif" in logged)


def oci_program(seccomp: dict) -> Program:
    """config.json's `linux.seccomp`, compiled as its own filter to stack on the profile's."""
    content = json.dumps(seccomp, sort_keys=True)
    flags = 0
    for flag in seccomp.get("flags") or ():
        flags |= {
            "SECCOMP_FILTER_FLAG_TSYNC": SECCOMP_FILTER_FLAG_TSYNC,
            "SECCOMP_FILTER_FLAG_LOG": SECCOMP_FILTER_FLAG_LOG,
            # Speculative-store-bypass mitigation stays on: a workload may not turn it off.
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 0,
            "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": 0,
        }[flag]
    key = _cache_key("oci", content)
    bpf = _cached(key)
    if bpf is None:
        bpf = _compile_oci(seccomp)
        _store(key, bpf)
    return Program("config.json linux.seccomp", bpf, flags, False)


def _export(filt) -> bytes:
    r, w = os.pipe()
    try:
        # export_bpf writes to an fd; a pipe avoids a temporary file.
        import threading

        chunks = []
        reader = threading.Thread(target=lambda: chunks.append(_read_all(r)))
        reader.start()
        try:
            filt.export_bpf(_FdFile(w))
        finally:
            os.close(w)
            w = -1
        reader.join()
        return b"".join(chunks)
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def _read_all(fd: int) -> bytes:
    parts = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


class _FdFile:
    def __init__(self, fd: int):
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def _compile_profile(profile, verbose: bool) -> bytes:
    import pyseccomp as sc

    from runtime.security.profiles import ESCAPE_CLASS

    eperm = sc.ERRNO(errno.EPERM)
    denied = sc.NOTIFY if verbose else eperm
    # Audit mode (docs/denials.md): what would be refused is logged and allowed
    # (SECCOMP_RET_LOG: the kernel's audit record, as for a denial); the escape class,
    # namespace-making clone flags and TIOCSTI keep `denied` (rules below).
    audit = profile.mode == "audit"
    escape = set(ESCAPE_CLASS)
    default = {
        "EPERM": denied,
        "ENOSYS": sc.NOTIFY if verbose else sc.ERRNO(errno.ENOSYS),
        "kill": sc.KILL_PROCESS,
    }[profile.default_action]
    if audit:
        default = sc.LOG
    filt = sc.SyscallFilter(default)
    _add_rule = filt.add_rule

    def add_rule(action, name, *args):
        if action != default:  # libseccomp refuses a rule that repeats the default action
            _add_rule(action, name, *args)

    filt.add_rule = add_rule
    # i386 (int 0x80) and x32 calls on x86_64 never match the native filter: kill them.
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    filt.set_attr(sc.Attr.CTL_NNP, 0)  # apply() sets no_new_privs itself, in its order
    # Binary-tree dispatch: every allowed syscall is a handful of compares, like runc's.
    filt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)

    mediated = set(profile.mediate)
    deny = set(profile.deny)
    for name in profile.allow:
        if name in _SPECIAL or name in deny or not syscalls.exists_here(name):
            continue
        if name in mediated:
            if name == "sendto":
                # sendto without an address goes where the socket is already connected
                # (a connect the broker decided): only addressed sends are mediated.
                filt.add_rule(sc.ALLOW, name, sc.Arg(4, sc.EQ, 0))
                filt.add_rule(sc.NOTIFY, name, sc.Arg(4, sc.NE, 0))
            else:
                filt.add_rule(sc.NOTIFY, name)
        else:
            filt.add_rule(sc.ALLOW, name)
    for name in profile.deny:
        if name == "clone3" or not syscalls.exists_here(name):
            continue
        if audit and name in ("clone", "ioctl"):
            continue  # logged by their argument rules below, which keep the escapes denied
        filt.add_rule(sc.LOG if audit and name not in escape else denied, name)
    if audit:
        # Under the LOG default an escape-class call the profile does not list would
        # pass: each is denied by name, unless the profile allows it.
        for name in ESCAPE_CLASS:
            if name not in profile.allow and name not in deny and syscalls.exists_here(name):
                filt.add_rule(denied, name)

    # clone: threads and processes yes, new namespaces no (in audit mode too).
    if audit:
        for flag in _bits(CLONE_NAMESPACE_FLAGS):
            filt.add_rule(denied, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    if "clone" not in deny:
        filt.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NAMESPACE_FLAGS, 0))
    elif audit:
        filt.add_rule(sc.LOG, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NAMESPACE_FLAGS, 0))
    # clone3 passes its flags in memory BPF cannot read: ENOSYS makes libc fall back to clone.
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")

    # socket: by family, and never SOCK_RAW / SOCK_PACKET (only the listed types match).
    if "socket" not in deny:
        from runtime.security.profiles import NETLINK_PROTOCOLS, SOCKET_FAMILIES

        for family in profile.socket_families:
            number = SOCKET_FAMILIES[family]
            if family == "AF_NETLINK":
                for proto in profile.netlink_protocols:
                    filt.add_rule(
                        sc.ALLOW,
                        "socket",
                        sc.Arg(0, sc.EQ, number),
                        sc.Arg(2, sc.EQ, NETLINK_PROTOCOLS[proto]),
                    )
                continue
            for sock_type in (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET):
                if family == "AF_UNIX":
                    filt.add_rule(
                        sc.ALLOW,
                        "socket",
                        sc.Arg(0, sc.EQ, number),
                        sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, sock_type),
                    )
                    continue
                for protocol in INET_PROTOCOLS:
                    filt.add_rule(
                        sc.ALLOW,
                        "socket",
                        sc.Arg(0, sc.EQ, number),
                        sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, sock_type),
                        sc.Arg(2, sc.EQ, protocol),
                    )

    # ioctl: everything but TIOCSTI (typing into the controlling terminal). The kernel
    # reads the command as 32 bits, so "low 32 bits != TIOCSTI" is written as "differs
    # from TIOCSTI in at least one of the low 32 bits": one masked compare per bit.
    if audit:
        # The one ioctl every profile refuses: typing into the controlling terminal.
        filt.add_rule(denied, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, TIOCSTI))
    if "ioctl" not in deny or audit:
        other_than_tiocsti = sc.LOG if "ioctl" in deny else sc.ALLOW
        for bit in range(32):
            mask = 1 << bit
            filt.add_rule(
                other_than_tiocsti, "ioctl", sc.Arg(1, sc.MASKED_EQ, mask, (~TIOCSTI) & mask)
            )

    # personality: only the harmless personas (no READ_IMPLIES_EXEC, no ADDR_NO_RANDOMIZE).
    if "personality" in profile.allow and "personality" not in deny and profile.unsafe:
        filt.add_rule(sc.ALLOW, "personality")
    elif "personality" not in deny:
        for value in SAFE_PERSONALITIES:
            filt.add_rule(sc.ALLOW, "personality", sc.Arg(0, sc.EQ, value))

    for priority, name in enumerate(reversed(profile.hot), start=1):
        if syscalls.exists_here(name):
            filt.syscall_priority(name, min(255, priority))
    return _export(filt)


def _bits(mask: int) -> list[int]:
    return [1 << bit for bit in range(mask.bit_length()) if mask & (1 << bit)]


_OCI_OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}


def _oci_action(sc, action: str, errno_ret: int | None, default_errno: int) -> int:
    if action == "SCMP_ACT_ALLOW":
        return sc.ALLOW
    if action == "SCMP_ACT_ERRNO":
        return sc.ERRNO(errno_ret if errno_ret is not None else default_errno)
    if action in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return sc.KILL_THREAD
    if action == "SCMP_ACT_KILL_PROCESS":
        return sc.KILL_PROCESS
    if action == "SCMP_ACT_LOG":
        return sc.LOG
    if action == "SCMP_ACT_TRAP":
        return sc.TRAP
    if action == "SCMP_ACT_TRACE":
        return sc.TRACE(errno_ret or 0)
    raise NotImplementedByZviz(
        f"config.json: linux.seccomp: action {action} is not supported by zviz "
        "(the profile's broker owns the seccomp listener)"
    )


def _oci_rule_condition_sets(oci_args, args: list) -> list[list]:
    """The libseccomp rules one config.json rule becomes, as lists of conditions.

    libseccomp refuses two comparisons of the same argument in one rule (EINVAL), which
    runtime-spec allows (the OCI suite's personality rule has several). runc then adds
    each condition as a rule of its own (any condition matching applies the action), and
    so do we: a config.json runc accepts compiles here to the same filter.
    """
    indexes = [a["index"] for a in oci_args]
    if len(indexes) == len(set(indexes)):
        return [args]
    return [[arg] for arg in args]


def _compile_oci(seccomp: dict) -> bytes:
    import pyseccomp as sc

    default_errno = seccomp.get("defaultErrnoRet") or errno.EPERM
    default = _oci_action(sc, seccomp["defaultAction"], seccomp.get("defaultErrnoRet"), errno.EPERM)
    filt = sc.SyscallFilter(default)
    filt.set_attr(sc.Attr.CTL_NNP, 0)
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    arches = {
        "SCMP_ARCH_X86": sc.Arch.X86,
        "SCMP_ARCH_X86_64": sc.Arch.X86_64,
        "SCMP_ARCH_X32": sc.Arch.X32,
        "SCMP_ARCH_AARCH64": sc.Arch.AARCH64,
        "SCMP_ARCH_ARM": sc.Arch.ARM,
    }
    for arch in seccomp.get("architectures") or ():
        value = arches.get(arch)
        # Other listed arches cannot run here; a foreign-arch call then hits ACT_BADARCH.
        if value is not None and not filt.exist_arch(value):
            filt.add_arch(value)
    for i, rule in enumerate(seccomp.get("syscalls") or ()):
        action = _oci_action(sc, rule["action"], rule.get("errnoRet"), default_errno)
        if action == default:
            continue  # libseccomp refuses rules that equal the default action
        oci_args = rule.get("args") or ()
        args = [
            sc.Arg(a["index"], _OCI_OPS[a["op"]], a.get("value", 0), a.get("valueTwo", 0))
            for a in oci_args
        ]
        for name in rule["names"]:
            if not syscalls.known(name):
                continue  # runc too skips names libseccomp does not know
            try:
                for conditions in _oci_rule_condition_sets(oci_args, args):
                    filt.add_rule(action, name, *conditions)
            except OSError as e:
                raise InvalidArgument(
                    f"config.json: linux.seccomp.syscalls[{i}]: {name}: {os.strerror(e.errno)}"
                ) from None
    return _export(filt)


# --- Loading (PID 1, no pyseccomp) ---


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def wait_killable_recv_supported() -> bool:
    """Whether the kernel knows SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (Linux 5.19).

    Asked without loading anything: the kernel checks the flags (EINVAL for one it does
    not know) before it reads the filter, so a NULL filter answers EFAULT when it does.
    """
    try:
        linux.raw_syscall(
            "seccomp",
            ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(
                SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
            ),
            None,
        )
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        if e.errno == errno.EFAULT:
            return True
        raise
    raise SecurityLayerError("seccomp: probing WAIT_KILLABLE_RECV loaded a NULL filter")


def without_wait_killable_recv(program: Program) -> Program:
    """The same filter for a kernel without WAIT_KILLABLE_RECV (the profile tolerates it)."""
    return replace(program, flags=program.flags & ~SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV)


def load(program: Program) -> int | None:
    """Install `program` on the calling thread; the listener fd if it has one."""
    buf = ctypes.create_string_buffer(program.bpf, len(program.bpf))
    prog = _SockFprog(len(program.bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    try:
        fd = linux.raw_syscall(
            "seccomp",
            ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(program.flags),
            ctypes.byref(prog),
            detail=program.name,
        )
    except OSError as e:
        # No retry without a flag the kernel refused (WAIT_KILLABLE_RECV before 5.19):
        # prepare() decides, before loading, whether the profile may run without it.
        raise SecurityLayerError(
            f"seccomp: loading the {program.name} filter: {e.strerror}"
        ) from None
    return fd if program.listener else None
