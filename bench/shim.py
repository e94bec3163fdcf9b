"""containerd with zviz's shim beside runc and gVisor: cold start and memory per container.

    python -m bench shim

- cold start: `ctr run --rm IMAGE ID /bin/true`, RUNS runs per runtime, interleaved
  (zviz, runc, gVisor, zviz, ...) so drift on the machine hits all alike; median and p90.
  One warm-up run per runtime is not counted (image unpack, page cache); zviz's
  warm-up is also where its shim daemon starts, and is printed on its own line.
- memory: PSS of every shim and runtime process while MEMORY_CONTAINERS containers run
  `sleep`, divided by their number (PSS splits shared pages fairly between processes).
  zviz's: the shim daemon, what it forks (seccomp brokers and their wardens) and each
  container's exec anchor.
- `start` and `delete`: wall time of `containerd-shim-zviz-v2 start` when its daemon is
  running, and of the `delete` containerd runs after it (the daemon alive: the common
  case), served by the fork server (the compiled client, as containerd runs it) and not
  (ZVIZ_NO_FORKSERVER=1: the Python entry does it), interleaved.
- concurrent start: CONCURRENT `ctr run --rm ... /bin/true` at once, the wall time until
  the last returns, CONCURRENT_ROUNDS rounds per runtime, interleaved; median.

gVisor runs through containerd's runc shim with `--runc-binary` pointing at a wrapper
that execs `runsc --network=none --ignore-cgroups`.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from runtime import procstat
from runtime.exec_anchor import BINARY_NAME as ANCHOR
from tools.containerd import PrivateContainerd, runsc_wrapper
from tools.mkimage import DEFAULT_REF, build_image

RUNS = 20
MEMORY_CONTAINERS = 10
CONCURRENT = 10
CONCURRENT_ROUNDS = 5
ZVIZ = "io.containerd.zviz.v2"
RUNC = "io.containerd.runc.v2"


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _runtimes(wrapper: str | None) -> dict[str, list[str]]:
    runtimes = {"zviz": ["--runtime", ZVIZ], "runc": ["--runtime", RUNC]}
    if wrapper:
        runtimes["gvisor"] = ["--runtime", RUNC, "--runc-binary", wrapper]
    return runtimes


def _run_once(containerd: PrivateContainerd, flags: list[str], container_id: str) -> float:
    started = time.perf_counter()
    result = containerd.ctr(
        "run", "--rm", *flags, DEFAULT_REF, container_id, "/bin/true", check=False, timeout=120
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"ctr run {flags} failed: {result.stderr.strip()}")
    return elapsed


def _concurrent_once(containerd: PrivateContainerd, flags: list[str], prefix: str) -> float:
    """CONCURRENT containers started at once; seconds until the last `ctr run` returned."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        list(pool.map(lambda i: _run_once(containerd, flags, f"{prefix}-{i}"), range(CONCURRENT)))
    return time.perf_counter() - started


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _processes(match) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if match(cmdline):
            pids.append(int(entry))
    return pids


def _below(pid: int, ancestors: list[int]) -> bool:
    """Whether one of `ancestors` is an ancestor of `pid`."""
    while pid > 1:
        try:
            pid = procstat.parent(pid)
        except (OSError, ValueError, IndexError):
            return False
        if pid in ancestors:
            return True
    return False


def _runtime_processes(name: str, containerd: PrivateContainerd) -> list[int]:
    address = containerd.address
    if name == "zviz":
        # The shim daemon, and what it forked that is not a workload (seccomp brokers and
        # their wardens: forks, so the daemon's command line).
        daemon = _processes(lambda c: "containerd-shim-zviz-v2" in c and address in c)
        # Each container's exec anchor, which PID 1 forks and execs: zviz's, not the
        # workload's (runc has none).
        return daemon + [
            pid for pid in _processes(lambda c: c.startswith(f"{ANCHOR} ")) if _below(pid, daemon)
        ]
    shims = _processes(lambda c: "containerd-shim-runc-v2" in c and address in c)
    if name == "gvisor":
        return shims + _processes(lambda c: "runsc" in c and containerd.namespace in c)
    return shims


def _memory_per_container(containerd: PrivateContainerd, name: str, flags: list[str]) -> float:
    ids = [f"zviz-bench-mem-{name}-{len(flags)}-{i}" for i in range(MEMORY_CONTAINERS)]
    try:
        for container_id in ids:
            result = containerd.ctr(
                "run", "-d", *flags, DEFAULT_REF, container_id, "sleep", "600", check=False
            )
            if result.returncode != 0:
                raise RuntimeError(f"{name}: ctr run -d failed: {result.stderr.strip()}")
        time.sleep(1.0)  # let lazily-touched pages settle before measuring
        pids = _runtime_processes(name, containerd)
        total = sum(_pss_kib(pid) for pid in pids)
        return total / MEMORY_CONTAINERS / 1024.0
    finally:
        for container_id in ids:
            containerd.ctr("tasks", "kill", "-a", "-s", "SIGKILL", container_id, check=False)
        for container_id in ids:
            for _ in range(100):
                state = containerd.ctr("tasks", "ls", check=False).stdout
                if f"{container_id} " not in state or "STOPPED" in _line_of(state, container_id):
                    break
                time.sleep(0.05)
            containerd.ctr("tasks", "delete", "-f", container_id, check=False)
            containerd.ctr("containers", "delete", container_id, check=False)


def _line_of(text: str, container_id: str) -> str:
    for line in text.splitlines():
        if line.startswith(container_id + " "):
            return line
    return ""


SHIM_ACTIONS = ("start", "delete")


def _shim_action_seconds(
    containerd: PrivateContainerd, runs: int
) -> dict[str, dict[str, list[float]]]:
    """Wall time of `containerd-shim-zviz-v2 start` for a container whose group daemon
    runs, then of its `delete`: {action: {"served": ..., "unserved": ...}}
    (runtime/forkserver.py), interleaved."""
    shim = os.path.join(os.path.dirname(sys.executable), "containerd-shim-zviz-v2")
    holder = "zviz-bench-start-holder"
    containerd.ctr("run", "-d", "--runtime", ZVIZ, DEFAULT_REF, holder, "sleep", "600", check=True)
    bundle = tempfile.mkdtemp(prefix="zviz-bench-start-")
    ways = {"served": {}, "unserved": {"ZVIZ_NO_FORKSERVER": "1"}}
    times = {action: {way: [] for way in ways} for action in SHIM_ACTIONS}
    try:
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump({"annotations": {}}, f)
        env = dict(containerd.env, TTRPC_ADDRESS=containerd.ttrpc_address)
        flags = [shim, "-namespace", containerd.namespace, "-address", containerd.address]
        flags += ["-publish-binary", "containerd", "-id", "zviz-bench-start"]
        # containerd's command lines (its delete names the bundle and drops -debug)
        command_lines = {
            "start": [*flags, "start"],
            "delete": [*flags, "-bundle", bundle, "delete"],
        }
        for _ in range(runs):
            for way, extra in ways.items():
                for action in SHIM_ACTIONS:
                    started = time.perf_counter()
                    subprocess.run(
                        command_lines[action],
                        cwd=bundle,
                        env=dict(env, **extra),
                        check=True,
                        capture_output=True,
                        stdin=subprocess.DEVNULL,
                    )
                    times[action][way].append(time.perf_counter() - started)
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
        containerd.ctr("tasks", "kill", "-a", "-s", "SIGKILL", holder, check=False)
        time.sleep(0.2)
        containerd.ctr("tasks", "delete", "-f", holder, check=False)
        containerd.ctr("containers", "delete", holder, check=False)
    return times


def main() -> None:
    containerd = PrivateContainerd(debug=False).start()
    workdir = tempfile.mkdtemp(prefix="zviz-bench-shim-")
    try:
        archive = os.path.join(workdir, "busybox.tar")
        build_image(archive, DEFAULT_REF)
        containerd.import_image(archive)
        wrapper = runsc_wrapper(workdir) if shutil.which("runsc") else None
        runtimes = _runtimes(wrapper)
        if wrapper is None:
            print("gVisor: runsc not found, skipped")

        warmup = {}
        for name, flags in runtimes.items():
            warmup[name] = _run_once(containerd, flags, f"zviz-bench-warm-{name}")
        times: dict[str, list[float]] = {name: [] for name in runtimes}
        for i in range(RUNS):
            for name, flags in runtimes.items():
                times[name].append(_run_once(containerd, flags, f"zviz-bench-cold-{name}-{i}"))

        memory = {
            name: _memory_per_container(containerd, name, flags) for name, flags in runtimes.items()
        }
        # A profile that mediates syscalls adds a seccomp broker (a fork of the daemon) per container.
        broker_memory = _memory_per_container(
            containerd, "zviz", [*runtimes["zviz"], "--annotation", "io.zviz.profile=web-server"]
        )
        action_times = _shim_action_seconds(containerd, RUNS)
        concurrent: dict[str, list[float]] = {name: [] for name in runtimes}
        for i in range(CONCURRENT_ROUNDS):
            for name, flags in runtimes.items():
                concurrent[name].append(
                    _concurrent_once(containerd, flags, f"zviz-bench-conc-{name}-{i}")
                )

        base_median = statistics.median(times["runc"])
        base_memory = memory["runc"]
        print(f"cold start: ctr run --rm {DEFAULT_REF} ID /bin/true, {RUNS} runs each, interleaved")
        print(
            f"{'runtime':<8} {'median ms':>10} {'p90 ms':>8} {'vs runc':>8}   {'PSS MiB/ctr':>11} {'vs runc':>8}"
        )
        for name in runtimes:
            median = statistics.median(times[name])
            p90 = _percentile(times[name], 0.9)
            print(
                f"{name:<8} {median * 1000:>10.1f} {p90 * 1000:>8.1f} {median / base_median:>7.2f}x"
                f"   {memory[name]:>11.2f} {memory[name] / base_memory:>7.2f}x"
            )
        print(
            "zviz, web-server profile (one seccomp broker per container): "
            f"{broker_memory:.2f} MiB/ctr, {broker_memory / base_memory:.2f}x runc"
        )
        print(f"zviz first run (starts the shim daemon): {warmup['zviz'] * 1000:.1f} ms")
        for action, ways in action_times.items():
            for way, times in ways.items():
                print(
                    f"containerd-shim-zviz-v2 {action} (daemon running, {way}): "
                    f"median {statistics.median(times) * 1000:.1f} ms,"
                    f" p90 {_percentile(times, 0.9) * 1000:.1f} ms"
                )
        print(
            f"memory: PSS of shim and runtime processes with {MEMORY_CONTAINERS} containers running, / {MEMORY_CONTAINERS}"
        )
        base_concurrent = statistics.median(concurrent["runc"])
        print(
            f"{CONCURRENT} started at once (`ctr run --rm ... /bin/true`), until the last returns,"
            f" median of {CONCURRENT_ROUNDS} interleaved rounds:"
        )
        for name in runtimes:
            median = statistics.median(concurrent[name])
            print(f"  {name:<8} {median * 1000:>8.1f} ms {median / base_concurrent:>6.2f}x")
    finally:
        containerd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
