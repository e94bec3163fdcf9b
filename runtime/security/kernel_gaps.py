"""Fail closed on older kernels: what a profile asks of the kernel, what it gets, what may lack.

An older kernel does not refuse what it does not know, it ignores it: a Landlock ruleset
built for ABI 2 simply handles no truncate, port, device-ioctl or scope rights, so those
run unrestricted; a seccomp listener without WAIT_KILLABLE_RECV lets a signal restart a
call the broker is already performing. Each such gap is refused here unless the profile
names it in `may_lack` (`[landlock] may_lack`, `[broker] may_lack`), or does not need
the layer at all (`[landlock] required = false` tolerates every Landlock gap, since it
tolerates no Landlock). `decide` is the one place this is decided; `prepare` (PID 1)
enforces it, `zviz profile show|check` print it. Stdlib only: PID 1 imports it.
"""

from dataclasses import dataclass

# name (as written in may_lack) -> (Landlock ABI that brings it, what runs unrestricted without it)
LANDLOCK_FEATURES = {
    "truncate": (3, "truncate(2) of files outside the writable paths"),
    "tcp_ports": (4, "TCP bind and connect to any port (network.tcp_bind/tcp_connect)"),
    "device_ioctl": (5, "ioctl(2) on every device outside landlock.device_ioctl"),
    "scope": (6, "abstract unix sockets and signals reaching outside the container"),
}
WAIT_KILLABLE_RECV = "wait_killable_recv"
# name -> (kernel that brings it, what goes wrong without it)
BROKER_FEATURES = {
    WAIT_KILLABLE_RECV: (
        "Linux 5.19 (SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV)",
        "a signal restarts a mediated call the broker still performs (a send or connect "
        "happens twice, or happens while the caller sees EINTR)",
    ),
}


@dataclass(frozen=True, slots=True)
class Gap:
    """One kernel feature a profile may use, and what becomes of it on this kernel."""

    table: str  # the profile table whose may_lack names it: "landlock" or "broker"
    feature: str
    needs: str  # "Landlock ABI 3", "Linux 5.19 (...)"
    lost: str  # what runs unrestricted (or goes wrong) without it
    asked: bool
    granted: bool
    may_lack: bool

    @property
    def verdict(self) -> str:
        if not self.asked:
            return "not asked"
        if self.granted:
            return "granted"
        return "missing, allowed" if self.may_lack else "refused"


def landlock_asked(profile) -> dict[str, bool]:
    """Which Landlock rights the profile's ruleset would handle on a kernel that has them all."""
    return {
        # Every ruleset keeps files outside the writable paths from being written.
        "truncate": True,
        "tcp_ports": profile.network != "none"
        and (profile.tcp_bind is not None or profile.tcp_connect is not None),
        # A rule on "/" grants ioctl on every device: nothing is restricted then.
        "device_ioctl": "/" not in profile.device_ioctl,
        "scope": profile.landlock_scope,
    }


def decide(profile, landlock_abi: int, wait_killable_recv: bool) -> list[Gap]:
    """Each feature: asked, granted by a kernel with `landlock_abi` / that flag, may lack."""
    gaps = []
    asked = landlock_asked(profile)
    for feature, (abi, lost) in LANDLOCK_FEATURES.items():
        gaps.append(
            Gap(
                "landlock",
                feature,
                f"Landlock ABI {abi}",
                lost,
                asked[feature],
                landlock_abi >= abi,
                not profile.landlock_required or feature in profile.landlock_may_lack,
            )
        )
    needs, lost = BROKER_FEATURES[WAIT_KILLABLE_RECV]
    gaps.append(
        Gap(
            "broker",
            WAIT_KILLABLE_RECV,
            needs,
            lost,
            # Only a performed call is harmful to replay: --verbose alone answers EPERM.
            bool(profile.mediate),
            wait_killable_recv,
            WAIT_KILLABLE_RECV in profile.broker_may_lack,
        )
    )
    return gaps


def refusal(profile, gaps: list[Gap], landlock_abi: int) -> str | None:
    """The error that refuses the container, naming each missing right; None if it may run."""
    refused = [g for g in gaps if g.verdict == "refused"]
    if not refused:
        return None
    parts = []
    for g in refused:
        have = (
            f"this kernel has ABI {landlock_abi}"
            if g.table == "landlock"
            else "this kernel lacks it"
        )
        parts.append(
            f"{g.feature} needs {g.needs}, {have}: {g.lost}; allow it with "
            f'[{g.table}] may_lack = ["{g.feature}"]'
        )
    return f"profile {profile.name} asks for what this kernel lacks: " + "; ".join(parts)


def table(gaps: list[Gap], landlock_abi: int, wait_killable_recv: bool) -> list[str]:
    """`zviz profile show|check`: one line per feature."""
    lines = [
        f"kernel: Landlock ABI {landlock_abi}, seccomp WAIT_KILLABLE_RECV "
        f"{'yes' if wait_killable_recv else 'no'}",
        f"  {'feature':28} {'needs':18} {'asked':6} {'kernel':7} {'may lack':9} verdict",
    ]
    for g in gaps:
        needs = g.needs.split(" (")[0]
        lines.append(
            f"  {g.table + '.' + g.feature:28} {needs:18} {_yes(g.asked):6} "
            f"{_yes(g.granted):7} {_yes(g.may_lack):9} {g.verdict}"
        )
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
