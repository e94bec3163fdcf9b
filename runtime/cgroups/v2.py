"""cgroup v2: one directory in the unified hierarchy, controllers delegated from its parents."""

import errno
import os
import signal
import time

from runtime.cgroups import devices as device_rules
from runtime.cgroups.common import (
    FREEZE_TIMEOUT_S,
    THROTTLE_KEYS,
    Cgroup,
    OomWatcher,
    Write,
    asks_block_weight,
    make_dirs,
    no_weight_file,
    offered_file,
    read_file,
    read_int,
    read_keyed,
    read_pids,
    removed_meanwhile,
    write_file,
)
from runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

# What a read of "max" reports in stats, as containerd's v2 Metrics do.
UNLIMITED = 2**64 - 1

# The block I/O weight file, by preference: BFQ's (once the bfq scheduler is loaded),
# then io.cost's; with neither, the kernel has no per-group weight.
WEIGHT_FILES = ("io.bfq.weight", "io.weight")


def shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144) to cpu.weight (1..10000), the linear map runc uses."""
    if shares == 0:
        return 0
    return 1 + ((shares - 2) * 9999) // 262142


def blkio_weight_to_io_weight(weight: int) -> int:
    """blkio.weight (10..1000) to io.weight (1..10000), as runc maps it."""
    if weight == 0:
        return 0
    return 1 + (weight - 10) * 9999 // 990


def swap_to_v2(swap: int | None, limit: int | None) -> int | None:
    """OCI memory.swap (memory+swap, the v1 meaning) to memory.swap.max (swap alone).

    Both as validated by runtime/spec.py (swap at least the limit when both are set); a
    swap without a limit is the update that only names swap: v2 cannot convert it.
    """
    if limit == -1 and swap is None:
        return -1  # unlimited memory: unlimited swap too
    if swap is None or swap == -1:
        return swap
    if limit is None or limit == -1:
        raise InvalidArgument(
            "config.json: linux.resources.memory.swap: on cgroup v2 a swap limit needs the "
            "memory limit beside it (memory.swap.max holds swap alone: swap - limit)"
        )
    return swap - limit


def _bytes(value: int) -> str:
    return "max" if value == -1 else str(value)


def plan(
    resources,
    *,
    available: frozenset[str] = frozenset({"cpu", "cpuset", "io", "memory", "pids", "hugetlb"}),
    swap_available: bool = True,
    weight_file: str | None = "io.weight",
    notes: list[str] | None = None,
) -> list[Write]:
    """The cgroup v2 file writes, in order, that apply OCI linux.resources.

    `resources` is a spec.Resources: validated by runtime/spec.py, so what is checked
    here is only what this host offers and what v2 cannot express. Pure: `available` is
    the group's cgroup.controllers, `swap_available` whether memory.swap.max exists,
    `weight_file` the one of WEIGHT_FILES the group has, or None.
    """
    writes: list[Write] = []
    notes = [] if notes is None else notes
    if resources is None:
        return writes

    def need(controller: str, field: str) -> bool:
        if controller in available:
            return True
        raise InvalidArgument(
            f"config.json: linux.resources.{field}: the {controller} controller is not "
            "available to this cgroup (see cgroup.controllers of its parent)"
        )

    def add(controller: str, file: str, value: str, field: str) -> None:
        if need(controller, field):
            writes.append(Write("unified", file, value, field))

    memory = resources.memory
    if memory is not None:
        limit = memory.limit or None  # 0: leave alone
        swap = swap_to_v2(memory.swap or None, limit)
        reservation = memory.reservation or None
        if memory.swappiness is not None:
            notes.append(
                "linux.resources.memory.swappiness ignored: cgroup v2 has no per-group knob"
            )
        if memory.disable_oom_killer:
            notes.append(
                "linux.resources.memory.disableOOMKiller ignored: not available on cgroup v2"
            )
        for key, value in (("kernel", memory.kernel), ("kernelTCP", memory.kernel_tcp)):
            if value:
                notes.append(
                    f"linux.resources.memory.{key} ignored: kernel memory limits are obsolete"
                )
        if limit is not None:
            add("memory", "memory.max", _bytes(limit), "memory.limit")
        if swap is not None:
            if swap_available:
                add("memory", "memory.swap.max", _bytes(swap), "memory.swap")
            elif swap != -1:
                raise InvalidArgument(
                    "config.json: linux.resources.memory.swap: this kernel has no swap accounting "
                    "(memory.swap.max is missing)"
                )
        if reservation is not None:
            add("memory", "memory.low", _bytes(reservation), "memory.reservation")

    pids_limit = resources.pids.limit if resources.pids is not None else None
    if pids_limit:
        add("pids", "pids.max", str(pids_limit) if pids_limit > 0 else "max", "pids.limit")

    cpu = resources.cpu
    if cpu is not None:
        if cpu.shares:
            # v1's kernel clamps shares into 2..262144; do the same so a config means one thing.
            shares = min(max(cpu.shares, 2), 262144)
            add("cpu", "cpu.weight", str(shares_to_weight(shares)), "cpu.shares")
        if cpu.quota or cpu.period:
            value = str(cpu.quota) if cpu.quota and cpu.quota > 0 else "max"
            if cpu.period:
                value += f" {cpu.period}"
            add("cpu", "cpu.max", value, "cpu.quota" if cpu.quota else "cpu.period")
        if cpu.burst is not None:
            add("cpu", "cpu.max.burst", str(cpu.burst), "cpu.burst")
        if cpu.idle is not None:
            add("cpu", "cpu.idle", str(cpu.idle), "cpu.idle")
        for key, value in (
            ("realtimeRuntime", cpu.realtime_runtime),
            ("realtimePeriod", cpu.realtime_period),
        ):
            if value:
                raise InvalidArgument(
                    f"config.json: linux.resources.cpu.{key}: real-time CPU limits are not "
                    "available on cgroup v2"
                )
        for key, value in (("cpus", cpu.cpus), ("mems", cpu.mems)):
            if value:
                add("cpuset", f"cpuset.{key}", value, f"cpu.{key}")

    # devices: not a file write on v2 but an eBPF program, attached by CgroupV2.apply

    block_io = resources.block_io

    def io_weight(value: int, field: str) -> str:
        # a missing io controller is the error to report, not the weight files it would bring
        if need("io", field) and weight_file is None:
            raise no_weight_file(field, WEIGHT_FILES)
        # BFQ takes blkio's 1..1000 scale; io.cost's io.weight has its own 1..10000
        return str(value if weight_file == "io.bfq.weight" else blkio_weight_to_io_weight(value))

    if block_io is not None:
        if block_io.weight:
            add(
                "io",
                weight_file,
                io_weight(block_io.weight, "blockIO.weight"),
                "blockIO.weight",
            )
        for i, dev in enumerate(block_io.weight_device):
            field = f"blockIO.weightDevice[{i}]"
            if dev.weight:
                add(
                    "io",
                    weight_file,
                    f"{dev.major}:{dev.minor} {io_weight(dev.weight, field)}",
                    field,
                )
        for key, attribute in THROTTLE_KEYS:
            io_key = _IO_MAX_KEYS[key]
            for i, dev in enumerate(getattr(block_io, attribute)):
                field = f"blockIO.{key}[{i}]"
                rate = dev.rate or "max"
                add("io", "io.max", f"{dev.major}:{dev.minor} {io_key}={rate}", field)

    for i, entry in enumerate(resources.hugepage_limits):
        if "hugetlb" in available:
            writes.append(
                Write(
                    "unified",
                    f"hugetlb.{entry.page_size}.max",
                    str(entry.limit),
                    f"hugepageLimits[{i}]",
                )
            )
        else:
            notes.append("linux.resources.hugepageLimits ignored: hugetlb controller not available")
    if resources.network is not None and (
        resources.network.class_id is not None or resources.network.priorities
    ):
        notes.append("linux.resources.network ignored: net_cls/net_prio do not exist on cgroup v2")
    if resources.rdma:
        notes.append("linux.resources.rdma ignored: rdma limits are not supported by zviz")

    # Keys are controller files (spec.py refuses cgroup.procs and anything leaving the group).
    for key, value in resources.unified.items():
        add(key.split(".", 1)[0], key, value, f"unified.{key}")
    return writes


_IO_MAX_KEYS = {
    "throttleReadBpsDevice": "rbps",
    "throttleWriteBpsDevice": "wbps",
    "throttleReadIOPSDevice": "riops",
    "throttleWriteIOPSDevice": "wiops",
}


class OomWatcherV2(OomWatcher):
    """Readable when memory.events changes; read() returns the new oom_kill events."""

    def __init__(self, directory: str):
        from runtime import linux

        self._events = os.path.join(directory, "memory.events")
        self._fd = linux.inotify_init1(linux.IN_CLOEXEC | linux.IN_NONBLOCK)
        try:
            linux.inotify_add_watch(self._fd, self._events, linux.IN_MODIFY)
        except BaseException:
            os.close(self._fd)
            raise
        self._seen = read_keyed(self._events).get("oom_kill", 0)

    def read(self) -> int:
        try:
            while os.read(self._fd, 4096):
                pass
        except BlockingIOError:
            pass
        if not os.path.exists(self._events):
            return 0
        kills = read_keyed(self._events).get("oom_kill", 0)
        new, self._seen = kills - self._seen, kills
        return max(new, 0)


class CgroupV2(Cgroup):
    version = 2

    def __init__(self, directory: str, base_dir: str | None = None):
        self.directory = directory
        self.paths = {"unified": directory}
        self._base = base_dir or os.path.dirname(directory)
        self._created: list[str] = []

    def __repr__(self):
        return f"CgroupV2({self.directory})"

    def _dirs(self) -> list[str]:
        return [self.directory]

    def prepare_join(self) -> None:
        from runtime.cgroups import warm_up_attach

        warm_up_attach()

    def _procs_dir(self) -> str:
        return self.directory

    def _freezable(self) -> bool:
        return os.path.exists(os.path.join(self.directory, "cgroup.freeze"))

    def _file(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def create(self) -> None:
        def delegate(_parent: str, level: str) -> None:
            if level != self.directory:
                self._delegate_controllers(level)

        try:
            make_dirs(self.directory, self._base, self._created, delegate)
        except BaseException:
            self._create_failed = True
            for level in reversed(self._created):
                try:
                    os.rmdir(level)
                except OSError as err:
                    if err.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                        raise
            self._created.clear()
            raise

    def _delegate_controllers(self, level: str) -> None:
        """Passes every controller `level` has on to its children (the groups below our path)."""
        offered = set(read_file(os.path.join(level, "cgroup.controllers")).split())
        enabled = set(read_file(os.path.join(level, "cgroup.subtree_control")).split())
        missing = sorted(offered - enabled)
        if not missing:
            return
        try:
            write_file(
                os.path.join(level, "cgroup.subtree_control"), " ".join(f"+{c}" for c in missing)
            )
        except OSError as err:
            # e.g. EBUSY: a group holding processes cannot delegate (no internal
            # processes rule); resources needing the controller then fail by name.
            self.note(f"cgroup {level}: could not enable {missing}: {err}")

    def controllers(self) -> frozenset[str]:
        try:
            return frozenset(read_file(self._file("cgroup.controllers")).split())
        except FileNotFoundError:
            return frozenset()

    def _planned_writes(self, resources, notes: list[str]) -> list[tuple[Write, str]]:
        writes = plan(
            resources,
            available=self.controllers(),
            swap_available=os.path.exists(self._file("memory.swap.max")),
            weight_file=offered_file(self.directory, WEIGHT_FILES)
            if asks_block_weight(resources)
            else None,
            notes=notes,
        )
        return [(write, self.directory) for write in writes]

    def _after_writes(self, resources) -> None:
        if resources.devices is not None:
            device_rules.enforce(self.directory, device_rules.container_rules(resources.devices))

    def add_pid(self, pid: int) -> None:
        try:
            write_file(self._file("cgroup.procs"), str(pid))
        except ProcessLookupError:
            raise NotFound(f"process {pid} does not exist") from None

    def pids(self) -> list[int]:
        return read_pids(self._file("cgroup.procs"))

    def freeze(self) -> None:
        self._set_frozen(True)

    def thaw(self) -> None:
        self._set_frozen(False)

    def _set_frozen(self, frozen: bool) -> None:
        try:
            write_file(self._file("cgroup.freeze"), "1" if frozen else "0")
        except FileNotFoundError:
            raise FailedPrecondition(
                f"cgroup {self.directory}: no cgroup.freeze (kernel older than 5.2 or group gone)"
            ) from None
        deadline = time.monotonic() + FREEZE_TIMEOUT_S
        delay = 0.0005
        while self.frozen() != frozen:
            if time.monotonic() > deadline:
                if frozen:
                    write_file(self._file("cgroup.freeze"), "0")
                raise Unavailable(
                    f"cgroup {self.directory} did not {'freeze' if frozen else 'thaw'} "
                    f"within {FREEZE_TIMEOUT_S:.0f}s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def frozen(self) -> bool:
        return read_keyed(self._file("cgroup.events")).get("frozen", 0) == 1

    def kill_all(self, sig: int) -> None:
        kill_file = self._file("cgroup.kill")
        if sig == signal.SIGKILL and os.path.exists(kill_file):
            # One write kills the whole subtree atomically, forks in flight included.
            try:
                write_file(kill_file, "1")
            except OSError as error:
                if not removed_meanwhile(error, self.directory):
                    raise
            return
        super().kill_all(sig)

    def oom_kill_count(self) -> int:
        return read_keyed(self._file("memory.events")).get("oom_kill", 0)

    def oom_watcher(self) -> OomWatcherV2:
        return OomWatcherV2(self.directory)

    def pids_limit_hits(self) -> int:
        return read_keyed(self._file("pids.events")).get("max", 0)

    def limit(self, kind: str) -> int:
        return read_int(self._file({"pids": "pids.max", "memory": "memory.max"}[kind]))

    def stats(self) -> dict:
        stats: dict = {"version": 2}
        stat = read_keyed(self._file("memory.stat"))
        events = read_keyed(self._file("memory.events"))
        if os.path.exists(self._file("memory.current")):
            stats["memory"] = {
                "usage": read_int(self._file("memory.current")),
                "limit": read_int(self._file("memory.max"), max_value=UNLIMITED),
                "max_usage": read_int(self._file("memory.peak")),
                # v2 has no failcnt; hitting memory.max is the nearest count
                "failcnt": events.get("max", 0),
                "cache": stat.get("file", 0),
                "rss": stat.get("anon", 0),
                "swap_usage": read_int(self._file("memory.swap.current")),
                "swap": {
                    "usage": read_int(self._file("memory.swap.current")),
                    "limit": read_int(self._file("memory.swap.max"), max_value=UNLIMITED),
                },
                "stat": stat,
            }
            stats["memory_events"] = {
                key: events.get(key, 0) for key in ("low", "high", "max", "oom", "oom_kill")
            }
            stats["oom_kill"] = events.get("oom_kill", 0)
        if os.path.exists(self._file("pids.current")):
            stats["pids"] = {
                "current": read_int(self._file("pids.current")),
                "limit": read_int(self._file("pids.max"), max_value=0),
            }
        cpu_stat = read_keyed(self._file("cpu.stat"))
        stats["cpu"] = {
            "usage_ns": cpu_stat.get("usage_usec", 0) * 1000,
            "user_ns": cpu_stat.get("user_usec", 0) * 1000,
            "system_ns": cpu_stat.get("system_usec", 0) * 1000,
            "periods": cpu_stat.get("nr_periods", 0),
            "throttled_periods": cpu_stat.get("nr_throttled", 0),
            "throttled_ns": cpu_stat.get("throttled_usec", 0) * 1000,
        }
        stats["io"] = _io_stat(self._file("io.stat"))
        return stats


def _io_stat(path: str) -> list[dict]:
    """io.stat lines ("8:0 rbytes=1 wbytes=2 rios=3 wios=4 ...") as containerd's IOEntry."""
    entries = []
    try:
        text = read_file(path)
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        device, *pairs = line.split()
        major, _, minor = device.partition(":")
        entry = {"major": int(major), "minor": int(minor)}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key in ("rbytes", "wbytes", "rios", "wios") and value.isdigit():
                entry[key] = int(value)
        entries.append(entry)
    return entries
