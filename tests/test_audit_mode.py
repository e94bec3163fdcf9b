"""Audit mode's decisions (docs/denials.md): who may choose it, what it never lets through."""

import pytest

from runtime import denials
from runtime.errors import InvalidArgument
from runtime.security import selection, syscalls
from runtime.security.profiles import (
    ESCAPE_CLASS,
    MODE_ANNOTATION,
    list_profiles,
    load_profile,
    with_mode,
)


def test_every_safe_built_in_profile_denies_the_whole_escape_class():
    assert len(set(ESCAPE_CLASS)) == len(ESCAPE_CLASS)
    assert all(syscalls.known(name) for name in ESCAPE_CLASS)
    for name in list_profiles():
        profile = load_profile(name)
        if not profile.unsafe:
            assert not set(ESCAPE_CLASS) - set(profile.deny), name


def test_an_unknown_mode_is_refused_wherever_it_is_named(tmp_path):
    with pytest.raises(InvalidArgument, match="complain"):
        with_mode(load_profile("ci-runner"), "complain")
    with pytest.raises(InvalidArgument, match="permissive"):
        selection.ProfilePolicy(mode="permissive")
    with pytest.raises(InvalidArgument, match="log"):
        selection.ProfilePolicy(allowed_modes=("log",))
    with pytest.raises(InvalidArgument, match="complain"):
        selection.choose({MODE_ANNOTATION: "complain"}, selection.ProfilePolicy())
    bad = tmp_path / "bad.toml"
    bad.write_text('[profile]\nextends = "ci-runner"\nmode = "complain"\n')
    with pytest.raises(InvalidArgument, match="profile.mode: must be one of enforce, audit"):
        load_profile(str(bad))


def test_who_may_choose_audit_mode():
    audit = {MODE_ANNOTATION: "audit"}
    assert selection.choose(None, selection.ProfilePolicy()).mode == "enforce"
    with pytest.raises(InvalidArgument, match="allowed_annotation_modes"):
        selection.choose(audit, selection.ProfilePolicy())
    allowing = selection.ProfilePolicy(allowed_modes=("audit",))
    assert selection.choose(audit, allowing).mode == "audit"
    operator = selection.ProfilePolicy(mode="audit")
    assert selection.choose(None, operator).mode == "audit"
    # "enforce" is stricter: an annotation may always ask for it, over the operator's audit.
    assert selection.choose({MODE_ANNOTATION: "enforce"}, operator).mode == "enforce"


def test_a_record_says_whether_the_call_went_through():
    audited = with_mode(load_profile("ci-runner"), "audit")
    assert audited.programs == {} and audited.digest == load_profile("ci-runner").digest
    assert denials.seccomp_verdict(0x7FFC0000, audited, "kcmp") == "audit"
    assert denials.seccomp_rule(audited, "kcmp", "audit") == (
        f"profile ci-runner: deny kcmp; {denials.AUDITED}"
    )
    assert denials.seccomp_rule(audited, "mount", "EPERM") == (
        f"profile ci-runner: deny mount; {denials.STILL_DENIED}"
    )
    assert denials.seccomp_rule(load_profile("ci-runner"), "mount", "EPERM") == (
        "profile ci-runner: deny mount"
    )
