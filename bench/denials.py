"""Denial records: what a denied call costs with records on and off, what an allowed call
costs (must not change), and what reading the records costs the shims (docs/denials.md).

    python -m bench denials          (or: make bench)

1. Calls: a static probe (bench/denials_probe/denybench.c) times getppid (allowed), a
   seccomp-denied unshare(CLONE_NEWNET) and a Landlock-denied open(O_CREAT) in /etc,
   inside `zviz run` under ci-runner with records on and off, runc and gVisor; ROUNDS
   interleaved rounds, median ns per call and the ratio to runc. Records on, a thread
   here reads the audit multicast group as a shim's reader does. Landlock's records
   need audit enabled: the bench says which way the node is and never changes it.
2. Readers: SHIMS containers, each with a shim daemon of its own, under a private
   containerd, once with one audit reader per daemon (ZVIZ_NODE_AUDIT_READER=0) and
   once with the node's reader: the CPU the daemons (and the reader) use while idle,
   while one more container floods denied calls, and the latency from a denied call
   (the kernel's record time) to its record in the file, which the shim publishes as
   the event in the same loop turn.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from runtime import procstat

SOURCE = os.path.join(os.path.dirname(__file__), "denials_probe", "denybench.c")
ALLOWED_CALLS = int(os.environ.get("BENCH_DENIALS_ALLOWED", 1_000_000))
DENIED_CALLS = int(os.environ.get("BENCH_DENIALS_DENIED", 20_000))
ROUNDS = int(os.environ.get("BENCH_DENIALS_ROUNDS", 5))
SHIMS = int(os.environ.get("BENCH_DENIALS_SHIMS", 20))
IDLE_SECONDS = float(os.environ.get("BENCH_DENIALS_IDLE_SECONDS", 20))
FLOOD_SECONDS = float(os.environ.get("BENCH_DENIALS_FLOOD_SECONDS", 10))
LATENCY_SAMPLES = int(os.environ.get("BENCH_DENIALS_LATENCY_SAMPLES", 20))
CALLS = ("allowed", "seccomp", "landlock")
ZVIZ = "io.containerd.zviz.v2"


# --- 1. The calls ---


def _drain_audit(stop: threading.Event) -> None:
    """Read the audit multicast group as a shim does, so that records on costs what it
    costs under a shim (the kernel queues each record for a reader)."""
    import select

    from runtime import denials

    try:
        reader = denials.KernelRecords()
    except denials.KernelRecordsUnavailable:
        return
    with reader.sock:
        while not stop.is_set():
            if select.select([reader.fileno()], [], [], 0.2)[0]:
                reader.read(4096)


def _run(cmd: list[str], env: dict | None = None) -> dict | None:
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, input="", env=env or os.environ
    )
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    print(f"  {cmd[0]} failed: {result.returncode} {result.stderr.strip()[-300:]}", file=sys.stderr)
    return None


def call_table() -> dict:
    from runtime import denials
    from tools.mkbundle import build_bundle

    tmp = tempfile.mkdtemp(prefix="zviz-bench-denials-")
    os.chmod(tmp, 0o755)  # the container's root is an unprivileged host uid
    venv = os.path.dirname(sys.executable)
    zviz = os.environ.get("ZVIZ_BIN", os.path.join(venv, "zviz"))
    stop = threading.Event()
    drain = threading.Thread(target=_drain_audit, args=(stop,), daemon=True)
    drain.start()
    try:
        binary = os.path.join(tmp, "denybench")
        subprocess.run(["gcc", "-static", "-O2", "-o", binary, SOURCE], check=True)
        # A writable rootfs: a read-only one answers EROFS before Landlock is asked.
        bundle = build_bundle(
            os.path.join(tmp, "bundle"),
            args=["/denybench", str(ALLOWED_CALLS), str(DENIED_CALLS)],
            root={"path": "rootfs", "readonly": False},
        )
        shutil.copy2(binary, os.path.join(bundle, "rootfs", "denybench"))

        def name() -> str:
            return f"zviz-bench-deny-{uuid.uuid4().hex[:8]}"

        runtimes = {}
        if os.access(zviz, os.X_OK):
            for label, switch in (("records on", "1"), ("records off", "0")):
                env = dict(os.environ, **{denials.RECORDS_SWITCH: switch})
                runtimes[f"zviz ci-runner, {label}"] = lambda env=env: (
                    [zviz, "--root", f"{tmp}/zviz", "run", "--bundle", bundle,
                     "--profile", "ci-runner", name()],
                    env,
                )  # fmt: skip
        if shutil.which("runc"):
            runtimes["runc"] = lambda: (
                ["runc", "--root", f"{tmp}/runc", "run", "--bundle", bundle, name()],
                None,
            )
        if shutil.which("runsc"):
            runtimes["gVisor (runsc)"] = lambda: (
                ["runsc", "--root", f"{tmp}/runsc", "--network=none", "run", "--bundle", bundle,
                 name()],
                None,
            )  # fmt: skip
        samples = {runtime: [] for runtime in runtimes}
        for _ in range(ROUNDS):
            for runtime, command in runtimes.items():
                result = _run(*command())
                if result:
                    samples[runtime].append(result)
    finally:
        stop.set()
        shutil.rmtree(tmp, ignore_errors=True)
    table = {
        runtime: {
            **{call: statistics.median(r[call] for r in results) for call in CALLS},
            "errnos": (results[-1]["seccomp_errno"], results[-1]["landlock_errno"]),
        }
        for runtime, results in samples.items()
        if results
    }
    _print_calls(table)
    return table


def _print_calls(table: dict) -> None:
    import errno

    from runtime import denials
    from runtime.security import landlock

    missing = denials.landlock_records_missing(landlock.abi_version())
    print(
        f"ns per call, median of {ROUNDS} interleaved rounds ({ALLOWED_CALLS} allowed, "
        f"{DENIED_CALLS} of each denied); in brackets what the denied call returned"
    )
    print(f"Landlock records on this node: {'yes' if not missing else 'no (' + missing + ')'}")
    print(f"{'runtime':28}" + "".join(f"{c:>22}" for c in CALLS))
    base = table.get("runc", {})
    for runtime, row in table.items():
        cells = []
        for call in CALLS:
            ratio = f" {row[call] / base[call]:.2f}x" if base.get(call) else ""
            cells.append(f"{row[call]:>10.0f}{ratio:>7}")
        seccomp_errno, landlock_errno = row["errnos"]
        got = [errno.errorcode.get(e, "ok") if e else "ok" for e in (seccomp_errno, landlock_errno)]
        cells[1] += f" [{got[0]}]"
        cells[2] += f" [{got[1]}]"
        print(f"{runtime:28}" + "".join(f"{c:>22}" for c in cells))
    on, off = table.get("zviz ci-runner, records on"), table.get("zviz ci-runner, records off")
    if on and off:
        print(
            "records on / off: "
            + ", ".join(
                f"{call} {on[call] / off[call]:.2f}x (+{on[call] - off[call]:.0f} ns)"
                for call in CALLS
            )  # fmt: skip
        )


# --- 2. The readers ---


def _cpu_seconds(pids) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = procstat.read(pid)
            total += int(fields[procstat.USER_TIME]) + int(fields[procstat.SYSTEM_TIME])
        except (OSError, IndexError, ValueError):
            continue
    return total / ticks


def _shim_pids(address: str) -> dict[str, int]:
    """container id -> pid of the shim daemon serving it (its group is the container)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        # The shim is a Python script: argv[0] is the interpreter, argv[1] the shim.
        shim = any(arg.endswith(b"containerd-shim-zviz-v2") for arg in args[:2])
        if shim and address.encode() in args:
            out[entry] = int(entry)
    return out


def _reader_pid(where: str) -> int | None:
    try:
        with open(os.path.join(where, "lock")) as f:
            pid = int(f.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if b"shim.audit_reader" in f.read() else None
    except (OSError, ValueError):
        return None


def _exec(containerd, container_id: str, exec_id: str, script: str) -> subprocess.Popen:
    return subprocess.Popen(
        [containerd.ctr_bin, "--address", containerd.address, "-n", containerd.namespace,
         "tasks", "exec", "--exec-id", exec_id, container_id, "sh", "-c", script],
        env=containerd.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


class _RecordCounter:
    """Counts the node's seccomp records (what the flood made), on a reader of its own
    (the same extra reader in both modes)."""

    def __init__(self):
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import select

        from runtime import denials

        reader = denials.KernelRecords()
        with reader.sock:
            while not self._stop.is_set():
                if select.select([reader.fileno()], [], [], 0.2)[0]:
                    self.count += sum(
                        1 for kind, _ in reader.read(4096) if kind == denials.AUDIT_SECCOMP
                    )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _one_mode(archive: str, label: str, env: dict, where: str | None) -> dict:
    from runtime import denials
    from shim import config as shim_config
    from tools.containerd import PrivateContainerd
    from tools.mkimage import DEFAULT_REF

    containerd = PrivateContainerd(debug=False)
    containerd.env.update(env)
    containerd.start()
    ids = [f"zviz-bench-reader-{uuid.uuid4().hex[:8]}" for _ in range(SHIMS + 1)]
    flooder, measured = ids[0], ids[1]
    try:
        containerd.import_image(archive)
        for cid in ids:
            containerd.ctr(
                "run", "-d", "--runtime", ZVIZ, "--annotation", f"io.zviz.shim.group={cid}",
                DEFAULT_REF, cid, "sleep", "100000",
            )  # fmt: skip
        time.sleep(3)  # settle: the daemons' start-up work is not idle cost
        shims = list(_shim_pids(containerd.address).values())
        reader = [_reader_pid(where)] if where and _reader_pid(where) else []
        before = _cpu_seconds(shims + reader)
        time.sleep(IDLE_SECONDS)
        idle = (_cpu_seconds(shims + reader) - before) / IDLE_SECONDS

        state_root = shim_config.runtime_root(containerd.address, containerd.namespace)
        counter = _RecordCounter()
        flood = _exec(containerd, flooder, "flood", "while :; do unshare -n true 2>/dev/null; done")
        time.sleep(1)
        counted, before = counter.count, _cpu_seconds(shims + reader)
        time.sleep(FLOOD_SECONDS)
        during_flood = (_cpu_seconds(shims + reader) - before) / FLOOD_SECONDS
        flood_records = counter.count - counted
        counter.stop()
        if flood.poll() is not None:
            print(f"  the flood's exec ended early: {flood.returncode}", file=sys.stderr)
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", "--exec-id", "flood", flooder, check=False)
        flood.wait(timeout=30)
        time.sleep(2)

        path = os.path.join(state_root, measured, denials.DENIALS_FILE)
        seen = len(denials.read_lines(path)[0])
        script = (
            f"for i in $(seq {LATENCY_SAMPLES}); do unshare -n true 2>/dev/null; sleep 0.2; done"
        )
        probe = _exec(containerd, measured, "latency", script)
        latencies = []
        deadline = time.monotonic() + LATENCY_SAMPLES * 0.5 + 10
        while len(latencies) < LATENCY_SAMPLES and time.monotonic() < deadline:
            records, _ = denials.read_lines(path)
            for rec in records[seen:]:
                latencies.append(time.time() - denials.record_time(rec))
            seen = len(records)
            time.sleep(0.001)
        probe.wait(timeout=30)
    finally:
        for cid in ids:
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            containerd.ctr("tasks", "delete", "-f", cid, check=False)
            containerd.ctr("containers", "delete", cid, check=False)
        containerd.stop()
    return {
        "label": label,
        "idle_ms_per_s": idle * 1000,
        "flood_ms_per_s": during_flood * 1000,
        "flood_records_per_s": flood_records / FLOOD_SECONDS,
        "latency_ms": latencies,
    }


def reader_table() -> list[dict]:
    from shim import audit_reader
    from tools.mkimage import DEFAULT_REF, build_image

    workdir = tempfile.mkdtemp(prefix="zviz-bench-readers-")
    where = os.path.join("/run", f"zviz-bench-audit-reader-{uuid.uuid4().hex[:8]}")
    rows = []
    try:
        archive = os.path.join(workdir, "busybox.tar")
        build_image(archive, DEFAULT_REF)
        rows.append(_one_mode(archive, "a reader per daemon", {audit_reader.SWITCH: "0"}, None))
        rows.append(
            _one_mode(archive, "the node's reader", {audit_reader.DIR_VARIABLE: where}, where)
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(where, ignore_errors=True)
    print(
        f"\n{SHIMS + 1} containers, a shim daemon each (CPU of all daemons and the reader, "
        f"ms per second; flood: one container looping on a denied call for {FLOOD_SECONDS:.0f} s)"
    )
    print(
        f"{'kernel records read by':24}{'idle':>10}{'flood':>10}{'records/s':>11}"
        f"{'latency median':>16}{'p90':>8}{'max':>8}"
    )
    for row in rows:
        lat = sorted(row["latency_ms"]) or [float("nan")]
        p90 = lat[min(len(lat) - 1, round(0.9 * (len(lat) - 1)))]
        print(
            f"{row['label']:24}{row['idle_ms_per_s']:>10.1f}{row['flood_ms_per_s']:>10.1f}"
            f"{row['flood_records_per_s']:>11.0f}{statistics.median(lat) * 1000:>13.1f} ms"
            f"{p90 * 1000:>8.1f}{lat[-1] * 1000:>8.1f}"
        )
    print("(latency: the kernel's record time, ms resolution, to the line in the file, polled)")
    return rows


def main() -> None:
    if os.geteuid() != 0:
        print("needs root (containers, the audit multicast group)")
        return
    call_table()
    reader_table()


if __name__ == "__main__":
    main()
