"""The shared `zviz` parent cgroup (issue 16: empty `zviz` parents accumulated).

Who removes it: the destroy of a container's group (runtime/cgroups/common.py,
remove_shared_parent) tries to rmdir the `zviz` level above it, and leaves it when
another container's group is in it (EBUSY). A create racing that rmdir finds the level
gone (ENOENT, or ENODEV writing into it) and makes it again (make_dirs). So the parent
exists exactly while a container's group is in it: nothing accumulates, no create fails.

Tested on real groups in every hierarchy, below a tagged level of the test's own
(`/<tagged>/zviz/<id>`), so the machine's own `/zviz` (other runs') is not involved and
the test can see its `zviz` go.
"""

import os
import threading

from integration.ids import tagged, unique_id
from runtime import cgroups
from runtime.cgroups.common import SHARED_PARENT_NAME

WORKERS = 4
ROUNDS = 25


def _group(top: str):
    container_id = unique_id("zviz-rel-parent")
    return cgroups.for_container(container_id, f"/{top}/{SHARED_PARENT_NAME}/{container_id}")


def _levels(group, up: int) -> set[str]:
    found = set()
    for path in group.paths.values():
        for _ in range(up):
            path = os.path.dirname(path)
        found.add(path)
    return found


def test_creates_racing_the_last_destroy_all_succeed_and_the_parent_goes():
    top = tagged("zviz-rel-parent")
    probe = _group(top)
    parents, tops = _levels(probe, 1), _levels(probe, 2)
    failures: list[BaseException] = []
    made = [0]

    def churn():
        try:
            for _ in range(ROUNDS):
                group = _group(top)
                group.create()
                made[0] += 1
                # Inside its group, the parent must exist in every hierarchy.
                assert all(os.path.isdir(os.path.dirname(p)) for p in group.paths.values())
                group.destroy()
        except BaseException as failure:  # noqa: BLE001 - reported by the test thread
            failures.append(failure)

    threads = [threading.Thread(target=churn) for _ in range(WORKERS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "a create or destroy hung"
        assert failures == [], failures
        assert made[0] == WORKERS * ROUNDS
        # The last destroy removed the shared parent, in every hierarchy.
        assert sorted(p for p in parents if os.path.isdir(p)) == []
    finally:
        for path in sorted(parents | tops, key=len, reverse=True):
            try:
                os.rmdir(path)  # the test's own levels (the tagged top is never zviz's)
            except (FileNotFoundError, OSError):
                pass


def test_a_parent_holding_another_group_stays():
    top = tagged("zviz-rel-parent")
    first, second = _group(top), _group(top)
    parents, tops = _levels(first, 1), _levels(first, 2)
    try:
        first.create()
        second.create()
        first.destroy()
        assert all(os.path.isdir(p) for p in parents), "removed under another group"
        second.destroy()
        assert sorted(p for p in parents if os.path.isdir(p)) == []
    finally:
        for group in (first, second):
            group.destroy()
        for path in sorted(parents | tops, key=len, reverse=True):
            try:
                os.rmdir(path)
            except OSError:
                pass
