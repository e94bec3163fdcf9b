"""Real software through containerd under zviz and under runc, side by side: the runner
and the workloads' commands, shared by the workload suite (integration/workloads/, which
asserts their output) and `make bench` (bench/workloads.py, which measures them).

Each workload runs under the profile docs/profiles.md recommends for its kind of
software; runc is the reference. The images come from tools/debimage.py.
"""

import os
import subprocess
import time
import uuid

RUNTIMES = {"runc": "io.containerd.runc.v2", "zviz": "io.containerd.zviz.v2"}

# --- the workloads: profile and commands (their images: tools/debimage.IMAGES) ---

# nginx as Debian's package starts it (as root; it hands its temp dirs to www-data).
NGINX_PROFILE = "web-server"
NGINX = ["nginx", "-g", "daemon off;"]
NGINX_SITE = "/var/www/html"

# Redis from its packaged config, in the foreground and logging to stdout.
REDIS_PROFILE = "web-server"
REDIS = ["redis-server", "/etc/redis/redis.conf", "--daemonize", "no", "--logfile", ""]

# A Python asyncio HTTP service (stdlib only): keep-alive HTTP/1.1, each reply counts the
# requests served so far.
PYTHON_PROFILE = "web-server"
PYTHON_PORT = 8080
PYTHON_SERVICE = """
import asyncio, json, sys

served = 0

async def handle(reader, writer):
    global served
    while True:
        try:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
        except asyncio.IncompleteReadError:  # the client closed its connection
            writer.close()
            return
        method, path, _ = head.split(b"\\r\\n", 1)[0].decode().split(" ")
        served += 1
        body = json.dumps({"path": path, "served": served}).encode()
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n"
                     b"Content-Length: %d\\r\\n\\r\\n" % len(body) + body)
        await writer.drain()

async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""
PYTHON = ["python3", "-c", PYTHON_SERVICE, str(PYTHON_PORT)]

# A Node.js HTTP service (its core `http` module) answering as the Python one does: the
# same client drives both (integration/workloads/http_service.py, bench/workloads.py).
NODE_PROFILE = "web-server"
NODE_PORT = 8080
NODE_SERVICE = """
const http = require("http");
let served = 0;
const server = http.createServer((request, response) => {
  served += 1;
  const body = JSON.stringify({ path: request.url, served: served });
  response.writeHead(200, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(body),
  });
  response.end(body);
});
// Longer than a client's pause between rounds: one connection serves them all.
server.keepAliveTimeout = 60000;
server.listen(Number(process.argv[1]), "0.0.0.0", () => console.log("listening"));
"""
# `node -e CODE ARG`: ARG is process.argv[1].
NODE = ["node", "-e", NODE_SERVICE, str(NODE_PORT)]

# PostgreSQL as its official image starts it: root prepares the data directory and drops
# to the postgres user (`setpriv`, as gosu does) for initdb and the server, on loopback.
POSTGRES_PROFILE = "web-server"
_PG_PATH = "PATH=$(echo /usr/lib/postgresql/*/bin):$PATH"
_PG_DATA = "/var/lib/postgresql/zviz-wl"
_AS_POSTGRES = "setpriv --reuid=postgres --regid=postgres --init-groups"
POSTGRES = [
    "sh",
    "-c",
    f"""
set -e
export {_PG_PATH}
mkdir -p {_PG_DATA} /run/postgresql
chown postgres:postgres {_PG_DATA} /run/postgresql
chmod 700 {_PG_DATA}
{_AS_POSTGRES} initdb --auth=trust --username=postgres -D {_PG_DATA}
exec {_AS_POSTGRES} postgres -D {_PG_DATA} -c listen_addresses=127.0.0.1
""",
]


def as_postgres(*args: str) -> list[str]:
    """ARGS (a PostgreSQL client program first) run as the postgres user."""
    return ["sh", "-c", f'export {_PG_PATH}; exec {_AS_POSTGRES} "$@"', "sh", *args]


# A CI job: clone of a bare repository (a read-only volume at CI_REPOSITORY), a gcc/make
# build, the built program run, and its pytest suite. In root's home: a directory of the
# image that ci-runner lets a job write (Landlock).
CI_PROFILE = "ci-runner"
CI_REPOSITORY = "/srv/repo.git"
CI_SOURCES = {
    "greet.c": """#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    printf("hello, %s\\n", argc > 1 ? argv[1] : "world");
    return argc > 2 ? (int)strlen(argv[2]) : 0;
}
""",
    "Makefile": "greet: greet.c\n\tgcc -O2 -Wall -Werror -o greet greet.c\n",
    "test_greet.py": """import subprocess

def run(*args):
    return subprocess.run(["./greet", *args], capture_output=True, text=True)

def test_greets_the_world():
    assert run().stdout == "hello, world\\n"

def test_greets_by_name():
    assert run("ci").stdout == "hello, ci\\n"

def test_exit_status_is_the_second_arguments_length():
    assert run("ci", "abcd").returncode == 4
""",
}
CI_JOB = [
    "sh",
    "-c",
    f"""
set -e
git clone -q {CI_REPOSITORY} /root/greet
cd /root/greet
make
./greet job
python3 -m pytest -q -p no:cacheprovider
""",
]


def ci_bare_repository(directory: str) -> str:
    """A bare repository of CI_SOURCES in DIRECTORY (made with the host's git)."""
    work = os.path.join(directory, "work")
    os.mkdir(work)
    for name, text in CI_SOURCES.items():
        with open(os.path.join(work, name), "w") as f:
            f.write(text)
    git = ["git", "-c", "user.name=zviz", "-c", "user.email=zviz@localhost", "-C", work]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "greet"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    bare = os.path.join(directory, "repo.git")
    subprocess.run(["git", "clone", "-q", "--bare", work, bare], check=True, capture_output=True)
    return bare


def _random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Workloads:
    """Containers of one runtime in one containerd; NEW_ID(prefix) names each (the suite
    passes integration/ids.unique_id, which tags them with its session)."""

    def __init__(self, containerd, runtime: str, log_dir: str, new_id=_random_id):
        self.containerd = containerd
        self.runtime = runtime
        self.log_dir = log_dir
        self.new_id = new_id
        self.containers: list[str] = []

    def run(
        self,
        image: str,
        args: list[str],
        profile: str,
        netns: str | None = None,
        mounts: tuple[str, ...] = (),
        detach: bool = False,
        timeout: float = 300,
    ) -> tuple[str, subprocess.CompletedProcess]:
        """`ctr run` of IMAGE with ARGS: zviz under PROFILE, runc as it is; in the network
        namespace at NETNS (else the new one ctr makes: loopback only). MOUNTS: ctr
        `--mount` values. Detached, the output goes to self.log(container)."""
        container_id = self.new_id(f"zviz-wl-{self.runtime}")
        options = ["--runtime", RUNTIMES[self.runtime]]
        if self.runtime == "zviz":
            options += ["--annotation", f"io.zviz.profile={profile}"]
        if netns:
            options += ["--with-ns", f"network:{netns}"]
        for mount in mounts:
            options += ["--mount", mount]
        if detach:
            options += ["-d", "--log-uri", f"file://{self.log_path(container_id)}"]
        else:
            options += ["--rm"]
        self.containers.append(container_id)
        result = self.containerd.ctr(
            "run", *options, image, container_id, *args, check=False, timeout=timeout
        )
        return container_id, result

    def exec(self, container_id: str, args: list[str], timeout: float = 300):
        return self.containerd.ctr(
            "task", "exec", "--exec-id", uuid.uuid4().hex[:16], container_id, *args,
            check=False, timeout=timeout,
        )  # fmt: skip

    def log_path(self, container_id: str) -> str:
        return os.path.join(self.log_dir, f"{container_id}.log")

    def log(self, container_id: str) -> str:
        try:
            with open(self.log_path(container_id), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def running(self, container_id: str) -> bool:
        listing = self.containerd.ctr("tasks", "ls", check=False).stdout
        return any(
            line.split()[:1] == [container_id] and "RUNNING" in line
            for line in listing.splitlines()
        )

    def wait_for(self, container_id: str, check, what: str, timeout: float = 60):
        """Poll CHECK() until it returns a true value; fail with the container's log."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if not self.running(container_id) or time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: not within {timeout}s under {self.runtime} "
                    f"(running: {self.running(container_id)}); log:\n{self.log(container_id)}"
                )
            time.sleep(0.2)

    def remove_all(self) -> None:
        for container_id in self.containers:
            ctr = self.containerd.ctr
            ctr("tasks", "kill", "-a", "-s", "SIGKILL", container_id, check=False)
            ctr("tasks", "delete", "-f", container_id, check=False, timeout=30)
            ctr("containers", "delete", container_id, check=False)
