"""Known container escapes, each a probe run inside a real zviz container: all BLOCKED.

The same probes under runc (same bundle, no seccomp profile in config.json) make the
table in docs/security.md (`python -m integration.security.table`).
"""

import pytest

from integration.security.escapes import PROBES, probe_arg


@pytest.mark.parametrize("profile", ["ci-runner", "hostile-tenant"])
@pytest.mark.parametrize("name", sorted(PROBES))
def test_escape_is_blocked(probes, host_listener, profile, name):
    word, detail = probes.verdict("zviz", profile, name, probe_arg(name, profile, host_listener))
    assert word == "BLOCKED", f"{profile}: {word} {detail}"


def test_probes_do_run_under_runc(probes, host_listener):
    """The baseline is real: under runc without a seccomp profile some probes escape."""
    escaped = []
    for name in ("unshare_user", "keyctl", "io_uring", "netlink_socket", "ptrace"):
        word, _ = probes.verdict("runc", None, name, probe_arg(name, None, host_listener))
        assert word in ("BLOCKED", "ESCAPED")
        escaped += [name] if word == "ESCAPED" else []
    assert escaped, "runc blocked everything: the probes would prove nothing"
