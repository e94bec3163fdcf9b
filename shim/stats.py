"""Stats in the type containerd expects: `io.containerd.cgroups.v1.Metrics` on cgroup v1,
`io.containerd.cgroups.v2.Metrics` on v2, from the runtime core's stats dict."""

from api import typeurl
from api.gen.containerd.cgroups.v1 import metrics_pb2 as v1
from api.gen.containerd.cgroups.v2 import metrics_pb2 as v2

_MAX_U64 = (1 << 64) - 1


def _u64(value) -> int:
    try:
        value = int(value)
    except (TypeError, ValueError):
        return 0
    return min(max(value, 0), _MAX_U64)


def metrics_v1(stats: dict) -> v1.Metrics:
    metrics = v1.Metrics()
    pids = stats.get("pids")
    if pids:
        metrics.pids.current = _u64(pids.get("current"))
        metrics.pids.limit = _u64(pids.get("limit"))
    cpu = stats.get("cpu")
    if cpu:
        usage = metrics.cpu.usage
        usage.total = _u64(cpu.get("usage_ns"))
        usage.kernel = _u64(cpu.get("system_ns"))
        usage.user = _u64(cpu.get("user_ns"))
        usage.per_cpu.extend(_u64(v) for v in cpu.get("per_cpu_ns", ()))
        throttle = metrics.cpu.throttling
        throttle.periods = _u64(cpu.get("periods"))
        throttle.throttled_periods = _u64(cpu.get("throttled_periods"))
        throttle.throttled_time = _u64(cpu.get("throttled_ns"))
    memory = stats.get("memory")
    if memory:
        m = metrics.memory
        stat = memory.get("stat") or {}
        for field in m.DESCRIPTOR.fields:
            # memory.stat's keys are the field names with underscores squeezed
            # (pgpgin -> pg_pg_in, hierarchical_memory_limit stays).
            if field.message_type is not None:
                continue
            key = (
                field.name.replace("pg_pg_", "pgpg")
                .replace("pg_maj_", "pgmaj")
                .replace("pg_fault", "pgfault")
            )
            if key in stat:
                setattr(m, field.name, _u64(stat[key]))
        m.cache = _u64(memory.get("cache", stat.get("total_cache", stat.get("cache"))))
        m.rss = _u64(memory.get("rss", stat.get("total_rss", stat.get("rss"))))
        _entry(m.usage, memory)
        _entry(m.swap, memory.get("swap") or {})
        _entry(m.kernel, memory.get("kernel") or {})
        _entry(m.kernel_tcp, memory.get("kernel_tcp") or {})
    oom = stats.get("memory_oom_control")
    if oom:
        metrics.memory_oom_control.oom_kill_disable = _u64(oom.get("oom_kill_disable"))
        metrics.memory_oom_control.under_oom = _u64(oom.get("under_oom"))
        metrics.memory_oom_control.oom_kill = _u64(oom.get("oom_kill"))
    blkio = stats.get("blkio") or {}
    for name, entries in blkio.items():
        target = getattr(metrics.blkio, name, None)
        if target is None:
            continue
        for entry in entries:
            target.add(
                op=str(entry.get("op", "")),
                device=str(entry.get("device", "")),
                major=_u64(entry.get("major")),
                minor=_u64(entry.get("minor")),
                value=_u64(entry.get("value")),
            )
    return metrics


def _entry(target, source: dict) -> None:
    target.usage = _u64(source.get("usage"))
    target.limit = _u64(source.get("limit"))
    target.max = _u64(source.get("max_usage", source.get("max")))
    target.failcnt = _u64(source.get("failcnt"))


def metrics_v2(stats: dict) -> v2.Metrics:
    metrics = v2.Metrics()
    pids = stats.get("pids")
    if pids:
        metrics.pids.current = _u64(pids.get("current"))
        metrics.pids.limit = _u64(pids.get("limit"))
    cpu = stats.get("cpu")
    if cpu:
        metrics.cpu.usage_usec = _u64(cpu.get("usage_ns", 0)) // 1000
        metrics.cpu.user_usec = _u64(cpu.get("user_ns", 0)) // 1000
        metrics.cpu.system_usec = _u64(cpu.get("system_ns", 0)) // 1000
        metrics.cpu.nr_periods = _u64(cpu.get("periods"))
        metrics.cpu.nr_throttled = _u64(cpu.get("throttled_periods"))
        metrics.cpu.throttled_usec = _u64(cpu.get("throttled_ns", 0)) // 1000
    memory = stats.get("memory")
    if memory:
        m = metrics.memory
        stat = memory.get("stat") or {}
        for field in m.DESCRIPTOR.fields:
            if field.name in stat:
                setattr(m, field.name, _u64(stat[field.name]))
        m.usage = _u64(memory.get("usage"))
        m.usage_limit = _u64(memory.get("limit"))
        swap = memory.get("swap") or {}
        m.swap_usage = _u64(swap.get("usage", memory.get("swap_usage")))
        m.swap_limit = _u64(swap.get("limit"))
    events = stats.get("memory_events")
    if events:
        for key in ("low", "high", "max", "oom", "oom_kill"):
            setattr(metrics.memory_events, key, _u64(events.get(key)))
    for entry in stats.get("io") or ():
        metrics.io.usage.add(
            major=_u64(entry.get("major")),
            minor=_u64(entry.get("minor")),
            rbytes=_u64(entry.get("rbytes")),
            wbytes=_u64(entry.get("wbytes")),
            rios=_u64(entry.get("rios")),
            wios=_u64(entry.get("wios")),
        )
    return metrics


def metrics_any(stats: dict):
    """The Any containerd's Stats call expects, for the cgroup version the stats came from."""
    if stats.get("version") == 2:
        return typeurl.pack(metrics_v2(stats))
    return typeurl.pack(metrics_v1(stats))
