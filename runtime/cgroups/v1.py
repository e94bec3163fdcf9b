"""cgroup v1: one directory per mounted hierarchy (cpu, memory, pids, freezer, devices...)."""

import errno
import os
import time

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
    procs_below,
    read_file,
    read_int,
    read_keyed,
    read_pids,
    write_file,
)
from runtime.cgroups.devices import container_rules
from runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

KNOWN_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)

# A controller the config needs but the host lacks is an error for these; for the
# others (per-host optional features) the setting is skipped with a logged note.
_OPTIONAL_CONTROLLERS = {"hugetlb", "net_cls", "net_prio", "rdma"}

# The block I/O weight file, by preference: CFQ's (kernels before 5.0), then BFQ's (once
# the bfq scheduler is loaded); with neither, the kernel has no per-group weight. Each
# has a per-device sibling named <file>_device.
WEIGHT_FILES = ("blkio.weight", "blkio.bfq.weight")


def _set(value: int | None) -> int | None:
    """A byte limit to write: absent/0 = leave alone (None), -1 = unlimited, else positive."""
    return value or None


def plan(
    resources,
    *,
    available: frozenset[str] = KNOWN_CONTROLLERS,
    memsw_available: bool = True,
    current_memory_limit: int | None = None,
    weight_file: str | None = WEIGHT_FILES[0],
    notes: list[str] | None = None,
) -> list[Write]:
    """The cgroup v1 file writes, in order, that apply OCI linux.resources.

    `resources` is a spec.Resources: validated by runtime/spec.py, so what is checked
    here is only what this host offers. Pure: what the host offers comes in as
    arguments. `current_memory_limit` decides whether the memory or the memory+swap limit
    is written first, since the kernel refuses any moment where memsw < memory.
    `weight_file` is the one of WEIGHT_FILES the blkio group has, or None.
    """
    writes: list[Write] = []
    notes = [] if notes is None else notes
    if resources is None:
        return writes

    def need(controller: str, field: str) -> bool:
        if controller in available:
            return True
        if controller in _OPTIONAL_CONTROLLERS:
            notes.append(f"linux.resources.{field} ignored: the {controller} cgroup is not mounted")
            return False
        raise InvalidArgument(
            f"config.json: linux.resources.{field}: the {controller} cgroup controller is not "
            "mounted on this host"
        )

    memory = resources.memory
    if memory is not None:
        limit, swap, reservation = _set(memory.limit), _set(memory.swap), _set(memory.reservation)
        for key, value in (("kernel", memory.kernel), ("kernelTCP", memory.kernel_tcp)):
            if value:
                notes.append(
                    f"linux.resources.memory.{key} ignored: kernel memory limits are obsolete"
                )
        if limit == -1 and swap is None and memsw_available:
            swap = -1  # "unlimited memory" means unlimited memory+swap too, as runc reads it
        if swap is not None and not memsw_available:
            if swap != -1:
                raise InvalidArgument(
                    "config.json: linux.resources.memory.swap: this kernel has no swap "
                    "accounting (memory.memsw.limit_in_bytes is missing)"
                )
            swap = None
        if (
            limit is not None
            or swap is not None
            or reservation is not None
            or memory.swappiness is not None
            or memory.disable_oom_killer
        ) and need("memory", "memory"):
            limit_write = limit is not None and Write(
                "memory", "memory.limit_in_bytes", str(limit), "memory.limit"
            )
            swap_write = swap is not None and Write(
                "memory", "memory.memsw.limit_in_bytes", str(swap), "memory.swap"
            )
            swap_first = (
                limit_write
                and swap_write
                and (
                    swap == -1 or (current_memory_limit is not None and current_memory_limit < swap)
                )
            )
            ordered = [swap_write, limit_write] if swap_first else [limit_write, swap_write]
            writes.extend(w for w in ordered if w)
            if reservation is not None:
                writes.append(
                    Write(
                        "memory",
                        "memory.soft_limit_in_bytes",
                        str(reservation),
                        "memory.reservation",
                    )
                )
            if memory.swappiness is not None:
                writes.append(
                    Write(
                        "memory", "memory.swappiness", str(memory.swappiness), "memory.swappiness"
                    )
                )
            if memory.disable_oom_killer:
                writes.append(Write("memory", "memory.oom_control", "1", "memory.disableOOMKiller"))

    # pids
    pids_limit = resources.pids.limit if resources.pids is not None else None
    if pids_limit and need("pids", "pids.limit"):
        writes.append(
            Write("pids", "pids.max", str(pids_limit) if pids_limit > 0 else "max", "pids.limit")
        )

    # cpu: period before quota, so a quota valid for the new period is accepted
    cpu = resources.cpu
    if cpu is not None:
        for key, value, file in (
            ("shares", cpu.shares, "cpu.shares"),
            ("period", cpu.period, "cpu.cfs_period_us"),
            ("quota", cpu.quota, "cpu.cfs_quota_us"),
            ("burst", cpu.burst, "cpu.cfs_burst_us"),
            ("realtimePeriod", cpu.realtime_period, "cpu.rt_period_us"),
            ("realtimeRuntime", cpu.realtime_runtime, "cpu.rt_runtime_us"),
            ("idle", cpu.idle, "cpu.idle"),
        ):
            if value is None or (value == 0 and key not in ("idle", "burst")):
                continue
            if need("cpu", f"cpu.{key}"):
                writes.append(Write("cpu", file, str(value), f"cpu.{key}"))
        for key, value in (("cpus", cpu.cpus), ("mems", cpu.mems)):
            if value and need("cpuset", f"cpu.{key}"):
                writes.append(Write("cpuset", f"cpuset.{key}", value, f"cpu.{key}"))

    # devices: default deny, the config's rules in order, then the basic nodes
    if resources.devices is not None:
        rules = container_rules(resources.devices)
        if need("devices", "devices"):
            fields = ["devices", *(f"devices[{i}]" for i in range(len(resources.devices)))]
            for i, rule in enumerate(rules):
                file = "devices.allow" if rule.allow else "devices.deny"
                field = fields[i] if i < len(fields) else "devices"
                writes.append(Write("devices", file, rule.v1_line(), field))

    # blkio
    block_io = resources.block_io
    if block_io is not None and _asks_anything(block_io) and need("blkio", "blockIO"):
        for key, value, file in (
            ("weight", block_io.weight, weight_file),
            ("leafWeight", block_io.leaf_weight, "blkio.leaf_weight"),
        ):
            if value:
                if file is None:
                    raise no_weight_file(f"blockIO.{key}", WEIGHT_FILES)
                writes.append(Write("blkio", file, str(value), f"blockIO.{key}"))
        for i, dev in enumerate(block_io.weight_device):
            field = f"blockIO.weightDevice[{i}]"
            for key, value, file in (
                ("weight", dev.weight, weight_file and f"{weight_file}_device"),
                ("leafWeight", dev.leaf_weight, "blkio.leaf_weight_device"),
            ):
                if value:
                    if file is None:
                        raise no_weight_file(
                            f"{field}.{key}", tuple(f"{f}_device" for f in WEIGHT_FILES)
                        )
                    writes.append(
                        Write("blkio", file, f"{dev.major}:{dev.minor} {value}", f"{field}.{key}")
                    )
        for key, attribute in THROTTLE_KEYS:
            file = _THROTTLE_FILES[key]
            for i, dev in enumerate(getattr(block_io, attribute)):
                field = f"blockIO.{key}[{i}]"
                writes.append(Write("blkio", file, f"{dev.major}:{dev.minor} {dev.rate}", field))

    for i, entry in enumerate(resources.hugepage_limits):
        if need("hugetlb", "hugepageLimits"):
            writes.append(
                Write(
                    "hugetlb",
                    f"hugetlb.{entry.page_size}.limit_in_bytes",
                    str(entry.limit),
                    f"hugepageLimits[{i}]",
                )
            )

    network = resources.network
    if network is not None:
        if network.class_id is not None and need("net_cls", "network.classID"):
            writes.append(
                Write("net_cls", "net_cls.classid", str(network.class_id), "network.classID")
            )
        for i, prio in enumerate(network.priorities):
            if need("net_prio", "network.priorities"):
                writes.append(
                    Write(
                        "net_prio",
                        "net_prio.ifpriomap",
                        f"{prio.name} {prio.priority}",
                        f"network.priorities[{i}]",
                    )
                )

    if resources.rdma:
        notes.append("linux.resources.rdma ignored: rdma limits are not supported by zviz")
    if resources.unified:
        raise InvalidArgument(
            "config.json: linux.resources.unified: needs cgroup v2, but this host runs cgroup v1"
        )
    return writes


_THROTTLE_FILES = {
    "throttleReadBpsDevice": "blkio.throttle.read_bps_device",
    "throttleWriteBpsDevice": "blkio.throttle.write_bps_device",
    "throttleReadIOPSDevice": "blkio.throttle.read_iops_device",
    "throttleWriteIOPSDevice": "blkio.throttle.write_iops_device",
}


def _asks_anything(block_io) -> bool:
    """An empty blockIO object asks for nothing: no blkio controller needed (as before the
    typed spec, when `{}` was skipped)."""
    return bool(
        block_io.weight
        or block_io.leaf_weight
        or block_io.weight_device
        or any(getattr(block_io, attribute) for _key, attribute in THROTTLE_KEYS)
    )


class OomWatcherV1(OomWatcher):
    """Readable when the memory cgroup hits its limit: an eventfd registered on memory.oom_control.

    The kernel also signals the eventfd when the cgroup is removed; read() then reports 0.
    """

    def __init__(self, memory_dir: str):
        self._dir = memory_dir
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control_fd = os.open(
                os.path.join(memory_dir, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC
            )
            try:
                write_file(
                    os.path.join(memory_dir, "cgroup.event_control"), f"{self._fd} {control_fd}"
                )
            finally:
                # The kernel holds its own reference to the file from here on.
                os.close(control_fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._seen = _oom_kills(memory_dir)

    def read(self) -> int:
        """New OOM events since the last read (at least 1 if the kernel signalled an OOM)."""
        try:
            os.eventfd_read(self._fd)
            signalled = True
        except BlockingIOError:
            signalled = False
        if not os.path.isdir(self._dir):
            return 0
        control = read_keyed(os.path.join(self._dir, "memory.oom_control"))
        kills = control.get("oom_kill", 0)
        new = kills - self._seen
        self._seen = kills
        if new <= 0 and signalled and control.get("under_oom"):
            return 1
        return max(new, 0)


def _oom_kills(memory_dir: str) -> int:
    return read_keyed(os.path.join(memory_dir, "memory.oom_control")).get("oom_kill", 0)


class CgroupV1(Cgroup):
    version = 1
    cheap_self_join = True

    def __init__(self, paths: dict[str, str], bases: dict[str, str] | None = None):
        # controller -> leaf dir; co-mounted controllers (cpu,cpuacct) share one dir.
        self.paths = paths
        # controller -> dir below which create() may make directories.
        self._bases = bases or {}
        self._created: list[str] = []

    def __repr__(self):
        return f"CgroupV1({self._procs_dir()})"

    def _dirs(self) -> list[str]:
        return list(dict.fromkeys(self.paths.values()))

    def _procs_dir(self) -> str:
        for controller in ("pids", "memory", "freezer", "cpu"):
            if controller in self.paths:
                return self.paths[controller]
        return next(iter(self.paths.values()))

    def procs_recursive(self) -> list[int]:
        # Every hierarchy: a process that joined only some of them (a failed add_pid)
        # still keeps those groups from being removed.
        found: set[int] = set()
        for directory in self._dirs():
            found.update(procs_below(directory))
        return sorted(found)

    def _freezable(self) -> bool:
        return "freezer" in self.paths

    def _dir(self, controller: str) -> str:
        try:
            return self.paths[controller]
        except KeyError:
            raise FailedPrecondition(
                f"the {controller} cgroup controller is not mounted on this host"
            ) from None

    def create(self) -> None:
        controllers_by_dir: dict[str, list[str]] = {}
        for controller, directory in self.paths.items():
            controllers_by_dir.setdefault(directory, []).append(controller)
        try:
            for directory, controllers in controllers_by_dir.items():
                base = self._bases.get(controllers[0], os.path.dirname(directory))
                self._make(directory, base, cpuset="cpuset" in controllers)
        except BaseException:
            self._create_failed = True
            self._undo_create()
            raise

    def _make(self, directory: str, base: str, cpuset: bool) -> None:
        def fill_cpuset(parent: str, level: str) -> None:
            # A new cpuset group starts with no CPUs and no memory nodes, and a
            # process cannot join it until both are set.
            for file in ("cpuset.cpus", "cpuset.mems"):
                if not read_file(os.path.join(level, file)).strip():
                    inherited = read_file(os.path.join(parent, file)).strip()
                    write_file(os.path.join(level, file), inherited or "\n")

        make_dirs(directory, base, self._created, fill_cpuset if cpuset else None)

    def _undo_create(self) -> None:
        for level in reversed(self._created):
            try:
                os.rmdir(level)
            except OSError as err:
                # A parent shared with a concurrent container stays.
                if err.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                    raise
        self._created.clear()

    def _planned_writes(self, resources, notes: list[str]) -> list[tuple[Write, str]]:
        memory_dir = self.paths.get("memory")
        writes = plan(
            resources,
            available=frozenset(self.paths),
            memsw_available=bool(memory_dir)
            and os.path.exists(os.path.join(memory_dir, "memory.memsw.limit_in_bytes")),
            current_memory_limit=read_int(os.path.join(memory_dir, "memory.limit_in_bytes"))
            if memory_dir
            else None,
            weight_file=offered_file(self.paths.get("blkio"), WEIGHT_FILES)
            if asks_block_weight(resources)
            else None,
            notes=notes,
        )
        return [(write, self.paths[write.controller]) for write in writes]

    def add_pid(self, pid: int) -> None:
        for directory in self._dirs():
            try:
                write_file(os.path.join(directory, "cgroup.procs"), str(pid))
            except ProcessLookupError:
                raise NotFound(f"process {pid} does not exist") from None

    def charge_memory(self, pid: int) -> None:
        if "memory" in self.paths:
            try:
                write_file(os.path.join(self.paths["memory"], "cgroup.procs"), str(pid))
            except ProcessLookupError:
                raise NotFound(f"process {pid} does not exist") from None

    def join_self(self) -> None:
        # Through `tasks`, one thread: the kernel takes its global threadgroup lock
        # (and the RCU grace period that comes with it, ~8 ms) only to move whole
        # processes. A single-threaded process's one thread is the whole process.
        for directory in self._dirs():
            write_file(os.path.join(directory, "tasks"), "0")

    def pids(self) -> list[int]:
        return read_pids(os.path.join(self._procs_dir(), "cgroup.procs"))

    def freeze(self) -> None:
        state_file = os.path.join(self._dir("freezer"), "freezer.state")
        deadline = time.monotonic() + FREEZE_TIMEOUT_S
        attempt = 0
        while True:
            if attempt % 20 == 0:
                # Re-asking nudges tasks that were mid-fork when the freeze began.
                write_file(state_file, "FROZEN")
            state = read_file(state_file).strip()
            if state == "FROZEN":
                return
            if time.monotonic() > deadline:
                write_file(state_file, "THAWED")
                raise Unavailable(
                    f"cgroup {os.path.dirname(state_file)} did not freeze within "
                    f"{FREEZE_TIMEOUT_S:.0f}s (state {state})"
                )
            attempt += 1
            time.sleep(0.001 if attempt < 20 else 0.01)

    def thaw(self) -> None:
        write_file(os.path.join(self._dir("freezer"), "freezer.state"), "THAWED")

    def frozen(self) -> bool:
        try:
            return (
                read_file(os.path.join(self._dir("freezer"), "freezer.state")).strip() == "FROZEN"
            )
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENODEV):  # ENODEV: removed after the open
                raise
            return False

    def oom_kill_count(self) -> int:
        return _oom_kills(self._dir("memory"))

    def oom_watcher(self) -> OomWatcherV1:
        return OomWatcherV1(self._dir("memory"))

    def pids_limit_hits(self) -> int:
        if "pids" not in self.paths:
            return 0
        return read_keyed(os.path.join(self.paths["pids"], "pids.events")).get("max", 0)

    def limit(self, kind: str) -> int:
        name = {"pids": "pids.max", "memory": "memory.limit_in_bytes"}[kind]
        if kind not in self.paths:
            return 0
        value = read_int(os.path.join(self.paths[kind], name), max_value=0)
        # v1 says "no memory limit" with the largest page-aligned number, not "max".
        return 0 if value >= 1 << 62 else value

    def stats(self) -> dict:
        stats: dict = {"version": 1}
        memory_dir = self.paths.get("memory")
        if memory_dir:

            def counters(prefix: str) -> dict:
                return {
                    "usage": read_int(os.path.join(memory_dir, f"{prefix}usage_in_bytes")),
                    "limit": read_int(os.path.join(memory_dir, f"{prefix}limit_in_bytes")),
                    "max_usage": read_int(os.path.join(memory_dir, f"{prefix}max_usage_in_bytes")),
                    "failcnt": read_int(os.path.join(memory_dir, f"{prefix}failcnt")),
                }

            stat = read_keyed(os.path.join(memory_dir, "memory.stat"))
            memory = counters("memory.")
            memory.update(
                cache=stat.get("total_cache", stat.get("cache", 0)),
                rss=stat.get("total_rss", stat.get("rss", 0)),
                swap_usage=stat.get("total_swap", stat.get("swap", 0)),
                swap=counters("memory.memsw."),
                kernel=counters("memory.kmem."),
                kernel_tcp=counters("memory.kmem.tcp."),
                stat=stat,
            )
            stats["memory"] = memory
            control = read_keyed(os.path.join(memory_dir, "memory.oom_control"))
            stats["memory_oom_control"] = {
                "oom_kill_disable": control.get("oom_kill_disable", 0),
                "under_oom": control.get("under_oom", 0),
                "oom_kill": control.get("oom_kill", 0),
            }
            stats["oom_kill"] = control.get("oom_kill", 0)
        if "pids" in self.paths:
            stats["pids"] = {
                "current": read_int(os.path.join(self.paths["pids"], "pids.current")),
                # 0 = no limit, as containerd's Metrics report it
                "limit": read_int(os.path.join(self.paths["pids"], "pids.max"), max_value=0),
            }
        cpu: dict = {}
        if "cpuacct" in self.paths:
            acct = self.paths["cpuacct"]
            cpu["usage_ns"] = read_int(os.path.join(acct, "cpuacct.usage"))
            cpu["user_ns"] = read_int(os.path.join(acct, "cpuacct.usage_user"))
            cpu["system_ns"] = read_int(os.path.join(acct, "cpuacct.usage_sys"))
            try:
                per_cpu = read_file(os.path.join(acct, "cpuacct.usage_percpu")).split()
                cpu["per_cpu_ns"] = [int(v) for v in per_cpu]
            except FileNotFoundError:
                cpu["per_cpu_ns"] = []
        if "cpu" in self.paths:
            cpu_stat = read_keyed(os.path.join(self.paths["cpu"], "cpu.stat"))
            cpu["periods"] = cpu_stat.get("nr_periods", 0)
            cpu["throttled_periods"] = cpu_stat.get("nr_throttled", 0)
            cpu["throttled_ns"] = cpu_stat.get("throttled_time", 0)
        if cpu:
            stats["cpu"] = cpu
        if "blkio" in self.paths:
            stats["blkio"] = {
                "io_service_bytes_recursive": _blkio_entries(
                    os.path.join(self.paths["blkio"], "blkio.throttle.io_service_bytes_recursive")
                ),
                "io_serviced_recursive": _blkio_entries(
                    os.path.join(self.paths["blkio"], "blkio.throttle.io_serviced_recursive")
                ),
            }
        return stats


def _blkio_entries(path: str) -> list[dict]:
    """blkio "major:minor Op value" lines as containerd's BlkIOEntry fields."""
    entries = []
    try:
        text = read_file(path)
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3 or ":" not in fields[0]:
            continue
        major, _, minor = fields[0].partition(":")
        entries.append(
            {"major": int(major), "minor": int(minor), "op": fields[1], "value": int(fields[2])}
        )
    return entries
