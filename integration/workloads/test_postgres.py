"""PostgreSQL as its official image starts it: root prepares the data directory and drops
to the postgres user (`setpriv`, as gosu does), `initdb`, the server on its loopback, then
`pgbench -i` and a short `pgbench` run beside it. Profile: web-server (docs/profiles.md:
PostgreSQL serving; needs setresuid/setgroups to its user and chown of its data dir)."""

import re

from tools.workloads import POSTGRES, POSTGRES_PROFILE, as_postgres

CLIENTS = 2
TRANSACTIONS = 100  # per client


def test_pgbench_runs_transactions(workloads, workload_image):
    image = workload_image("postgres")
    container_id, started = workloads.run(
        image, POSTGRES, POSTGRES_PROFILE, detach=True, timeout=120
    )
    assert started.returncode == 0, started.stderr

    def client(*args: str):
        return workloads.exec(container_id, as_postgres(*args), timeout=120)

    workloads.wait_for(
        container_id,
        lambda: client("pg_isready", "-h", "127.0.0.1").returncode == 0,
        "postgres accepting connections",
        timeout=120,
    )
    initialized = client("pgbench", "-h", "127.0.0.1", "-i", "-s", "1", "postgres")
    assert initialized.returncode == 0, f"{initialized.stderr}\n{workloads.log(container_id)}"
    bench = client(
        "pgbench", "-h", "127.0.0.1", "-c", str(CLIENTS), "-j", str(CLIENTS),
        "-t", str(TRANSACTIONS), "postgres",
    )  # fmt: skip
    assert bench.returncode == 0, f"{bench.stderr}\n{workloads.log(container_id)}"
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", bench.stdout)
    assert processed, bench.stdout
    assert int(processed[1]) == int(processed[2]) == CLIENTS * TRANSACTIONS, bench.stdout
    tps = re.search(r"^tps = ([\d.]+)", bench.stdout, re.M)
    assert tps and float(tps[1]) > 0, bench.stdout
    # The run's rows are in the database: pgbench logged each transaction in its history.
    counted = client(
        "psql", "-h", "127.0.0.1", "-At", "-c", "select count(*) from pgbench_history",
        "postgres",
    )  # fmt: skip
    assert counted.stdout.strip() == str(CLIENTS * TRANSACTIONS), counted
