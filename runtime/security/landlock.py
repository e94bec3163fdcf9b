"""Landlock: read and execute across the rootfs, write only where the profile says.

ABI 1-3: filesystem rules; 4: TCP bind/connect ports; 5: device ioctls;
6: abstract unix sockets and signals scoped to the container; 7: audit records of
denials (`log_flags`). The ruleset is built
in PID 1 after pivot_root (paths are the container's) and enforced right before
execve by `restrict`.
"""

import ctypes
import errno
import os

from runtime import linux

CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
RULE_NET_PORT = 2

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1
# landlock_restrict_self flags (ABI 7, Linux 6.15): which denials of the new domain the
# kernel writes as audit records (only while audit is enabled). By default it logs
# those of the restricting program until its next execve, none after.
RESTRICT_SELF_LOG_SAME_EXEC_OFF = 1 << 0
RESTRICT_SELF_LOG_NEW_EXEC_ON = 1 << 1
RESTRICT_SELF_LOG_SUBDOMAINS_OFF = 1 << 2
LOG_ABI = 7

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
# Everything but creating device nodes: writable never means "may mknod a device".
WRITE = (
    FS_WRITE_FILE
    | FS_REMOVE_DIR
    | FS_REMOVE_FILE
    | FS_MAKE_DIR
    | FS_MAKE_REG
    | FS_MAKE_SOCK
    | FS_MAKE_FIFO
    | FS_MAKE_SYM
    | FS_REFER
    | FS_TRUNCATE
)
# What a rule on a non-directory may grant (the kernel refuses directory rights there).
FILE_ACCESS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


# The first ABI with scopes (abstract unix sockets, signals).
ABI_SCOPE = 6


def abi_version() -> int:
    """The kernel's Landlock ABI (0: no Landlock, or disabled at boot)."""
    try:
        return linux.raw_syscall(
            "landlock_create_ruleset",
            None,
            ctypes.c_size_t(0),
            ctypes.c_uint32(CREATE_RULESET_VERSION),
        )
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


def log_flags(abi: int, records: bool) -> int:
    """The flags that make the kernel record a container's Landlock denials.

    zviz restricts PID 1 (and each exec'd process) right before the workload's execve,
    so the denials worth a record are all after it: NEW_EXEC_ON. Those of the same exec
    stay logged (the default: the workload's own execve refused is one). SUBDOMAINS_OFF:
    a workload that sandboxes itself with Landlock (a browser, a systemd service) gets
    no records of its own domains' denials: they break none of the profile's rules, the
    record's `rule` could not explain them, and such a workload could fill the node's
    audit queue. Below ABI 7 the kernel has no such flags (it refuses unknown ones) and
    writes no Landlock records at all."""
    if not records or abi < LOG_ABI:
        return 0
    return RESTRICT_SELF_LOG_NEW_EXEC_ON | RESTRICT_SELF_LOG_SUBDOMAINS_OFF


def handled_fs(abi: int) -> int:
    if abi >= 5:
        return (1 << 16) - 1
    return _FS_BY_ABI.get(abi, 0)


class Ruleset:
    """A Landlock ruleset fd with the rules added; `restrict()` enforces it on the caller."""

    def __init__(
        self,
        abi: int,
        restrict_tcp_bind: bool,
        restrict_tcp_connect: bool,
        scope: bool,
        scope_signals: bool = True,
        records: bool = False,
    ):
        self.abi = abi
        self.restrict_flags = log_flags(abi, records)
        self.handled_fs = handled_fs(abi)
        net = 0
        if abi >= 4:
            net |= NET_BIND_TCP if restrict_tcp_bind else 0
            net |= NET_CONNECT_TCP if restrict_tcp_connect else 0
        self.handled_net = net
        scoped = SCOPE_ABSTRACT_UNIX_SOCKET | (SCOPE_SIGNAL if scope_signals else 0)
        self.scoped = scoped if scope and abi >= ABI_SCOPE else 0
        attr = _RulesetAttr(self.handled_fs, self.handled_net, self.scoped)
        size = 8 if abi < 4 else (16 if abi < 6 else 24)
        self.fd = linux.raw_syscall(
            "landlock_create_ruleset", ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
        )
        os.set_inheritable(self.fd, False)
        self.rules: list[tuple[str, int]] = []

    def allow_path(self, path: str, access: int) -> bool:
        """Grant `access` beneath `path`; False if the path does not exist in this rootfs.

        The image owns the rootfs: a path it made a symlink (/run -> /dev, /data -> /)
        would move the rule onto the link's target. So no symlink is followed and
        such a path gets no rule (False): access through the link is then decided by
        the target's own rules.
        """
        try:
            fd = linux.openat2(
                linux.AT_FDCWD, path, os.O_PATH | os.O_CLOEXEC, linux.RESOLVE_NO_SYMLINKS
            )
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return False
            raise
        try:
            self.allow_fd(fd, access, path)
        finally:
            os.close(fd)
        return True

    def allow_fd(self, fd: int, access: int, name: str = "") -> None:
        """Grant `access` beneath the file `fd` (an O_PATH fd) refers to."""
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            access &= FILE_ACCESS
        access &= self.handled_fs
        if not access:
            # Every right asked for is newer than this kernel's ABI, so none is restricted
            # and there is nothing to grant; the kernel would answer ENOMSG.
            return
        rule = _PathBeneathAttr(access, fd)
        linux.raw_syscall(
            "landlock_add_rule",
            ctypes.c_int(self.fd),
            ctypes.c_int(RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_uint32(0),
            detail=name or str(fd),
        )
        self.rules.append((name, access))

    def allow_port(self, port: int, access: int) -> None:
        access &= self.handled_net
        if not access:
            return
        rule = _NetPortAttr(access, port)
        linux.raw_syscall(
            "landlock_add_rule",
            ctypes.c_int(self.fd),
            ctypes.c_int(RULE_NET_PORT),
            ctypes.byref(rule),
            ctypes.c_uint32(0),
            detail=f"port {port}",
        )

    def restrict(self) -> None:
        linux.raw_syscall(
            "landlock_restrict_self", ctypes.c_int(self.fd), ctypes.c_uint32(self.restrict_flags)
        )
        os.close(self.fd)
        self.fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
