"""One connect to a loopback listener: plain vs mediated by zviz's broker.

A static C program (bench/connect_probe/connbench.c) listens on 127.0.0.1 and times
socket + connect + accept + close, ITERATIONS times; only the connect differs between
the rows:

    runc (joined netns)            plain: the kernel's connect
    zviz ci-runner (own netns)     plain: a namespace of its own needs no broker
    zviz ci-runner (joined netns)  mediated: mode "none" in a shared namespace sends every
                                   connect through the broker (seccomp user notification,
                                   decision, the broker's connect on the caller's socket)

The joined namespace is one this benchmark makes (`ip netns add`, loopback up), as a
pod's would be. Rounds are interleaved; the table shows the median ns per iteration and
the ratio to runc; "added" is the mediated row minus the plain zviz row.

    python -m bench connect          (or: make bench)
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid

SOURCE = os.path.join(os.path.dirname(__file__), "connect_probe", "connbench.c")
ITERATIONS = 2000
ROUNDS = 5
# The joined namespace: `ip netns add NETNS_PREFIX-<random>`, removed at the end.
NETNS_PREFIX = "zviz-bench-connect"


def _bundle(tmp: str, binary: str, name: str, netns_path: str | None) -> str:
    from tools.mkbundle import build_bundle, default_config

    config = default_config(args=["/connbench", str(ITERATIONS)], terminal=False)
    if netns_path:
        for ns in config["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = netns_path
    path = os.path.join(tmp, name)
    build_bundle(path, args=["/connbench", str(ITERATIONS)], linux=config["linux"])
    shutil.copy2(binary, os.path.join(path, "rootfs", "connbench"))
    return path


def _run(cmd: list[str]) -> float | None:
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)["connect_ns"]
    print(f"  {cmd[0]} failed: {result.returncode} {result.stderr.strip()[-300:]}", file=sys.stderr)
    return None


def connect_table() -> dict:
    from tools.netns import NamedNetns

    tmp = tempfile.mkdtemp(prefix="zviz-bench-connect-")
    os.chmod(tmp, 0o755)  # container root is an unprivileged host uid: it must reach the bundle
    zviz = os.environ.get("ZVIZ_BIN", os.path.join(os.path.dirname(sys.executable), "zviz"))
    netns = None
    try:
        netns = NamedNetns(NETNS_PREFIX)
        binary = os.path.join(tmp, "connbench")
        subprocess.run(["gcc", "-static", "-O2", "-o", binary, SOURCE], check=True)
        own = _bundle(tmp, binary, "own", None)
        joined = _bundle(tmp, binary, "joined", netns.path)
        runtimes = {}
        if shutil.which("runc"):
            runtimes["runc (joined netns)"] = lambda: [
                "runc", "--root", f"{tmp}/runc", "run", "--bundle", joined,
                f"zviz-bench-{uuid.uuid4().hex[:8]}",
            ]  # fmt: skip
        for label, bundle in (("own netns", own), ("joined netns", joined)):
            runtimes[f"zviz ci-runner ({label})"] = lambda b=bundle: [
                zviz, "--root", f"{tmp}/zviz", "run", "--bundle", b, "--profile", "ci-runner",
                f"zviz-bench-{uuid.uuid4().hex[:8]}",
            ]  # fmt: skip
        samples = {name: [] for name in runtimes}
        for _ in range(ROUNDS):
            for name, command in runtimes.items():
                value = _run(command())
                if value is not None:
                    samples[name].append(value)
        table = {name: statistics.median(v) for name, v in samples.items() if v}
    finally:
        if netns is not None:
            netns.delete()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"connect to a loopback listener (socket+connect+accept+close), ns per iteration, "
        f"median of {ROUNDS} interleaved rounds x {ITERATIONS}:"
    )
    base = table.get("runc (joined netns)")
    for name, value in table.items():
        ratio = f" ({value / base:.2f}x runc)" if base else ""
        print(f"  {name:32} {value:>9.0f}{ratio}")
    plain, mediated = (
        table.get("zviz ci-runner (own netns)"),
        table.get("zviz ci-runner (joined netns)"),
    )
    if plain and mediated:
        print(
            f"  mediated / plain: {mediated / plain:.1f}x; the broker adds "
            f"{(mediated - plain) / 1000:.0f} us per connect"
        )
    return table


def main() -> None:
    connect_table()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
