"""Cgroup assertions that hold on v1 and v2 alike, and the layout facts they need.

Used by integration/test_cgroups.py and test_limits.py on this host, and by the cgroup v2
guest (cgroups_v2_guest.py) on a second kernel: plain functions with asserts and no
pytest, so the guest (where pytest costs ~20 s to start) runs the very same checks.

The layout is read from the mount itself, not from runtime.cgroups (the code under test),
and the expected file names are written out here, not imported from it: a wrong name in
the runtime then fails a test instead of agreeing with itself.
"""

import os

from runtime.cgroups.v2 import blkio_weight_to_io_weight, shares_to_weight
from runtime.errors import InvalidArgument

MiB = 1024 * 1024
CGROUP_ROOT = "/sys/fs/cgroup"

# The block I/O weight file each version may offer, in the order zviz prefers them.
WEIGHT_FILES = {1: ("blkio.weight", "blkio.bfq.weight"), 2: ("io.bfq.weight", "io.weight")}


def host_version() -> int:
    """2 when /sys/fs/cgroup is itself the unified hierarchy, else 1 (v1 or hybrid)."""
    return 2 if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")) else 1


def group_dir(cg, controller: str) -> str:
    """The directory of `cg` that holds `controller`'s files (v2: its only directory)."""
    return cg.paths[controller] if cg.version == 1 else cg.paths["unified"]


def cgroup_file(cg, controller: str, v1_name: str, v2_name: str | None = None) -> str:
    """A file of `cg` by its name on each version (the same name on both if v2_name is None)."""
    name = v1_name if cg.version == 1 else (v2_name or v1_name)
    return os.path.join(group_dir(cg, controller), name)


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def kernel_says_frozen(cg) -> bool:
    """The freezer state as the kernel reports it (not through cg.frozen())."""
    text = read(cgroup_file(cg, "freezer", "freezer.state", "cgroup.events"))
    return text == "FROZEN" if cg.version == 1 else "frozen 1" in text.splitlines()


def check_apply_writes_the_limits(cg) -> None:
    """One config's limits land in the files each version names them by."""
    cg.apply(
        {
            "memory": {"limit": 64 * MiB, "swap": 96 * MiB, "reservation": 32 * MiB},
            "pids": {"limit": 20},
            "cpu": {"shares": 256, "quota": 20000, "period": 100000, "cpus": "0", "mems": "0"},
        }
    )
    # (controller, v1 file, v1 value, v2 file, v2 value)
    expected = [
        ("memory", "memory.limit_in_bytes", str(64 * MiB), "memory.max", str(64 * MiB)),
        # OCI swap is memory+swap: v1 takes it as is, v2 wants the swap alone
        ("memory", "memory.memsw.limit_in_bytes", str(96 * MiB), "memory.swap.max", str(32 * MiB)),
        ("memory", "memory.soft_limit_in_bytes", str(32 * MiB), "memory.low", str(32 * MiB)),
        ("pids", "pids.max", "20", "pids.max", "20"),
        ("cpu", "cpu.shares", "256", "cpu.weight", str(shares_to_weight(256))),
        ("cpu", "cpu.cfs_quota_us", "20000", "cpu.max", "20000 100000"),
        ("cpuset", "cpuset.cpus", "0", "cpuset.cpus", "0"),
    ]
    for controller, v1_name, v1_value, v2_name, v2_value in expected:
        path = cgroup_file(cg, controller, v1_name, v2_name)
        want = v1_value if cg.version == 1 else v2_value
        assert read(path) == want, f"{path}: {read(path)!r} != {want!r}"


def check_block_io_throttle(cg, device: tuple[int, int], absent: tuple[int, int]) -> None:
    """A read-bandwidth limit reaches the kernel; one for a device this host lacks is refused."""
    major, minor = device
    cg.apply(
        {"blockIO": {"throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": MiB}]}}
    )
    line = read(cgroup_file(cg, "blkio", "blkio.throttle.read_bps_device", "io.max")).split()
    # v1: "8:0 1048576"; v2: "8:0 rbps=1048576 wbps=max riops=max wiops=max"
    rate = str(MiB) if cg.version == 1 else f"rbps={MiB}"
    assert line[:2] == [f"{major}:{minor}", rate], line
    rule = [{"major": absent[0], "minor": absent[1], "rate": 1}]
    try:
        cg.apply({"blockIO": {"throttleReadBpsDevice": rule}})
    except InvalidArgument as err:
        assert "throttleReadBpsDevice[0]" in str(err) and "No such device" in str(err), err
    else:
        raise AssertionError(f"a limit for the absent device {absent} was accepted")
    assert cg.exists(), "a refused update must not remove a configured group"


def offered_weight_file(cg) -> str | None:
    """The weight file this kernel offers in `cg`, by zviz's order of preference."""
    directory = group_dir(cg, "blkio")
    present = [f for f in WEIGHT_FILES[cg.version] if os.path.exists(os.path.join(directory, f))]
    return present[0] if present else None


def check_block_io_weight_applies(cg) -> str:
    """blockIO.weight lands in the weight file the kernel offers; returns that file."""
    file = offered_weight_file(cg)
    assert file, "no weight file here: check_block_io_weight_is_refused is the check to run"
    cg.apply({"blockIO": {"weight": 500}})
    # io.cost's io.weight has its own scale ("default N"); CFQ and BFQ take blkio's
    value = str(blkio_weight_to_io_weight(500) if file == "io.weight" else 500)
    text = read(os.path.join(group_dir(cg, "blkio"), file))
    assert value in text.split(), f"{file}: {text!r} lacks {value}"
    return file


def check_block_io_weight_is_refused(cg) -> str:
    """Where no weight file exists, blockIO.weight is an InvalidArgument naming the field
    and every file looked for; returns the message."""
    assert offered_weight_file(cg) is None
    cg.apply({"pids": {"limit": 10}})  # configured: a refused update must then keep it
    try:
        cg.apply({"blockIO": {"weight": 500}})
    except InvalidArgument as err:
        message = str(err)
    else:
        raise AssertionError("a weight was accepted by a kernel that offers no weight file")
    assert "linux.resources.blockIO.weight" in message, message
    for file in WEIGHT_FILES[cg.version]:
        assert file in message, message
    assert cg.exists(), "a refused update must not remove a configured group"
    return message
