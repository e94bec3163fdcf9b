"""What a program writes about itself beneath /proc (issue 14 item 2), through `zviz run`
and, as the baseline, runc: probes/procself.c as PID 1 names itself and its thread through
/proc/self/comm and /proc/self/task/<tid>/comm, raises its oom_score_adj, names a thread
it made later (glibc's pthread_setname_np), and forks a child that does the same and
tries to open PID 1's memory for writing.

Landlock grants PID 1 WRITE_FILE on exactly its own comm and oom_score_adj files (and
task/1/'s), each pinned by a bind mount (runtime/security/__init__.py,
`_allow_own_proc_files`). A thread made later and a child process have /proc entries no
rule names: pinned as strict xfails (docs/security.md, "Writes beneath /proc"). What
any wider rule must not open: PID 1's /proc/1/mem and task/1/mem to its children.
"""

import os
import shutil
import tempfile

import pytest

from integration.ids import tagged, unique_id
from integration.security.conftest import ProbeRunner, build_probe

SOURCE = os.path.join(os.path.dirname(__file__), "probes", "procself.c")
PROFILES = ["ci-runner", "web-server", "hostile-tenant"]
PID_1S_OWN = ("own_comm", "own_thread_comm", "own_oom_score_adj_raise")
NOT_YET = ("later_thread_name", "child_comm", "child_oom_score_adj_raise")
PARENTS_MEMORY = ("child_opens_parent_mem", "child_opens_parent_task_mem")


@pytest.fixture(scope="module")
def outcomes(zviz_bin, runc_bin):
    """outcomes(runtime, profile) -> {what: "ok" or an errno name, "comm_now": name}, each
    container run at most once per module."""
    base = tempfile.mkdtemp(prefix=tagged("zviz-procself") + "-")
    # The container's root is an unprivileged host uid: it must reach the bundle.
    os.chmod(base, 0o755)
    runner = ProbeRunner(base, build_probe(SOURCE), os.environ.get("ZVIZ_BIN", zviz_bin), runc_bin)
    seen = {}

    def run(runtime, profile):
        if (runtime, profile) not in seen:
            result = runner.run(runtime, profile, ["/probe"], cid=unique_id("zviz-procself"))
            lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
            assert "done" in result.stdout.splitlines(), (result.stdout, result.stderr)
            assert lines.get("pid") == "1", result.stdout
            seen[runtime, profile] = lines
        return seen[runtime, profile]

    try:
        yield run
    finally:
        shutil.rmtree(base, ignore_errors=True)


def pick(got: dict, keys) -> dict:
    return {key: got.get(key) for key in keys}


@pytest.mark.parametrize("runtime,profile", [("runc", None)] + [("zviz", p) for p in PROFILES])
def test_pid_1_names_itself_and_raises_its_oom_score(outcomes, runtime, profile):
    got = outcomes(runtime, profile)
    assert pick(got, PID_1S_OWN) == dict.fromkeys(PID_1S_OWN, "ok"), got
    assert got["comm_now"] == "main-thread", got


@pytest.mark.parametrize("profile", PROFILES)
def test_pid_1s_memory_stays_closed_to_its_children(outcomes, profile):
    got = outcomes("zviz", profile)
    assert pick(got, PARENTS_MEMORY) == dict.fromkeys(PARENTS_MEMORY, "EACCES"), got


def test_runc_baseline_lets_threads_children_and_memory_through(outcomes):
    """Without Landlock every write below succeeds: the checks above and the xfails
    below can fail."""
    got = outcomes("runc", None)
    everything = NOT_YET + PARENTS_MEMORY
    assert pick(got, everything) == dict.fromkeys(everything, "ok"), got


@pytest.mark.xfail(
    strict=True,
    reason="issue 14 item 2: Landlock rules name inodes; a thread made after "
    "landlock_restrict_self and a child process have /proc entries no rule names, and a "
    "rule on a directory above them would open /proc/1/mem to PID 1's children",
)
@pytest.mark.parametrize("profile", PROFILES)
def test_later_threads_and_children_write_their_own(outcomes, profile):
    got = outcomes("zviz", profile)
    assert pick(got, NOT_YET) == dict.fromkeys(NOT_YET, "ok"), got
