"""Capabilities: the ceiling a profile grants, and dropping everything else in PID 1.

The number of capabilities comes from the running kernel
(/proc/sys/kernel/cap_last_cap), never from a constant, so a capability newer
than this code is dropped too.
"""

from runtime import linux
from runtime.errors import SecurityLayerError
from runtime.spec import CAPABILITY_NUMBERS, CAPABILITY_SETS, Capabilities
from runtime.syscall import LINUX, Syscall

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


def raise_effective_to_permitted(syscall: Syscall = LINUX) -> None:
    """Make the effective set everything still permitted.

    A setuid away from 0 (with keepcaps) clears the effective set, and dropping the
    bounding set needs CAP_SETPCAP effective: the one place either caller (drop(), and
    PID 1's user switch in runtime/spawn/init.py) raises it."""
    _, permitted, inheritable = syscall.capget()
    syscall.capset(permitted, permitted, inheritable)


def drop(caps: Capabilities, cap_last_cap: int, syscall: Syscall = LINUX) -> None:
    """Leave exactly `caps` in the five sets of the calling thread; raise if that fails.

    Order (pinned by tests/test_capability_sequence.py): effective raised to permitted;
    the bounding set cut while CAP_SETPCAP is still effective; ambient cleared; the
    effective, permitted and inheritable sets set at once (dropping CAP_SETPCAP last);
    the ambient set raised, which the kernel allows only for capabilities now both
    permitted and inheritable; a capget to check what the thread holds.
    """
    keep_bounding = mask(caps.bounding)
    try:
        raise_effective_to_permitted(syscall)
        for cap in range(cap_last_cap + 1):
            if not keep_bounding & (1 << cap) and syscall.prctl(linux.PR_CAPBSET_READ, cap) == 1:
                syscall.prctl(linux.PR_CAPBSET_DROP, cap)
        syscall.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
        syscall.capset(mask(caps.effective), mask(caps.permitted), mask(caps.inheritable))
        for name in caps.ambient:
            syscall.prctl(
                linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_RAISE, CAPABILITY_NUMBERS[name]
            )
    except OSError as e:
        raise SecurityLayerError(f"capabilities: cannot drop capabilities: {e}") from None
    effective, permitted, _ = syscall.capget()
    if effective != mask(caps.effective) or permitted != mask(caps.permitted):
        raise SecurityLayerError(
            f"capabilities: still holding effective={effective:#x} permitted={permitted:#x}"
        )
