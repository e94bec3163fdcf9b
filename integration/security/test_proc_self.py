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

import json
import os
import shutil
import signal
import subprocess
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
def runner(zviz_bin, runc_bin):
    base = tempfile.mkdtemp(prefix=tagged("zviz-procself") + "-")
    # The container's root is an unprivileged host uid: it must reach the bundle.
    os.chmod(base, 0o755)
    try:
        yield ProbeRunner(base, build_probe(SOURCE), os.environ.get("ZVIZ_BIN", zviz_bin), runc_bin)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def parse(stdout: str) -> dict:
    return dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)


@pytest.fixture(scope="module")
def outcomes(runner):
    """outcomes(runtime, profile) -> {what: "ok" or an errno name, "comm_now": name}, each
    container run at most once per module."""
    seen = {}

    def run(runtime, profile):
        if (runtime, profile) not in seen:
            result = runner.run(runtime, profile, ["/probe"], cid=unique_id("zviz-procself"))
            lines = parse(result.stdout)
            assert "done" in result.stdout.splitlines(), (result.stdout, result.stderr)
            assert lines.get("pid") == "1", result.stdout
            seen[runtime, profile] = lines
        return seen[runtime, profile]

    return run


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


def test_the_rules_outlive_procfs_dentries(runner):
    """procfs gives a /proc/<pid> entry a new inode each time it is looked up again, and
    drops unused dentries under memory pressure: without the bind mount that pins each
    file, the rule (on the old inode) lapses. The host drops its dentry cache while PID 1
    waits; PID 1 then writes again. (drop_caches 2 frees only reclaimable dentries and
    inodes, host-wide: nothing is lost, lookups just get slower for a moment.)"""
    bundle = runner.bundle(["/probe", "again"])
    container_id = unique_id("zviz-procself")
    zviz = [runner.zviz, "--root", os.path.join(runner.base, "root-zviz")]
    run = subprocess.Popen(
        [*zviz, "run", "--bundle", bundle, "--profile", "ci-runner", container_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        before = []
        # PID 1 gives up waiting after 30 s, so this loop ends.
        for line in run.stdout:
            before.append(line.strip())
            if before[-1] == "waiting":
                break
        assert before[-1:] == ["waiting"], before
        assert parse("\n".join(before))["own_comm"] == "ok", before
        state = subprocess.run([*zviz, "state", container_id], capture_output=True, text=True)
        pid = json.loads(state.stdout)["pid"]
        for _ in range(3):  # a dentry referenced since the last pass survives one
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
        os.kill(pid, signal.SIGUSR1)
        after, errors = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        subprocess.run([*zviz, "delete", "-f", container_id], capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)
    got = parse(after)
    again = ("again_own_comm", "again_own_oom_score_adj_raise")
    assert pick(got, again) == dict.fromkeys(again, "ok"), (after, errors)
