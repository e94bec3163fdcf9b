"""Block device numbers for tests: one this machine has, and one it provably lacks."""

import os

# The majors devices.txt sets aside for local and experimental use: no distribution
# driver claims them by default, so one absent here is absent by construction.
_LOCAL_MAJORS = range(240, 255)


def registered_block_majors() -> set[int]:
    """Majors with a block driver (/proc/devices) or a device node (/sys/dev/block)."""
    majors = set()
    with open("/proc/devices") as f:
        in_block = False
        for line in f:
            if line.startswith("Block devices:"):
                in_block = True
            elif in_block and line.split():
                majors.add(int(line.split()[0]))
    majors.update(int(entry.split(":")[0]) for entry in os.listdir("/sys/dev/block"))
    return majors


def absent_block_device() -> tuple[int, int]:
    """(major, minor) of a block device this machine does not have, checked, not assumed."""
    taken = registered_block_majors()
    for major in _LOCAL_MAJORS:
        if major not in taken:
            return major, 99
    raise RuntimeError(f"every local-use block major {list(_LOCAL_MAJORS)} is registered here")


def present_block_device() -> tuple[int, int] | None:
    """(major, minor) of a whole disk here (not a loop or ram device), or None."""
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith(("loop", "ram", "zram")):
            with open(f"/sys/block/{name}/dev") as f:
                major, minor = f.read().strip().split(":")
            return int(major), int(minor)
    return None
