"""Real software under zviz and runc: each workload's load generator against each runtime in
turn, ROUNDS rounds interleaved (zviz, runc, zviz, ...) so drift on the machine hits both
alike; throughput and latency reported as zviz / runc (issue 14 item 6).

    python -m bench workloads     # ZVIZ_BENCH_WORKLOAD_SECONDS: each load's length (default 10)
    ZVIZ_BENCH_WORKLOADS=node,python python -m bench workloads   # only these (default: all)

The workloads, their profiles and images are the workload suite's (tools/workloads.py,
tools/debimage.py; integration/workloads/ checks that each works). Servers start once per
runtime and stay up across the rounds; their start is not measured.

- nginx, the Python asyncio service, the Node.js service: one keep-alive HTTP client (Python, in a peer network
  namespace on a veth: from outside the container, through its network) for SECONDS;
  requests per second, p50 and p99 latency. One client connection: the per-request cost.
- Redis: `redis-benchmark` (SET, GET; 4 clients) beside the server in its container.
- cpu_us_per_req (nginx, the services, Redis): the CPU time the container's cgroup spent
  per request (Redis: server and client, both in it). On a machine shared with other jobs
  throughput swings by several times between rounds; this figure barely moves.
- PostgreSQL: `pgbench -T SECONDS` (2 clients, 2 threads; scale 1) beside the server.
- CI job: the wall time of the whole job (`ctr run --rm`: clone, pip and npm install from
  the sources other containers serve in its network namespace, build, pytest).
"""

import csv
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from tools import debimage, workloads
from tools.containerd import PrivateContainerd
from tools.netns import NETNS_DIR, entering

ROUNDS = 3
SECONDS = float(os.environ.get("ZVIZ_BENCH_WORKLOAD_SECONDS", "10"))
RUNTIMES = ("zviz", "runc")
REDIS_REQUESTS = 100000  # per test (SET, GET)
WORKLOADS = ("nginx", "python", "node", "redis", "postgres", "ci-job")
SELECTED = tuple(
    name for name in os.environ.get("ZVIZ_BENCH_WORKLOADS", ",".join(WORKLOADS)).split(",") if name
)
# The images each workload runs (tools/debimage.IMAGES); the CI job's package sources
# serve from the python image.
IMAGES = {"nginx": ("nginx",), "python": ("python",), "node": ("node",), "redis": ("redis",),
          "postgres": ("postgres",), "ci-job": ("ci", "python")}  # fmt: skip
POD_IP = "10.212.9.1"
CLIENT_IP = "10.212.9.2"

HTTP_LOAD = """
import http.client, json, sys, time
host, port, path, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + 30
while True:
    try:
        connection = http.client.HTTPConnection(host, port, timeout=5)
        connection.request("GET", path)
        connection.getresponse().read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
latencies = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    started = time.perf_counter()
    connection.request("GET", path)
    reply = connection.getresponse()
    reply.read()
    latencies.append(time.perf_counter() - started)
    assert reply.status == 200, reply.status
latencies.sort()
print(json.dumps({"rps": len(latencies) / seconds,
                  "p50_ms": latencies[len(latencies) // 2] * 1000,
                  "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}))
"""


def _bench_id(prefix: str) -> str:
    return f"zviz-bench-{prefix}-{uuid.uuid4().hex[:8]}"


class _Netns:
    """A netns for a server container, wired by a veth to a client netns."""

    def __init__(self):
        suffix = uuid.uuid4().hex[:6]
        self.names = [f"zviz-bench-wl-{suffix}", f"zviz-bench-wlc-{suffix}"]
        for name in self.names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        ends = [f"zbw{suffix}", f"zbc{suffix}"]
        subprocess.run(
            ["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]], check=True
        )
        for name, end, address in zip(self.names, ends, (POD_IP, CLIENT_IP), strict=True):
            subprocess.run(["ip", "link", "set", end, "netns", name], check=True)
            subprocess.run(
                ["ip", "-n", name, "addr", "add", f"{address}/24", "dev", end], check=True
            )
            subprocess.run(["ip", "-n", name, "link", "set", end, "up"], check=True)
        self.server = os.path.join(NETNS_DIR, self.names[0])
        self.client = os.path.join(NETNS_DIR, self.names[1])

    def delete(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def _http_load(netns: _Netns, port: int, path: str) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", HTTP_LOAD, POD_IP, str(port), path, str(SECONDS)],
        preexec_fn=entering(netns.client),
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"HTTP load on {path}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def _cgroup_cpu_file(pid: int) -> tuple[str, float]:
    """The file counting the CPU time of PID's cgroup, and its unit in µs: cgroup v2's
    cpu.stat (usage_usec) or v1's cpuacct.usage (ns), found through /proc, not assumed."""
    with open(f"/proc/{pid}/cgroup") as f:
        groups = [line.rstrip("\n").split(":", 2) for line in f]
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            mounts.append((fstype, fields[4], fields[-1].split(",")))
    for _, controllers, path in groups:
        if "cpuacct" in controllers.split(","):
            for fstype, point, options in mounts:
                if fstype == "cgroup" and "cpuacct" in options:
                    return f"{point}{path}/cpuacct.usage", 1e-3
    for hierarchy, _, path in groups:
        if hierarchy == "0":
            for fstype, point, _ in mounts:
                if fstype == "cgroup2":
                    return f"{point}{path}/cpu.stat", 1.0
    raise RuntimeError(f"no cpu accounting cgroup for pid {pid}")


def _cpu_us(counter: tuple[str, float]) -> float:
    path, unit_us = counter
    with open(path) as f:
        text = f.read()
    if path.endswith("cpu.stat"):
        text = dict(line.split() for line in text.splitlines())["usage_usec"]
    return int(text) * unit_us


def _checked(result: subprocess.CompletedProcess, what: str) -> str:
    if result.returncode != 0:
        raise RuntimeError(f"{what}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _wait(runner: workloads.Workloads, container_id: str, args: list[str], what: str) -> None:
    runner.wait_for(
        container_id, lambda: runner.exec(container_id, args).returncode == 0, what, timeout=120
    )


class _Servers:
    """One runtime's long-lived servers and how to load each."""

    def __init__(self, containerd, runtime: str, work: str):
        self.runner = workloads.Workloads(containerd, runtime, work, new_id=_bench_id)
        self.nets: dict[str, _Netns] = {}
        self.site = os.path.join(work, f"site-{runtime}")
        self.ci_packages = os.path.join(work, f"ci-packages-{runtime}")
        self.ids: dict[str, str] = {}

    def start(self, images: dict[str, str], selected: tuple[str, ...]) -> None:
        for name in ("nginx", "python", "node", "ci-job"):
            if name in selected:
                self.nets[name] = _Netns()
        run = self.runner.run
        if "nginx" in selected:
            os.makedirs(self.site, mode=0o755)
            with open(os.path.join(self.site, "bench.txt"), "w") as f:
                f.write("x" * 1024)
            os.chmod(os.path.join(self.site, "bench.txt"), 0o644)
            mount = f"type=bind,src={self.site},dst={workloads.NGINX_SITE},options=rbind:ro"
            self.ids["nginx"] = run(
                images["nginx"], workloads.NGINX, workloads.NGINX_PROFILE,
                netns=self.nets["nginx"].server, mounts=(mount,), detach=True,
            )[0]  # fmt: skip
        for name, args, profile in (
            ("python", workloads.PYTHON, workloads.PYTHON_PROFILE),
            ("node", workloads.NODE, workloads.NODE_PROFILE),
        ):
            if name in selected:
                self.ids[name] = run(
                    images[name], args, profile, netns=self.nets[name].server, detach=True
                )[0]
        if "ci-job" in selected:
            # The job's pip index and npm registry, in the job's network namespace.
            trees = workloads.ci_package_sources(self.ci_packages)
            workloads.start_ci_package_servers(
                self.runner, images["python"], trees, self.nets["ci-job"].server
            )
        if "redis" in selected:
            self.ids["redis"] = run(
                images["redis"], workloads.REDIS, workloads.REDIS_PROFILE, detach=True
            )[0]
            _wait(self.runner, self.ids["redis"], ["redis-cli", "ping"], "redis")
        if "postgres" in selected:
            self.ids["postgres"] = run(
                images["postgres"], workloads.POSTGRES, workloads.POSTGRES_PROFILE, detach=True
            )[0]
            ready = workloads.as_postgres("pg_isready", "-h", "127.0.0.1")
            _wait(self.runner, self.ids["postgres"], ready, "postgres")
            _checked(
                self.runner.exec(self.ids["postgres"], self._pg("pgbench", "-i", "-s", "1")),
                "pgbench -i",
            )

    @staticmethod
    def _pg(program: str, *args: str) -> list[str]:
        return workloads.as_postgres(program, "-h", "127.0.0.1", *args, "postgres")

    def _cpu_counter(self, name: str) -> tuple[str, float]:
        """The CPU-time counter of workload NAME's container: the CPU it spends per
        request is what a busy shared machine changes least (throughput swings with the
        other jobs' load; the counter only adds what this container ran)."""
        listing = self.runner.containerd.ctr("tasks", "ls").stdout
        pid = next(
            int(line.split()[1])
            for line in listing.splitlines()
            if line.split()[:1] == [self.ids[name]]
        )
        return _cgroup_cpu_file(pid)

    def _http(self, name: str, port: int, path: str) -> dict[str, float]:
        counter = self._cpu_counter(name)
        before = _cpu_us(counter)
        figures = _http_load(self.nets[name], port, path)
        requests = figures["rps"] * SECONDS
        figures["cpu_us_per_req"] = (_cpu_us(counter) - before) / requests
        return figures

    def nginx(self) -> dict[str, float]:
        return self._http("nginx", 80, "/bench.txt")

    def python(self) -> dict[str, float]:
        return self._http("python", workloads.PYTHON_PORT, "/bench")

    def node(self) -> dict[str, float]:
        return self._http("node", workloads.NODE_PORT, "/bench")

    def redis(self) -> dict[str, float]:
        counter = self._cpu_counter("redis")
        before = _cpu_us(counter)
        out = _checked(
            self.runner.exec(
                self.ids["redis"],
                ["redis-benchmark", "--csv", "-c", "4", "-n", str(REDIS_REQUESTS), "-t", "set,get"],
            ),
            "redis-benchmark",
        )
        # Server and client both: redis-benchmark runs in the container (its cgroup).
        cpu_per_request = (_cpu_us(counter) - before) / (2 * REDIS_REQUESTS)
        rows = {row["test"]: row for row in csv.DictReader(io.StringIO(out))}
        figures = {
            f"{test.lower()}_{field}": float(rows[test][column])
            for test in ("SET", "GET")
            for field, column in (("rps", "rps"), ("p99_ms", "p99_latency_ms"))
        }
        figures["cpu_us_per_req"] = cpu_per_request
        return figures

    def postgres(self) -> dict[str, float]:
        out = _checked(
            self.runner.exec(
                self.ids["postgres"],
                self._pg("pgbench", "-c", "2", "-j", "2", "-T", str(int(SECONDS))),
                timeout=SECONDS + 120,
            ),
            "pgbench",
        )
        tps = re.search(r"^tps = ([\d.]+)", out, re.M)
        latency = re.search(r"^latency average = ([\d.]+) ms", out, re.M)
        if not (tps and latency):
            raise RuntimeError(f"pgbench printed no tps: {out}")
        return {"tps": float(tps[1]), "latency_avg_ms": float(latency[1])}

    def stop(self) -> None:
        self.runner.remove_all()
        for net in self.nets.values():
            net.delete()


def _ci_job(containerd, runtime: str, image: str, repository: str, work: str, netns: str) -> dict:
    runner = workloads.Workloads(containerd, runtime, work, new_id=_bench_id)
    mount = f"type=bind,src={repository},dst={workloads.CI_REPOSITORY},options=rbind:ro"
    started = time.perf_counter()
    _, job = runner.run(image, workloads.CI_JOB, workloads.CI_PROFILE, netns=netns, mounts=(mount,))
    elapsed = time.perf_counter() - started
    runner.remove_all()
    _checked(job, "CI job")
    return {"wall_s": elapsed}


# Whether a larger figure is the better one, by the metric's name.
def _higher_is_better(metric: str) -> bool:
    return metric.endswith("rps") or metric == "tps"


def main() -> None:
    work = tempfile.mkdtemp(prefix="zviz-bench-wl-", dir="/var/tmp")
    os.chmod(work, 0o755)
    # The images' content and snapshots on a disk, not under /run (often a small tmpfs).
    root = os.path.join(work, "containerd")
    os.mkdir(root, 0o711)
    containerd = PrivateContainerd(debug=False, root_dir=root).start()
    servers: dict[str, _Servers] = {}
    try:
        unknown = set(SELECTED) - set(WORKLOADS)
        if unknown:
            raise RuntimeError(f"ZVIZ_BENCH_WORKLOADS: unknown {sorted(unknown)}; {WORKLOADS}")
        images = {}
        for name in sorted({name for workload in SELECTED for name in IMAGES[workload]}):
            archive, images[name] = debimage.ensure(name)
            containerd.import_image(archive)
        repository = workloads.ci_bare_repository(work)
        for runtime in RUNTIMES:
            servers[runtime] = _Servers(containerd, runtime, work)
            servers[runtime].start(images, SELECTED)
        results: dict[str, dict[str, dict[str, list[float]]]] = {}
        for _ in range(ROUNDS):
            for runtime in RUNTIMES:
                server = servers[runtime]
                loads = {
                    "nginx": server.nginx,
                    "python": server.python,
                    "node": server.node,
                    "redis": server.redis,
                    "postgres": server.postgres,
                    "ci-job": lambda runtime=runtime, server=server: _ci_job(
                        containerd,
                        runtime,
                        images["ci"],
                        repository,
                        work,
                        server.nets["ci-job"].server,
                    ),  # fmt: skip
                }
                measured = {workload: loads[workload]() for workload in SELECTED}
                for workload, figures in measured.items():
                    for metric, value in figures.items():
                        per_runtime = results.setdefault(workload, {}).setdefault(metric, {})
                        per_runtime.setdefault(runtime, []).append(value)
        print(f"workloads: {ROUNDS} rounds interleaved, {SECONDS:g} s loads; median per runtime")
        print(f"{'workload':<9} {'metric':<15} {'zviz':>10} {'runc':>10} {'zviz/runc':>10}")
        for workload, metrics in results.items():
            for metric, per_runtime in metrics.items():
                zviz, runc = (statistics.median(per_runtime[r]) for r in RUNTIMES)
                better = "higher" if _higher_is_better(metric) else "lower"
                print(
                    f"{workload:<9} {metric:<15} {zviz:>10.2f} {runc:>10.2f} "
                    f"{zviz / runc:>9.3f}x ({better} is better)"
                )
    finally:
        for server in servers.values():
            server.stop()
        containerd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
