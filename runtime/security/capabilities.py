"""Capabilities: the ceiling a profile grants, and dropping everything else in PID 1.

The number of capabilities comes from the running kernel
(/proc/sys/kernel/cap_last_cap), never from a constant, so a capability newer
than this code is dropped too.
"""

import ctypes

from runtime import linux
from runtime.errors import SecurityLayerError
from runtime.spec import CAPABILITY_NUMBERS, CAPABILITY_SETS, Capabilities

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# The capabilities the kernel checks against the user namespace that owns the file or
# process acted on (capable_wrt_inode_uidgid, kill_ok_by_cred, ns_capable on the
# caller's own namespace for setuid/setgid): in a container whose user namespace maps no
# host root, they reach only the container's own ids and files. ci-runner and web-server
# keep them (docs/security.md, "Capabilities"); the escape probe `caps` counts only others.
CONFINED_TO_USER_NAMESPACE = frozenset(
    {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
    }
)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def last_cap(proc: str = "/proc") -> int:
    with open(f"{proc}/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def ceiling(
    requested: Capabilities | None, allowed: frozenset[str]
) -> tuple[Capabilities, list[str]]:
    """config.json's sets cut down to the profile's ceiling, and the names that were cut."""
    if requested is None:
        return Capabilities(), []
    cut: set[str] = set()
    result = Capabilities()
    for name in CAPABILITY_SETS:
        asked = getattr(requested, name)
        setattr(result, name, [c for c in asked if c in allowed])
        cut.update(c for c in asked if c not in allowed)
    # The kernel raises an ambient capability only if it is both permitted and inheritable
    # (PR_CAP_AMBIENT_RAISE fails with EPERM otherwise); `runc spec` lists ambient ones
    # without inheritable ones, and runc leaves such ambient ones unraised. Dropped here,
    # after the ceiling, so the one list PID 1 raises is one the kernel accepts.
    result.ambient = [
        c for c in result.ambient if c in result.permitted and c in result.inheritable
    ]
    return result, sorted(cut)


def mask(names) -> int:
    value = 0
    for name in names:
        value |= 1 << CAPABILITY_NUMBERS[name]
    return value


def _capget() -> tuple[int, int, int]:
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    linux.raw_syscall("capget", ctypes.byref(header), ctypes.byref(data))
    return tuple(
        data[0].__getattribute__(f) | data[1].__getattribute__(f) << 32
        for f in ("effective", "permitted", "inheritable")
    )


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    linux.raw_syscall("capset", ctypes.byref(header), ctypes.byref(data))


def raise_effective() -> None:
    """Effective = permitted: what the user switch (keepcaps) left permitted is usable."""
    try:
        _, permitted, inheritable = _capget()
        _capset(permitted, permitted, inheritable)
    except OSError as e:
        raise SecurityLayerError(f"capabilities: cannot raise effective: {e}") from None


def drop(caps: Capabilities, cap_last_cap: int) -> None:
    """Leave exactly `caps` in the five sets of the calling thread; raise if that fails."""
    keep_bounding = mask(caps.bounding)
    try:
        # Raise effective to everything still permitted, so dropping the bounding set
        # (which needs CAP_SETPCAP) works even if the user was switched with keepcaps.
        _, permitted, inheritable = _capget()
        _capset(permitted, permitted, inheritable)
        for cap in range(cap_last_cap + 1):
            if not keep_bounding & (1 << cap) and linux.prctl(linux.PR_CAPBSET_READ, cap) == 1:
                linux.prctl(linux.PR_CAPBSET_DROP, cap)
        linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
        _capset(mask(caps.effective), mask(caps.permitted), mask(caps.inheritable))
        for name in caps.ambient:
            linux.prctl(linux.PR_CAP_AMBIENT, 2, CAPABILITY_NUMBERS[name])  # PR_CAP_AMBIENT_RAISE
    except OSError as e:
        raise SecurityLayerError(f"capabilities: cannot drop capabilities: {e}") from None
    effective, permitted, _ = _capget()
    if effective != mask(caps.effective) or permitted != mask(caps.permitted):
        raise SecurityLayerError(
            f"capabilities: still holding effective={effective:#x} permitted={permitted:#x}"
        )
