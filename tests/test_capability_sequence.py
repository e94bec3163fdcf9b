"""The capability drop and no_new_privs, pinned without root through the syscall seam.

The recording seam models one thread's capability sets with the kernel's rules
(tests/recording_syscall.py), so a reordered drop fails here as it would in PID 1:
the bounding set can only be cut while CAP_SETPCAP is effective, an ambient
capability only raised once permitted and inheritable. integration/security/ proves
the result on the real kernel (the `caps` escape probe, /proc/self/status).
"""

import errno

import pytest

from runtime import linux
from runtime.errors import SecurityLayerError
from runtime.security import Plan, apply, capabilities
from runtime.spec import CAPABILITY_NUMBERS, Capabilities
from tests.recording_syscall import RecordingSyscall

LAST_CAP = 40
EVERYTHING = (1 << (LAST_CAP + 1)) - 1
KEPT = ["CAP_CHOWN", "CAP_NET_BIND_SERVICE", "CAP_KILL"]


def after_setuid_with_keepcaps() -> RecordingSyscall:
    """PID 1 after its user switch: everything permitted, nothing effective."""
    return RecordingSyscall(permitted=EVERYTHING, effective=0, cap_last_cap=LAST_CAP)


def wanted(ambient=()) -> Capabilities:
    return Capabilities(
        bounding=list(KEPT),
        effective=list(KEPT),
        permitted=list(KEPT),
        inheritable=list(ambient),
        ambient=list(ambient),
    )


def steps(recorder) -> list[str]:
    """The record as phases: consecutive calls of the same kind folded into one."""
    names = {
        linux.PR_CAPBSET_READ: "bounding",
        linux.PR_CAPBSET_DROP: "bounding",
        linux.PR_SET_NO_NEW_PRIVS: "no_new_privs",
    }
    folded: list[str] = []
    for call in recorder.calls:
        if call.name == "prctl" and call.args["option"] == linux.PR_CAP_AMBIENT:
            step = {linux.PR_CAP_AMBIENT_CLEAR_ALL: "ambient clear"}.get(
                call.args["arg2"], "ambient raise"
            )
        elif call.name == "prctl":
            step = names[call.args["option"]]
        else:
            step = call.name
        if not folded or folded[-1] != step:
            folded.append(step)
    return folded


def test_drop_order_bounding_then_ambient_then_the_three_sets_then_ambient_raise():
    recorder = after_setuid_with_keepcaps()
    capabilities.drop(wanted(ambient=["CAP_KILL"]), LAST_CAP, recorder)
    assert steps(recorder) == [
        "capget",
        "capset",  # effective raised to permitted: CAP_SETPCAP for the bounding cut
        "bounding",
        "ambient clear",
        "capset",  # effective, permitted and inheritable at once
        "ambient raise",
        "capget",  # what the thread holds, checked
    ]
    first_capset = recorder.named("capset")[0].args
    assert first_capset["effective"] == first_capset["permitted"] == EVERYTHING
    final = recorder.named("capset")[1].args
    kept = capabilities.mask(KEPT)
    assert (final["effective"], final["permitted"]) == (kept, kept)
    assert final["inheritable"] == capabilities.mask(["CAP_KILL"])


def test_drop_leaves_exactly_the_wanted_sets():
    recorder = after_setuid_with_keepcaps()
    capabilities.drop(wanted(ambient=["CAP_KILL"]), LAST_CAP, recorder)
    kept = capabilities.mask(KEPT)
    assert recorder.bounding == kept
    assert (recorder.effective, recorder.permitted) == (kept, kept)
    assert recorder.inheritable == recorder.ambient == 1 << CAPABILITY_NUMBERS["CAP_KILL"]
    dropped = [c.args["arg2"] for c in recorder.named("prctl")
               if c.args["option"] == linux.PR_CAPBSET_DROP]  # fmt: skip
    assert sorted(dropped) == [cap for cap in range(LAST_CAP + 1) if not kept & (1 << cap)]


def test_a_capability_already_out_of_the_bounding_set_is_not_dropped_again():
    kept = capabilities.mask(KEPT)
    recorder = RecordingSyscall(
        permitted=EVERYTHING, bounding=kept | 1 << 20, cap_last_cap=LAST_CAP
    )
    capabilities.drop(wanted(), LAST_CAP, recorder)
    dropped = [c.args["arg2"] for c in recorder.named("prctl")
               if c.args["option"] == linux.PR_CAPBSET_DROP]  # fmt: skip
    assert dropped == [20]


def test_apply_sets_no_new_privs_right_after_the_drop():
    recorder = after_setuid_with_keepcaps()
    plan = Plan(profile_name="s5seam", capabilities=wanted(), cap_last_cap=LAST_CAP, landlock=None)
    apply(plan, None, recorder)
    assert steps(recorder)[-2:] == ["capget", "no_new_privs"]
    assert recorder.calls[-1].args["arg2"] == 1
    assert recorder.no_new_privs


def test_a_refused_bounding_drop_fails_closed_naming_the_call():
    recorder = after_setuid_with_keepcaps()
    recorder.fail(
        "prctl",
        errno.EPERM,
        lambda c: c.args["option"] == linux.PR_CAPBSET_DROP and c.args["arg2"] == 21,
    )
    with pytest.raises(
        SecurityLayerError,
        match=r"cannot drop capabilities: .*prctl\(24\): Operation not permitted",
    ):
        capabilities.drop(wanted(), LAST_CAP, recorder)
    # Stopped there: the three sets were never lowered to look as if it had worked.
    assert len(recorder.named("capset")) == 1


def test_an_ambient_capability_not_inheritable_is_refused_not_ignored():
    recorder = after_setuid_with_keepcaps()
    caps = wanted()
    caps.ambient = ["CAP_KILL"]  # ceiling() drops such a one first; drop() must not hide it
    with pytest.raises(SecurityLayerError, match="Operation not permitted"):
        capabilities.drop(caps, LAST_CAP, recorder)


def test_a_thread_still_holding_more_than_asked_is_an_error():
    recorder = after_setuid_with_keepcaps()
    real_capget = recorder.capget
    # The model's answer first; then the check after the drop sees everything still held.
    answers = iter([None, (EVERYTHING, EVERYTHING, 0)])

    def lying_capget():
        state = real_capget()
        fake = next(answers)
        return state if fake is None else fake

    recorder.capget = lying_capget
    with pytest.raises(SecurityLayerError, match="still holding"):
        capabilities.drop(wanted(), LAST_CAP, recorder)


def test_raise_effective_to_permitted_keeps_inheritable():
    recorder = RecordingSyscall(permitted=0b1010, inheritable=0b10, cap_last_cap=LAST_CAP)
    capabilities.raise_effective_to_permitted(recorder)
    assert (recorder.effective, recorder.permitted, recorder.inheritable) == (0b1010, 0b1010, 0b10)
