"""What the workload cannot do to the exec anchor (runtime/exec_anchor.py, issue 11 item 4).

The anchor is PID 1's child, with PID 1's uid, capabilities and Landlock domain: the
kernel's uid and Landlock checks let the workload reach it in ptrace mode. It is not
dumpable (prctl PR_SET_DUMPABLE 0), so opening its /proc/<pid>/mem for writing (the route
to run code as the process that forks every exec), listing its fds (the route to its
socket: the directory lists, its entries do not open) and reading its environ are refused to the same uid without CAP_SYS_PTRACE, which
no built-in profile grants. Its death, which the workload can cause (same uid, as it can
kill any of its processes), only sends later execs the old way
(integration/test_exec_anchor.py).
"""

import pytest

ANCHOR = (
    "a=; for p in $(pidof zviz-anchor); do "
    '[ "$(cut -d" " -f4 /proc/$p/stat)" = 1 ] && a=$p; done; '
    '[ -n "$a" ] && echo found; '
    '[ "$(stat -c %u /proc/$a)" = "$(id -u)" ] && echo same-uid; '
)
PROBE = ANCHOR + (
    "(exec 3<>/proc/$a/mem) 2>/dev/null && echo mem-opened-for-write; "
    # Listing the fd directory is readdir (its owner is the mm's root: the container's);
    # following an entry, the way to its socket, is the ptrace-mode check.
    "ls /proc/$a/fd | grep -q . && echo fds-listed; "
    "for f in /proc/$a/fd/*; do readlink $f >/dev/null 2>&1 && echo fd-followed; done; "
    "cat /proc/$a/environ >/dev/null 2>&1 && echo environ-read; "
    "echo end"
)


@pytest.mark.parametrize("profile", ["ci-runner", "web-server", "hostile-tenant"])
def test_the_workload_cannot_write_the_anchors_memory_nor_reach_its_fds(probes, profile):
    result = probes.run("zviz", profile, ["/bin/sh", "-c", PROBE])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["found", "same-uid", "fds-listed", "end"], (
        result.stdout,
        result.stderr,
    )
