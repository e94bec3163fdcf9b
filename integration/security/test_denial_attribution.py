"""A container cannot make its denials someone else's, or no one's (docs/denials.md).

The kernel's seccomp records name the caller's audit session; the shim maps a session to
the container whose first process started it. Without that session the login uid is
unset, and a process with an unset login uid may set it itself (the kernel asks no
privilege), starting a session of its choosing: only the profile's Landlock rules (no
writes under /proc) stand in the way, and the pid namespace (the fallback) cannot name a
caller that has already exited. With it, the login uid is set by host root before any
namespace, and changing it takes CAP_AUDIT_CONTROL in the initial user namespace, which
no container has, whatever its profile lets it write.
"""

import os

import pytest

from integration.ids import tagged
from integration.zviz_cli import Zviz
from runtime import denials

# Inside the container: its session, then an attempt to start a new one.
SCRIPT = (
    "echo session=$(cat /proc/self/sessionid); "
    "if echo 0 > /proc/self/loginuid; then echo loginuid=changed; else echo loginuid=refused; fi; "
    "echo session=$(cat /proc/self/sessionid)"
)


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def _run(zviz, make_bundle, records: str) -> list[str]:
    if not os.path.exists("/proc/self/loginuid"):
        pytest.skip("the kernel has no audit login uid (CONFIG_AUDIT off)")
    bundle = make_bundle(["sh", "-c", SCRIPT])
    env = dict(os.environ, **{denials.RECORDS_SWITCH: records})
    result = zviz.run(bundle, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_container_cannot_leave_its_audit_session(zviz, make_bundle):
    lines = _run(zviz, make_bundle, "1")
    first, verdict, after = lines
    assert first != f"session={denials.AUDIT_SID_UNSET}", lines  # it has one of its own
    assert verdict == "loginuid=refused", lines
    assert after == first, lines


def test_without_records_the_session_is_the_callers(zviz, make_bundle):
    """Switched off, nothing is set: the container inherits the caller's (unset) login
    uid, as before denial records existed (the state the test above fails in)."""
    if denials.session_of(os.getpid()) is not None:
        pytest.skip("this test session's own login uid is set: the container inherits it")
    lines = _run(zviz, make_bundle, "0")
    assert lines[0] == f"session={denials.AUDIT_SID_UNSET}", lines
    assert lines[0] == lines[2], lines  # ci-runner's Landlock refuses the write to /proc
