"""PostgreSQL as its official image starts it: root prepares the data directory and drops
to the postgres user (`setpriv`, as gosu does), `initdb`, the server on its loopback, then
`pgbench -i` and a short `pgbench` run beside it. Profile: web-server (docs/profiles.md:
PostgreSQL serving; needs setresuid/setgroups to its user and chown of its data dir)."""

import re

PROFILE = "web-server"
CLIENTS = 2
TRANSACTIONS = 100  # per client
BIN = "/usr/lib/postgresql/15/bin"
DATA = "/var/lib/postgresql/zviz-wl"
AS_POSTGRES = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]

START = f"""
set -e
mkdir -p {DATA} /run/postgresql
chown postgres:postgres {DATA} /run/postgresql
chmod 700 {DATA}
{" ".join(AS_POSTGRES)} {BIN}/initdb --auth=trust --username=postgres -D {DATA}
exec {" ".join(AS_POSTGRES)} {BIN}/postgres -D {DATA} -c listen_addresses=127.0.0.1
"""


def test_pgbench_runs_transactions(workloads, workload_image):
    image = workload_image("postgres")
    container_id, started = workloads.run(
        image, ["sh", "-c", START], PROFILE, detach=True, timeout=120
    )
    assert started.returncode == 0, started.stderr

    def as_postgres(*args: str, timeout: float = 120):
        return workloads.exec(container_id, [*AS_POSTGRES, *args], timeout=timeout)

    workloads.wait_for(
        container_id,
        lambda: as_postgres(f"{BIN}/pg_isready", "-h", "127.0.0.1").returncode == 0,
        "postgres accepting connections",
        timeout=120,
    )
    initialized = as_postgres(f"{BIN}/pgbench", "-h", "127.0.0.1", "-i", "-s", "1", "postgres")
    assert initialized.returncode == 0, f"{initialized.stderr}\n{workloads.log(container_id)}"
    bench = as_postgres(
        f"{BIN}/pgbench", "-h", "127.0.0.1", "-c", str(CLIENTS), "-j", str(CLIENTS),
        "-t", str(TRANSACTIONS), "postgres",
    )  # fmt: skip
    assert bench.returncode == 0, f"{bench.stderr}\n{workloads.log(container_id)}"
    processed = re.search(r"number of transactions actually processed: (\d+)/(\d+)", bench.stdout)
    assert processed, bench.stdout
    assert int(processed[1]) == int(processed[2]) == CLIENTS * TRANSACTIONS, bench.stdout
    tps = re.search(r"^tps = ([\d.]+)", bench.stdout, re.M)
    assert tps and float(tps[1]) > 0, bench.stdout
    # The run's rows are in the database: pgbench logged each transaction in its history.
    counted = as_postgres(
        f"{BIN}/psql", "-h", "127.0.0.1", "-At", "-c", "select count(*) from pgbench_history",
        "postgres",
    )  # fmt: skip
    assert counted.stdout.strip() == str(CLIENTS * TRANSACTIONS), counted
