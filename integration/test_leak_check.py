"""The end-of-session leak check (integration/leaks.py) against real leftovers.

It must report what carries this session's tag (in a name, or inherited in the
environment) and nothing of another session's or program's, even when that is named
like ours. Each leftover made here is removed again by the test.
"""

import os
import subprocess
import uuid

import pytest

from integration.cgroup_checks import CGROUP_ROOT, host_version
from integration.ids import TAG_VARIABLE, new_session_tag, session_tag
from integration.leaks import leftovers
from runtime import linux


@pytest.fixture
def other_tag() -> str:
    """The tag of some other test run or benchmark on this machine."""
    tag = new_session_tag()
    assert tag != session_tag()
    return tag


@pytest.fixture
def cleanup():
    undo = []
    yield undo.append
    for step in reversed(undo):
        step()


def cgroup_top() -> str:
    # v1: the pids hierarchy, which any host zviz supports mounts
    return os.path.join(CGROUP_ROOT, "pids") if host_version() == 1 else CGROUP_ROOT


def make_cgroup(name: str, cleanup) -> str:
    path = os.path.join(cgroup_top(), name)
    os.mkdir(path)
    cleanup(lambda: os.rmdir(path))
    return path


def make_mount(path: str, cleanup) -> str:
    os.mkdir(path)
    linux.mount("tmpfs", path, "tmpfs", 0, "size=64k")
    cleanup(lambda: linux.umount2(path, 0))
    return path


def start_sleeper(argv0: str, env_tag: str, cleanup) -> int:
    proc = subprocess.Popen(
        [argv0, "60"], executable="/bin/sleep", env=dict(os.environ, **{TAG_VARIABLE: env_tag})
    )

    def stop():
        proc.kill()
        proc.wait(timeout=10)

    cleanup(stop)
    return proc.pid


def test_ours_is_reported_and_another_sessions_is_not(tmp_path, other_tag, cleanup):
    ours, theirs = session_tag(), other_tag
    our_cgroup = make_cgroup(f"zviz-leakprobe-{ours}", cleanup)
    their_cgroup = make_cgroup(f"zviz-leakprobe-{theirs}", cleanup)
    our_mount = make_mount(str(tmp_path / f"zviz-leakprobe-{ours}"), cleanup)
    their_mount = make_mount(str(tmp_path / f"zviz-leakprobe-{theirs}"), cleanup)
    named_ours = start_sleeper(f"zviz-leakprobe-{ours}", theirs, cleanup)
    inherits_ours = start_sleeper("zviz-leakprobe", ours, cleanup)  # a shim, say
    named_theirs = start_sleeper(f"zviz-leakprobe-{theirs}", theirs, cleanup)

    found = leftovers(ours, exclude_pids={os.getpid()})
    assert f"cgroup {our_cgroup}" in found
    assert f"mount {our_mount}" in found
    found_pids = {int(item.split()[1]) for item in found if item.startswith("process ")}
    assert {named_ours, inherits_ours} <= found_pids
    # named zviz-... like ours, but another session's: not reported
    assert f"cgroup {their_cgroup}" not in found
    assert f"mount {their_mount}" not in found
    assert named_theirs not in found_pids

    # the other session's check sees exactly the other side
    found_by_them = leftovers(theirs, exclude_pids={os.getpid()})
    assert f"cgroup {their_cgroup}" in found_by_them
    assert f"mount {their_mount}" in found_by_them
    assert f"cgroup {our_cgroup}" not in found_by_them


def test_a_tagged_group_is_reported_once_with_its_sub_groups_and_deep_ones_too(cleanup):
    # a container's sub-groups go with it: one line, the container's group
    group = make_cgroup(f"zviz-leakprobe-{session_tag()}", cleanup)
    make_cgroup(f"{os.path.basename(group)}/inner", cleanup)
    # a pod's container, kubelet-style: tagged below untagged levels
    pod = make_cgroup(f"zviz-leakprobe-pod{uuid.uuid4().hex[:8]}", cleanup)
    deep = make_cgroup(f"{os.path.basename(pod)}/ctr-{session_tag()}", cleanup)
    found = [item for item in leftovers(session_tag()) if "zviz-leakprobe" in item]
    assert sorted(found) == sorted([f"cgroup {group}", f"cgroup {deep}"])
