"""Known container escapes, each a probe run inside a real zviz container: each must be
stopped with the outcome pinned for it in escapes.py (errno or signal), nothing else.

A probe whose target this kernel lacks is skipped, naming what is missing: there, any
zviz would "block" it. The same probes under runc (same bundle, no seccomp profile in
config.json) are the baseline and make the table in docs/security.md
(`python -m integration.security.table`).
"""

import re
import subprocess

import pytest

from integration.security.conftest import parse_verdict
from integration.security.escapes import ESCAPED, NOT_BUILT_IN, PROBES, probe_arg
from runtime.security.profiles import load_profile


@pytest.fixture(scope="session")
def runc_baseline(probes, host_listener):
    """probe name -> its verdict under runc, run at most once per session."""
    seen = {}

    def verdict(name):
        if name not in seen:
            seen[name] = probes.verdict("runc", None, name, probe_arg(name, None, host_listener))
        return seen[name]

    return verdict


def skip_if_interface_missing(name, runc_baseline):
    interface = PROBES[name].attacks
    if interface is None:
        return
    if interface.missing_on_host():
        pytest.skip(f"this kernel has no {interface.name}: the probe would prove nothing")
    if interface.host_paths is None and runc_baseline(name).outcome == NOT_BUILT_IN:
        pytest.skip(
            f"this kernel has no {interface.name} (ENOSYS without seccomp, under runc): "
            "the probe would prove nothing"
        )


@pytest.mark.parametrize("profile", ["ci-runner", "hostile-tenant"])
@pytest.mark.parametrize("name", sorted(PROBES))
def test_escape_is_blocked(probes, host_listener, runc_baseline, profile, name):
    skip_if_interface_missing(name, runc_baseline)
    verdict = probes.verdict("zviz", profile, name, probe_arg(name, profile, host_listener))
    expected = PROBES[name].expected(profile)
    assert (verdict.word, verdict.outcome) == ("BLOCKED", expected), (
        f"{profile}: expected BLOCKED by {expected}, got {verdict}"
    )
    if name == "fork_bomb":
        # EAGAIN from the pids limit, not from some other limit that stops fork first.
        forked = int(re.search(r"after (\d+) processes", verdict.detail).group(1))
        assert forked < load_profile(profile).pids_max, verdict.detail


# The probes runc without a seccomp profile lets through on the project machine: the
# baseline proves the probes can escape at all (a probe that cannot would prove nothing).
RUNC_ESCAPES = ("unshare_user", "keyctl", "io_uring", "netlink_socket", "ptrace", "proc_pid_mem")


@pytest.mark.parametrize("name", RUNC_ESCAPES)
def test_probe_escapes_under_runc(runc_baseline, name):
    assert PROBES[name].runc == ESCAPED
    skip_if_interface_missing(name, runc_baseline)
    verdict = runc_baseline(name)
    assert verdict.word == ESCAPED, (
        f"under runc without seccomp: {verdict}; the baseline no longer escapes here"
    )


def test_a_crash_or_another_errno_is_not_the_pinned_outcome():
    """The harness itself: a probe killed by SIGSEGV, or stopped by an errno other than
    the pinned one, or printing no errno name, does not count as blocked as pinned."""
    crashed = parse_verdict("mount", subprocess.CompletedProcess([], 128 + 11, "", ""))
    assert crashed.outcome == "SIGSEGV" != PROBES["mount"].ci_runner
    other = "BLOCKED mount: mount tmpfs: errno 2 ENOENT (No such file or directory)\n"
    assert parse_verdict("mount", subprocess.CompletedProcess([], 0, other, "")).outcome == "ENOENT"
    unnamed = "BLOCKED mount: mount tmpfs: errno 1 (Operation not permitted)\n"
    assert parse_verdict("mount", subprocess.CompletedProcess([], 0, unnamed, "")).word == "ERROR"
    failed = parse_verdict("mount", subprocess.CompletedProcess([], 1, "", "zviz: no such bundle"))
    assert (failed.word, failed.outcome) == ("ERROR", "ERROR")
