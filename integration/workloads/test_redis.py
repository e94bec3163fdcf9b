"""Redis started from its Debian config, driven by `redis-benchmark` (a short run) from
inside the same container over its loopback. Profile: web-server (docs/profiles.md:
services; a client beside its server talks over 127.0.0.1)."""

import re

from tools.workloads import REDIS, REDIS_PROFILE

REQUESTS = 2000


def test_redis_benchmark_completes_requests(workloads, workload_image):
    image = workload_image("redis")
    container_id, started = workloads.run(image, REDIS, REDIS_PROFILE, detach=True)
    assert started.returncode == 0, started.stderr
    workloads.wait_for(
        container_id,
        lambda: workloads.exec(container_id, ["redis-cli", "ping"]).stdout.strip() == "PONG",
        "redis answering PING",
    )
    bench = workloads.exec(
        container_id,
        ["redis-benchmark", "-q", "-n", str(REQUESTS), "-c", "4", "-t", "set,get,incr"],
        timeout=120,
    )
    assert bench.returncode == 0, f"{bench.stderr}\nredis:\n{workloads.log(container_id)}"
    # One line per test, e.g. "SET: 41666.67 requests per second, p50=0.055 msec".
    rates = dict(re.findall(r"^(\w+): ([\d.]+) requests per second", bench.stdout, re.M))
    assert set(rates) == {"SET", "GET", "INCR"}, bench.stdout
    assert all(float(rate) > 0 for rate in rates.values()), rates
    # What the benchmark wrote is there: INCR ran REQUESTS times on its counter.
    counter = workloads.exec(container_id, ["redis-cli", "get", "counter:__rand_int__"])
    assert counter.stdout.strip() == str(REQUESTS), counter
