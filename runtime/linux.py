"""Thin ctypes wrappers over the Linux syscalls zviz needs and Python 3.11 lacks.

Every wrapper raises OSError with errno and the call's name, so a failure deep in
a container's setup reads "mount(/proc): [Errno 1] Operation not permitted"
rather than a bare -1. Nothing here decides policy.
"""

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Namespace flags (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

# OCI namespace type -> clone flag; also the order namespaces are created in:
# user first, so the others are owned by it.
NAMESPACE_FLAGS = {
    "user": CLONE_NEWUSER,
    "pid": CLONE_NEWPID,
    "mount": CLONE_NEWNS,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "network": CLONE_NEWNET,
    "cgroup": CLONE_NEWCGROUP,
    "time": CLONE_NEWTIME,
}

# Name of each namespace under /proc/<pid>/ns.
NAMESPACE_PROC_NAMES = {
    "user": "user",
    "pid": "pid",
    "mount": "mnt",
    "ipc": "ipc",
    "uts": "uts",
    "network": "net",
    "cgroup": "cgroup",
    "time": "time",
}

# mount(2) flags.
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_DETACH = 2
MNT_FORCE = 1

# prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_LOWER = 3
PR_CAP_AMBIENT_CLEAR_ALL = 4

# os.uname, not platform.machine(): `platform` costs ~1 ms of import on every zviz command.
_MACHINE = os.uname().machine

# Syscall numbers for calls glibc 2.36 has no wrapper for (or that Python can't reach).
_SYSCALLS = {
    "x86_64": {
        "pivot_root": 155,
        "setns": 308,
        "unshare": 272,
        "capget": 125,
        "capset": 126,
        "seccomp": 317,
        "pidfd_open": 434,
        "pidfd_getfd": 438,
        "pidfd_send_signal": 424,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "mount_setattr": 442,
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
        "clone3": 435,
        "close_range": 436,
        "rt_sigaction": 13,
        "bpf": 321,
        "openat2": 437,
    },
    "aarch64": {
        "pivot_root": 41,
        "setns": 268,
        "unshare": 97,
        "capget": 90,
        "capset": 91,
        "seccomp": 277,
        "pidfd_open": 434,
        "pidfd_getfd": 438,
        "pidfd_send_signal": 424,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "mount_setattr": 442,
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
        "clone3": 435,
        "close_range": 436,
        "rt_sigaction": 134,
        "bpf": 280,
        "openat2": 437,
    },
}[_MACHINE]


def syscall_number(name: str) -> int:
    return _SYSCALLS[name]


def _fail(call: str, detail: str | None = None) -> OSError:
    err = ctypes.get_errno()
    where = f"{call}({detail})" if detail else call
    return OSError(err, f"{where}: {os.strerror(err)}")


def _check(result: int, call: str, detail: str | None = None) -> int:
    if result == -1:
        raise _fail(call, detail)
    return result


def raw_syscall(name: str, *args, detail: str | None = None) -> int:
    """Call a syscall by name; arguments must already be ctypes-compatible."""
    return _check(_libc.syscall(_SYSCALLS[name], *args), name, detail)


def _b(path) -> bytes | None:
    if path is None:
        return None
    return os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare", hex(flags))


NS_GET_USERNS = 0xB701


def owner_user_namespace(ns_fd: int) -> int:
    """A new fd on the user namespace that owns the namespace `ns_fd` refers to."""
    import fcntl

    return fcntl.ioctl(ns_fd, NS_GET_USERNS)


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns", str(fd))


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    rc = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(rc, "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    raw_syscall("pivot_root", _b(new_root), _b(put_old), detail=new_root)


def sethostname(name: str) -> None:
    data = name.encode()
    _check(_libc.sethostname(data, ctypes.c_size_t(len(data))), "sethostname", name)


def setdomainname(name: str) -> None:
    data = name.encode()
    _check(_libc.setdomainname(data, ctypes.c_size_t(len(data))), "setdomainname", name)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    rc = _libc.prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(arg2),
        ctypes.c_ulong(arg3),
        ctypes.c_ulong(arg4),
        ctypes.c_ulong(arg5),
    )
    return _check(rc, "prctl", str(option))


def set_pdeathsig(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


# capget(2)/capset(2), version 3: two 32-bit words per set.
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capget() -> tuple[int, int, int]:
    """The calling thread's (effective, permitted, inheritable) capability masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    raw_syscall("capget", ctypes.byref(header), ctypes.byref(data))
    return tuple(
        getattr(data[0], name) | getattr(data[1], name) << 32
        for name in ("effective", "permitted", "inheritable")
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    raw_syscall("capset", ctypes.byref(header), ctypes.byref(data))


def pidfd_open(pid: int, flags: int = 0) -> int:
    return raw_syscall("pidfd_open", ctypes.c_int(pid), ctypes.c_uint(flags), detail=str(pid))


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    return raw_syscall(
        "pidfd_getfd",
        ctypes.c_int(pidfd),
        ctypes.c_int(targetfd),
        ctypes.c_uint(0),
        detail=str(targetfd),
    )


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    raw_syscall("pidfd_send_signal", ctypes.c_int(pidfd), ctypes.c_int(sig), None, ctypes.c_uint(0))


CLOSE_RANGE_CLOEXEC = 4


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    raw_syscall("close_range", ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(flags))


def close_all_except(keep) -> None:
    """Close every descriptor of this process but KEEP: close_range over the gaps, no walk
    of /proc/self/fd (a fork that must hold nothing of its parent's but these)."""
    low = 0
    for fd in sorted(set(keep)):
        if fd > low:
            close_range(low, fd - 1)
        low = max(low, fd + 1)
    close_range(low)


# inotify(7), for cgroup v2 event files (memory.events, cgroup.events) that signal
# changes as IN_MODIFY.
IN_MODIFY = 0x00000002
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


def inotify_init1(flags: int = IN_CLOEXEC) -> int:
    return _check(_libc.inotify_init1(ctypes.c_int(flags)), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    rc = _libc.inotify_add_watch(ctypes.c_int(fd), _b(path), ctypes.c_uint32(mask))
    return _check(rc, "inotify_add_watch", path)


# New mount API (open_tree, move_mount, mount_setattr): detached mount trees,
# moved into place by fd, and id-mapped mounts.
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOVE_MOUNT_T_SYMLINKS = 0x00000010
MOVE_MOUNT_T_EMPTY_PATH = 0x00000040
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MOUNT_ATTR_NOEXEC = 0x00000008
MOUNT_ATTR_IDMAP = 0x00100000


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def open_tree(dirfd: int, path: str, flags: int) -> int:
    return raw_syscall(
        "open_tree", ctypes.c_int(dirfd), _b(path), ctypes.c_uint(flags), detail=path
    )


def move_mount(from_dirfd: int, from_path: str, to_dirfd: int, to_path: str, flags: int) -> None:
    raw_syscall(
        "move_mount",
        ctypes.c_int(from_dirfd),
        _b(from_path),
        ctypes.c_int(to_dirfd),
        _b(to_path),
        ctypes.c_uint(flags),
        detail=to_path,
    )


FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1


def fsopen(fs_name: str, flags: int = FSOPEN_CLOEXEC) -> int:
    return raw_syscall("fsopen", _b(fs_name), ctypes.c_uint(flags), detail=fs_name)


def fsconfig(fs_fd: int, cmd: int, key: str | None = None, value: str | None = None) -> None:
    raw_syscall(
        "fsconfig",
        ctypes.c_int(fs_fd),
        ctypes.c_uint(cmd),
        _b(key),
        _b(value),
        ctypes.c_int(0),
        detail=f"{key}={value}" if key else "create",
    )


def fsmount(fs_fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    return raw_syscall(
        "fsmount", ctypes.c_int(fs_fd), ctypes.c_uint(flags), ctypes.c_uint(attr_flags)
    )


def mount_setattr(
    fd: int,
    *,
    attr_set: int = 0,
    propagation: int = 0,
    userns_fd: int = 0,
    recursive: bool = False,
    detail: str = "",
) -> None:
    """Change the mount `fd` (and, recursive, every mount beneath it) in one call.

    `propagation`: one of MS_PRIVATE, MS_SLAVE, MS_SHARED, MS_UNBINDABLE (no MS_REC:
    `recursive` says it). Unlike a remount, it reaches every submount at once.
    """
    attr = MountAttr(attr_set, 0, propagation, userns_fd)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    raw_syscall(
        "mount_setattr",
        ctypes.c_int(fd),
        b"",
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
        detail=detail or str(fd),
    )


def mount_setattr_idmap(
    fd: int, userns_fd: int, recursive: bool = True, read_only: bool = False
) -> None:
    """Make the detached mount `fd` id-mapped through the user namespace `userns_fd`
    (and read-only in the same call, so that it is never mapped and writable)."""
    mount_setattr(
        fd,
        attr_set=MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if read_only else 0),
        userns_fd=userns_fd,
        recursive=recursive,
        detail="MOUNT_ATTR_IDMAP",
    )


def bpf(cmd: int, attr: bytearray, detail: str | None = None) -> int:
    """bpf(2) with a `union bpf_attr` the caller packed; the kernel may write back into it."""
    buffer = (ctypes.c_char * len(attr)).from_buffer(attr)
    return raw_syscall("bpf", ctypes.c_int(cmd), buffer, ctypes.c_uint(len(attr)), detail=detail)


def reset_signal_disposition(sig: int) -> None:
    """SIG_DFL for `sig` by the raw syscall: glibc (and so Python) refuses its own
    reserved signals 32 and 33, yet an ignored one survives execve like any other."""
    default = ctypes.create_string_buffer(32)  # handler 0 = SIG_DFL, no flags, empty mask
    raw_syscall(
        "rt_sigaction", ctypes.c_int(sig), default, None, ctypes.c_size_t(8), detail=str(sig)
    )


# openat2(2) resolve flags.
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


class OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = OpenHow(flags, mode, resolve)
    return raw_syscall(
        "openat2",
        ctypes.c_int(dirfd),
        _b(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
        detail=path,
    )
