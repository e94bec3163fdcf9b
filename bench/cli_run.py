"""`zviz run` beside `runc run` (and gVisor's `runsc run`) on the same bundle running /bin/true.

Runs are interleaved (zviz, runc, runsc, zviz, ...) so machine noise hits all alike.
Wall time of the whole command, as a user or containerd's shim sees it.

A pause separates runs: a cgroup.procs write waits for an RCU grace period (8-12 ms
here) unless another one happened within the last grace period, so back to back the
second runtime rides on the first one's wait (runc measured 17 ms right after a zviz
run, 28-37 ms on its own). Each run must pay its own way, as a lone `run` does.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from tools.mkbundle import build_bundle

RUNS = 20
PAUSE_S = 0.15  # several grace periods


def _zviz() -> str:
    return os.path.join(os.path.dirname(sys.executable), "zviz")


def _time(argv: list[str], cwd: str) -> float:
    started = time.perf_counter()
    # An empty pipe, not /dev/null, on stdin: runsc hands its stdio to the sandbox's
    # user, and a /dev/null given to it would be the host's, chowned to nobody.
    result = subprocess.run(argv, cwd=cwd, input=b"", capture_output=True, timeout=120)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace').strip()}"
        )
    return elapsed


def _p90(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def main() -> None:
    work = tempfile.mkdtemp(prefix="zviz-bench-")
    try:
        bundle = build_bundle(os.path.join(work, "bundle"), args=["/bin/true"])
        runners = {
            "zviz": lambda i: [
                _zviz(),
                "--root",
                os.path.join(work, "zviz"),
                "run",
                "--bundle",
                bundle,
                f"zviz-bench-{i}",
            ],
            # The same without the fork server (runtime/forkserver.py): every import paid.
            "zviz-cold": lambda i: [
                "env",
                "ZVIZ_NO_FORKSERVER=1",
                _zviz(),
                "--root",
                os.path.join(work, "zviz"),
                "run",
                "--bundle",
                bundle,
                f"zviz-bench-cold-{i}",
            ],  # fmt: skip
            "runc": lambda i: [
                "runc",
                "--root",
                os.path.join(work, "runc"),
                "run",
                "--bundle",
                bundle,
                f"zviz-bench-runc-{i}",
            ],
        }
        runsc = shutil.which("runsc")
        if runsc:
            runners["runsc"] = lambda i: [
                runsc, "--root", os.path.join(work, "runsc"), "--network=none", "--ignore-cgroups",
                "--rootless=false", "run", "--bundle", bundle, f"zviz-bench-runsc-{i}",
            ]  # fmt: skip
        samples: dict[str, list[float]] = {name: [] for name in runners}
        skipped: dict[str, str] = {}
        for name, argv in runners.items():  # warm up (page cache, pyc) and find who works
            try:
                _time(argv("warm"), bundle)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                skipped[name] = str(exc)[:200]
        for i in range(RUNS):
            for name, argv in runners.items():
                if name not in skipped:
                    time.sleep(PAUSE_S)
                    samples[name].append(_time(argv(i), bundle))
        _print_table(
            f"`<runtime> run` of /bin/true, {RUNS} interleaved runs each", samples, skipped
        )
        _exec_table(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_table(title: str, samples: dict, skipped: dict) -> None:
    print(f"{title}, {PAUSE_S * 1000:.0f} ms apart (wall time)")
    print(f"{'runtime':<10} {'median ms':>10} {'p90 ms':>8} {'median vs runc':>15}")
    base = statistics.median(samples["runc"]) if samples.get("runc") else None
    for name, values in samples.items():
        if name in skipped:
            print(f"{name:<10} skipped: {skipped[name]}")
            continue
        median = statistics.median(values)
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"{name:<10} {median * 1000:>10.1f} {_p90(values) * 1000:>8.1f} {ratio:>15}")


def _exec_table(work: str) -> None:
    """`<runtime> exec ID /bin/true` into a running container (what a probe costs)."""
    bundle = build_bundle(os.path.join(work, "bundle-sleep"), args=["sleep", "600"])
    runtimes = {
        "zviz": [_zviz(), "--root", os.path.join(work, "zviz")],
        "runc": ["runc", "--root", os.path.join(work, "runc")],
    }
    names = {name: f"zviz-bench-exec-{name}-{os.getpid()}" for name in runtimes}
    samples: dict[str, list[float]] = {name: [] for name in runtimes}
    try:
        for name, base in runtimes.items():
            create = [*base, "run", "--detach", "--bundle", bundle, names[name]]
            # PID 1 keeps the stdio it is given: pipes would never reach EOF here.
            null = subprocess.DEVNULL
            subprocess.run(create, check=True, stdin=null, stdout=null, stderr=null)
            _time([*base, "exec", names[name], "true"], work)  # warm up
        for _ in range(RUNS):
            for name, base in runtimes.items():
                time.sleep(PAUSE_S)
                samples[name].append(_time([*base, "exec", names[name], "true"], work))
    finally:
        for name, base in runtimes.items():
            subprocess.run([*base, "delete", "--force", names[name]], capture_output=True)
    _print_table(f"`<runtime> exec ID /bin/true`, {RUNS} interleaved execs each", samples, {})


if __name__ == "__main__":
    main()
