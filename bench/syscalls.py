"""Syscall costs inside a zviz container vs runc (no filter) vs gVisor (runsc) vs native.

One static C program (bench/syscalls_probe/sysbench.c) times getpid, clock_gettime,
read, write and open+close; every round runs it once per runtime, interleaved, and
the table shows the median ns per call and the ratio to runc. Then the cost of the
security layers in PID 1 (prepare + apply) is measured in forked children.

The "native +" rows are the floor: the same program confining itself with a
one-instruction allow-all seccomp filter and/or a Landlock ruleset shaped like zviz's,
no runtime at all. What the kernel charges for a layer by itself is what any runtime
applying that layer pays; zviz's overhead over runc is compared with it.

    python -m bench syscalls          (or: make bench)
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

SOURCE = os.path.join(os.path.dirname(__file__), "syscalls_probe", "sysbench.c")
ITERATIONS = 20000
ROUNDS = 5
CALLS = ("getpid", "clock_gettime", "read", "write", "open_close")


def _build(tmp: str) -> str:
    binary = os.path.join(tmp, "sysbench")
    subprocess.run(["gcc", "-static", "-O2", "-o", binary, SOURCE], check=True)
    return binary


def _bundle(tmp: str, binary: str, name: str) -> str:
    from tools.mkbundle import build_bundle

    path = os.path.join(tmp, name)
    build_bundle(path, args=["/sysbench", str(ITERATIONS)])
    shutil.copy2(binary, os.path.join(path, "rootfs", "sysbench"))
    return path


def _add_equivalent_filter(bundle: str) -> None:
    from runtime.security.profiles import load_profile

    profile = load_profile("ci-runner")
    names = sorted(set(profile.allow) | {"clone", "socket", "ioctl", "personality"})
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}],
    }
    with open(path, "w") as f:
        json.dump(config, f)


def _run(cmd: list[str]) -> dict | None:
    # An empty pipe on stdin, not /dev/null: runsc would chown the host's to nobody.
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, input="")
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    print(f"  {cmd[0]} failed: {result.returncode} {result.stderr.strip()[-300:]}", file=sys.stderr)
    return None


def syscall_table() -> dict:
    tmp = tempfile.mkdtemp(prefix="zviz-bench-sys-")
    os.chmod(tmp, 0o755)  # container root is an unprivileged host uid: it must reach the bundle
    venv = os.path.dirname(sys.executable)
    zviz = os.environ.get("ZVIZ_BIN", os.path.join(venv, "zviz"))
    runtimes = {}
    try:
        binary = _build(tmp)
        bundle = _bundle(tmp, binary, "bundle")
        runtimes["native"] = lambda: [binary, str(ITERATIONS)]
        for layers in (["seccomp"], ["landlock"], ["seccomp", "landlock"]):
            runtimes["native + " + " + ".join(layers)] = lambda layers=layers: [
                binary, str(ITERATIONS), *layers
            ]  # fmt: skip
        if os.access(zviz, os.X_OK):
            for profile in ("ci-runner", "hostile-tenant"):
                runtimes[f"zviz {profile}"] = lambda p=profile: [
                    zviz, "--root", f"{tmp}/zviz", "run", "--bundle", bundle,
                    "--profile", p, f"zviz-bench-{uuid.uuid4().hex[:8]}",
                ]  # fmt: skip
        if shutil.which("runc"):
            runtimes["runc"] = lambda: [
                "runc", "--root", f"{tmp}/runc", "run", "--bundle", bundle,
                f"zviz-bench-{uuid.uuid4().hex[:8]}",
            ]  # fmt: skip
            # runc with a seccomp filter of the same size (ci-runner's allow list as OCI
            # JSON): what any seccomp-filtered container pays at syscall entry.
            filtered = _bundle(tmp, binary, "bundle-seccomp")
            _add_equivalent_filter(filtered)
            runtimes["runc + seccomp"] = lambda: [
                "runc", "--root", f"{tmp}/runc", "run", "--bundle", filtered,
                f"zviz-bench-{uuid.uuid4().hex[:8]}",
            ]  # fmt: skip
        if shutil.which("runsc"):
            runtimes["gVisor (runsc)"] = lambda: [
                "runsc", "--root", f"{tmp}/runsc", "--network=none", "run", "--bundle", bundle,
                f"zviz-bench-{uuid.uuid4().hex[:8]}",
            ]  # fmt: skip
        samples = {name: {call: [] for call in CALLS} for name in runtimes}
        for _ in range(ROUNDS):
            for name, command in runtimes.items():
                result = _run(command())
                if result:
                    for call in CALLS:
                        samples[name][call].append(result[call])
        table = {
            name: {call: statistics.median(v) for call, v in calls.items() if v}
            for name, calls in samples.items()
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"ns per call, median of {ROUNDS} interleaved rounds x {ITERATIONS} calls:")
    print(f"{'runtime':26}" + "".join(f"{c:>15}" for c in CALLS))
    base = table.get("runc", {})
    for name, row in table.items():
        cells = []
        for call in CALLS:
            if call not in row:
                cells.append(f"{'-':>15}")
                continue
            ratio = f" ({row[call] / base[call]:.2f}x)" if base.get(call) else ""
            cells.append(f"{row[call]:>7.0f}{ratio:>8}")
        print(f"{name:26}" + "".join(cells))
    _print_floor(table)
    return table


def _print_floor(table: dict) -> None:
    """zviz's ns over runc beside what seccomp + Landlock cost with no runtime at all."""
    native, both = table.get("native"), table.get("native + seccomp + landlock")
    zviz, runc = table.get("zviz ci-runner"), table.get("runc")
    if not (native and both and zviz and runc):
        return
    print("\nns added per call: zviz ci-runner over runc | seccomp + Landlock alone over native")
    for call in CALLS:
        if all(call in row for row in (native, both, zviz, runc)):
            added, floor = zviz[call] - runc[call], both[call] - native[call]
            print(f"  {call:14} {added:>7.0f} | {floor:>7.0f}")


def layer_cost(samples: int = 20) -> dict:
    """prepare() + apply() in a forked child (what PID 1 pays), ms, median."""
    from runtime import security
    from runtime.spec import parse_spec
    from tools.mkbundle import default_config

    tmp = tempfile.mkdtemp(prefix="zviz-bench-layers-")
    os.makedirs(f"{tmp}/rootfs")
    results = {}
    try:
        for profile_name, verbose in (("ci-runner", False), ("hostile-tenant", False)):
            times = {"harden_spec": [], "prepare": [], "apply": []}
            for _ in range(samples):
                spec = parse_spec(default_config(["true"], terminal=False), tmp)
                profile = security.resolve_profile(profile_name, {})
                t0 = time.perf_counter()
                security.harden_spec(spec, profile)
                times["harden_spec"].append(time.perf_counter() - t0)
                spec.linux.namespaces = [n for n in spec.linux.namespaces if n.type != "network"]
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    try:
                        t0 = time.perf_counter()
                        plan = security.prepare(spec, profile, verbose)
                        t1 = time.perf_counter()
                        security.apply(plan, None)
                        t2 = time.perf_counter()
                        os.write(w, json.dumps([t1 - t0, t2 - t1]).encode())
                    finally:
                        os._exit(0)
                os.close(w)
                data = os.read(r, 200)
                os.close(r)
                os.waitpid(pid, 0)
                prep, app = json.loads(data)
                times["prepare"].append(prep)
                times["apply"].append(app)
            results[profile_name] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nsecurity layer setup, ms (median of {samples}; harden_spec in the parent with a warm BPF cache):"
    )
    for name, row in results.items():
        print(f"  {name:16} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
    return results


def main() -> None:
    syscall_table()
    layer_cost()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
