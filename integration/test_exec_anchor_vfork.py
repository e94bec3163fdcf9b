"""PID 1 starts the exec anchor with a vfork (runtime/exec_anchor.py start), seen by
strace on a real `zviz run`: the plain vfork syscall, never clone3 (every profile answers
clone3 with a logged ENOSYS: a denial record in every container, why posix_spawn was
reverted), and under a profile that does not allow vfork, a fork (a refused vfork would
be a record too) that still starts the anchor.

The runs import `subprocess` before the runtime, as the shim (asyncio) and the fork
server (its preload) have it: PID 1 vforks only then (may_vfork).
"""

import os
import shutil
import subprocess
import sys

import pytest

from integration.ids import unique_id

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace missing")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The workload lists its own pid namespace's process names: the anchor is PID 1's child.
LIST_NAMES = "cat /proc/[0-9]*/comm"


def traced_run(tmp_path, make_bundle, *profile_flags) -> tuple[str, list[str]]:
    """(the workload's stdout, strace's lines for process-creating calls and execve)."""
    trace = tmp_path / "trace"
    root = tmp_path / "root"
    bundle = make_bundle(["sh", "-c", LIST_NAMES])
    entry = "import subprocess, sys; from runtime.cli import main; sys.exit(main())"
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=vfork,fork,clone,clone3,execve",
         sys.executable, "-c", entry, "--root", str(root), "run", *profile_flags,
         "--bundle", bundle, unique_id("zviz-vfork")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=dict(os.environ, ZVIZ_NO_FORKSERVER="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout, trace.read_text().splitlines()


def pid1_calls(lines: list[str]) -> list[str]:
    """The calls PID 1 began (names, in order) up to its execve of the workload: those
    after its seccomp filter, where a refused or logged call would be a denial record
    (`zviz run` itself, outside the container, may vfork and clone3 as it likes)."""
    pid1 = next(line.split()[0] for line in lines if 'execve("/bin/sh"' in line)
    calls = []
    for line in lines:
        pid, call = line.split(None, 1)
        if pid == pid1 and "resumed>" not in call and not call.startswith(("---", "+++")):
            calls.append(call.split("(", 1)[0])
            if call.startswith('execve("/bin/sh"'):
                return calls
    raise AssertionError("PID 1 never exec'd the workload")


def test_the_anchor_is_vforked_and_nothing_calls_clone3(tmp_path, make_bundle):
    names, lines = traced_run(tmp_path, make_bundle, "--profile", "ci-runner")
    assert "zviz-anchor" in names.split(), names
    # PID 1's last child before its own execve is the anchor: vforked, with no clone3.
    calls = pid1_calls(lines)
    assert calls[-2:] == ["vfork", "execve"], "\n".join(lines)
    assert "clone3" not in calls, "\n".join(lines)


def test_without_vfork_in_the_profile_the_anchor_is_forked(tmp_path, make_bundle):
    profile = tmp_path / "no-vfork.toml"
    profile.write_text(
        '[profile]\nname = "no-vfork"\nextends = "ci-runner"\n[seccomp]\nallow_remove = ["vfork"]\n'
    )
    names, lines = traced_run(tmp_path, make_bundle, "--profile", str(profile))
    assert "zviz-anchor" in names.split(), names
    # No vfork at all (refused, it would be a denial record), no clone3: a plain fork.
    calls = pid1_calls(lines)
    assert calls[-2:] == ["clone", "execve"], "\n".join(lines)
    assert "vfork" not in calls and "clone3" not in calls, "\n".join(lines)
