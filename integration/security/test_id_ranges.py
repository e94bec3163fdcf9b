"""Host id ranges per container (issue 10, suspicion "every container maps root to 100000").

Confirmed: under the shared default every container's root is host uid 100000, so
containers of different tenants own each other's files on shared storage. With
`id_ranges = "container"` in the shim config each container gets its own range from the
operator's pool (shim/idpool.py), released when it is deleted.
"""

import os

import pytest

from integration.ids import unique_id
from shim import idpool

pytestmark = pytest.mark.containerd

ZVIZ = "io.containerd.zviz.v2"
# Fixed, not tagged: a pool is host uids, and its reservations (idpool.POOL_DIR, one file
# per range start) are machine-wide, so a number cannot carry the session tag. No profile
# and no other test allocates here; the ranges taken are given back when each test ends.
POOL_FIRST = 7100000


def host_root(containerd, cid: str) -> int:
    _, pid = next(
        (line.split()[2], int(line.split()[1]))
        for line in containerd.ctr("tasks", "ls").stdout.splitlines()[1:]
        if line.split()[:1] == [cid]
    )
    with open(f"/proc/{pid}/uid_map") as f:
        return int(f.read().split()[1])


def run_two(containerd, image, config_path=None) -> dict[str, int]:
    """Two containers running at once: {id: host uid of its root}."""
    ids = [unique_id("zviz-ids") for _ in range(2)]
    flags = ["--runtime-config-path", config_path] if config_path else []
    try:
        for cid in ids:
            containerd.ctr("run", "-d", "--runtime", ZVIZ, *flags, image, cid, "sleep", "1000")
        roots = {cid: host_root(containerd, cid) for cid in ids}
        # An exec'd process joins its container's namespace: the same range.
        execd = containerd.ctr(
            "tasks", "exec", "--exec-id", "uid-map", ids[0], "cat", "/proc/self/uid_map"
        )
        assert int(execd.stdout.split()[1]) == roots[ids[0]], execd.stdout
        return roots
    finally:
        for cid in ids:
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            containerd.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
            containerd.ctr("containers", "delete", cid, check=False)


def test_shared_range_by_default_own_range_per_container_when_configured(
    containerd, busybox_image, tmp_path
):
    shared = run_two(containerd, busybox_image)
    assert set(shared.values()) == {100000}, shared  # the suspicion, confirmed

    config = tmp_path / "own-ranges.toml"
    config.write_text(
        f'id_ranges = "container"\nid_pool_first = {POOL_FIRST}\nid_pool_ranges = 4\n'
    )
    own = run_two(containerd, busybox_image, str(config))
    starts = sorted(own.values())
    assert len(set(starts)) == 2, own
    for start in starts:
        assert POOL_FIRST <= start < POOL_FIRST + 4 * idpool.RANGE_SIZE, own
        assert (start - POOL_FIRST) % idpool.RANGE_SIZE == 0, own
        # Deleting the container gave its range back.
        assert not os.path.exists(os.path.join(idpool.POOL_DIR, str(start)))


def test_an_exhausted_pool_fails_create_with_a_clear_error(containerd, busybox_image, tmp_path):
    config = tmp_path / "one-range.toml"
    first = POOL_FIRST + 16 * idpool.RANGE_SIZE
    config.write_text(f'id_ranges = "container"\nid_pool_first = {first}\nid_pool_ranges = 1\n')
    cids = [unique_id("zviz-ids-full") for _ in range(2)]
    try:
        flags = ["--runtime", ZVIZ, "--runtime-config-path", str(config), busybox_image]
        containerd.ctr("run", "-d", *flags, cids[0], "sleep", "1000")
        second = containerd.ctr("run", "-d", *flags, cids[1], "sleep", "1000", check=False)
        assert second.returncode != 0
        assert "id pool: all 1 ranges" in second.stderr, second.stderr
    finally:
        for cid in cids:
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            containerd.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
            containerd.ctr("containers", "delete", cid, check=False)
    assert not os.path.exists(os.path.join(idpool.POOL_DIR, str(first)))
