"""Real software through containerd under zviz and under runc, side by side: the runner
and the workloads' commands, shared by the workload suite (integration/workloads/, which
asserts their output) and `make bench` (bench/workloads.py, which measures them).

Each workload runs under the profile docs/profiles.md recommends for its kind of
software; runc is the reference. The images come from tools/debimage.py.
"""

import base64
import email.utils
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
import time
import uuid
import zipfile

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


# A CI job: clone of a bare repository (a read-only volume at CI_REPOSITORY) into /builds
# (as GitLab's runner does; the image has no /builds: ci-runner's writable list names it,
# and the job's root makes it under runc), `pip install` and `npm install` from the
# package index and registry that other containers serve in the job's network namespace
# (ci_package_sources, ci_package_server), a gcc/make build, the built program run, and
# its pytest suite.
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

# The package sources: static HTTP servers (python3's http.server, each serving a read-only
# volume at CI_PACKAGES) under web-server on ports web-server lets a service bind, in the
# job's network namespace: a pod's, where ci-runner's broker lets the job reach loopback.
CI_SOURCES_PROFILE = "web-server"
CI_PACKAGES = "/srv/packages"
CI_PORTS = {"pip": 8000, "npm": 8080, "apt": 9090}
CI_PIP_PACKAGE, CI_PIP_MODULE = "zviz-greet-helper", "zviz_greet_helper"
CI_NPM_PACKAGE = "zviz-greet-js"
CI_APT_PACKAGE = "zviz-greet-data"
CI_APT_FILE = "/usr/share/zviz-greet/greeting.txt"

CI_JOB = [
    "sh",
    "-c",
    f"""
set -e
mkdir -p /builds
git clone -q {CI_REPOSITORY} /builds/greet
cd /builds/greet
python3 -m pip install -q --user --break-system-packages --no-cache-dir \\
    --index-url http://127.0.0.1:{CI_PORTS["pip"]}/simple/ {CI_PIP_PACKAGE}
python3 -c 'import {CI_PIP_MODULE}; print({CI_PIP_MODULE}.shout("pip"))'
npm install --silent --no-audit --no-fund --no-update-notifier \\
    --registry http://127.0.0.1:{CI_PORTS["npm"]}/ {CI_NPM_PACKAGE}
node -e 'console.log(require("{CI_NPM_PACKAGE}").shout("npm"))'
make
./greet job
python3 -m pytest -q -p no:cacheprovider
""",
]

# The job's offline part (clone, build, test: no package source needed), as the profile
# learning tests run it (integration/test_profile_learn*.py).
CI_BUILD_JOB = [
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

# `apt-get install` from the apt repository server, the only source (the image's Debian
# mirror is unreachable and not wanted): dpkg writes /etc, /usr and /var of the rootfs.
CI_APT_JOB = [
    "sh",
    "-c",
    f"""
set -e
echo "deb [trusted=yes] http://127.0.0.1:{CI_PORTS["apt"]}/ ./" > /etc/apt/sources.list
rm -f /etc/apt/sources.list.d/*
apt-get -q -o Acquire::Retries=0 update
apt-get install -y -q {CI_APT_PACKAGE}
cat {CI_APT_FILE}
""",
]


# A profile of the operator's for jobs that install system packages: ci-runner, and the
# job's root may write the program directories of its own rootfs copy, which dpkg
# writes (docs/profiles.md, "The workload suite").
CI_APT_PROFILE = "ci-packages"
CI_APT_PROFILE_TOML = f"""[profile]
name = "{CI_APT_PROFILE}"
extends = "ci-runner"
description = "ci-runner, and apt-get/dpkg may install into the container's own rootfs"

[landlock]
writable_add = ["/etc", "/usr", "/var"]
"""


def ci_package_server(port: int) -> list[str]:
    """The command of a package source serving CI_PACKAGES on PORT ("Serving HTTP" once up)."""
    return ["python3", "-u", "-m", "http.server", "--directory", CI_PACKAGES, str(port)]


def start_ci_package_servers(runner, image: str, trees: dict[str, str], netns: str) -> None:
    """One container per source (IMAGE: one with python3) serving TREES (ci_package_sources)
    in the network namespace at NETNS, each waited for until it serves."""
    for kind, port in CI_PORTS.items():
        mount = f"type=bind,src={trees[kind]},dst={CI_PACKAGES},options=rbind:ro"
        container_id, started = runner.run(
            image, ci_package_server(port), CI_SOURCES_PROFILE, netns=netns,
            mounts=(mount,), detach=True,
        )  # fmt: skip
        if started.returncode != 0:
            raise RuntimeError(f"the {kind} source: {started.stderr.strip()}")
        runner.wait_for(
            container_id,
            lambda container_id=container_id: "Serving HTTP" in runner.log(container_id),
            f"the {kind} source",
        )


def ci_package_sources(directory: str) -> dict[str, str]:
    """The three sources' trees in DIRECTORY, built here from nothing (no registry): a
    pure-Python wheel in a PEP 503 simple index, an npm package tarball with its packument
    (npm asks GET /<name> and follows dist.tarball), and a .deb (dpkg-deb) in a flat apt
    repository (Packages, Release). Returns {"pip": dir, "npm": dir, "apt": dir}."""
    trees = {kind: os.path.join(directory, kind) for kind in CI_PORTS}
    for tree in trees.values():
        os.makedirs(tree, mode=0o755)
    _pip_index(trees["pip"])
    _npm_registry(trees["npm"], CI_PORTS["npm"])
    _apt_repository(trees["apt"])
    return trees


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, 0o644)  # the servers run as the container's root: "others" on the host


def _pip_index(tree: str) -> None:
    version = "1.0"
    dist_info = f"{CI_PIP_MODULE}-{version}.dist-info"
    files = {
        f"{CI_PIP_MODULE}.py": 'def shout(word):\n    return word.upper() + "!"\n',
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {CI_PIP_PACKAGE}\nVersion: {version}\n"
        ),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: zviz-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel_name = f"{CI_PIP_MODULE}-{version}-py3-none-any.whl"
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    project = os.path.join(tree, "simple", CI_PIP_PACKAGE)
    _write(os.path.join(project, wheel_name), wheel.getvalue())
    sha256 = hashlib.sha256(wheel.getvalue()).hexdigest()
    _write(
        os.path.join(project, "index.html"),
        f'<html><body><a href="{wheel_name}#sha256={sha256}">{wheel_name}</a></body></html>\n',
    )


def _npm_registry(tree: str, port: int) -> None:
    version = "1.0.0"
    files = {
        "package/package.json": json.dumps(
            {"name": CI_NPM_PACKAGE, "version": version, "main": "index.js"}
        ),
        "package/index.js": 'exports.shout = (word) => word.toUpperCase() + "!";\n',
    }
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:gz") as archive:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(text.encode()), 0o644
            archive.addfile(info, io.BytesIO(text.encode()))
    tarball = packed.getvalue()
    tarball_name = f"{CI_NPM_PACKAGE}-{version}.tgz"
    _write(os.path.join(tree, "tarballs", tarball_name), tarball)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    packument = {
        "name": CI_NPM_PACKAGE,
        "dist-tags": {"latest": version},
        "versions": {
            version: {
                "name": CI_NPM_PACKAGE,
                "version": version,
                "main": "index.js",
                "dist": {
                    "tarball": f"http://127.0.0.1:{port}/tarballs/{tarball_name}",
                    "shasum": hashlib.sha1(tarball).hexdigest(),
                    "integrity": integrity,
                },
            }
        },
    }
    _write(os.path.join(tree, CI_NPM_PACKAGE), json.dumps(packument))


def _apt_repository(tree: str) -> None:
    version = "1.0"
    with tempfile.TemporaryDirectory() as work:
        package = os.path.join(work, "package")
        _write(os.path.join(package, CI_APT_FILE.lstrip("/")), "hello from apt\n")
        _write(
            os.path.join(package, "DEBIAN", "control"),
            f"Package: {CI_APT_PACKAGE}\nVersion: {version}\nArchitecture: all\n"
            "Maintainer: zviz <zviz@localhost>\nDescription: the CI job's apt package\n",
        )
        deb_name = f"{CI_APT_PACKAGE}_{version}_all.deb"
        deb_path = os.path.join(tree, deb_name)
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "--build", package, deb_path],
            check=True, capture_output=True,
        )  # fmt: skip
        os.chmod(deb_path, 0o644)
    with open(deb_path, "rb") as f:
        deb = f.read()
    control = subprocess.run(
        ["dpkg-deb", "--field", deb_path], check=True, capture_output=True, text=True
    ).stdout
    packages = (
        control.rstrip("\n")
        + f"\nFilename: ./{deb_name}\nSize: {len(deb)}\n"
        + f"MD5sum: {hashlib.md5(deb).hexdigest()}\nSHA256: {hashlib.sha256(deb).hexdigest()}\n"
    )
    _write(os.path.join(tree, "Packages"), packages)
    release = (
        f"Origin: zviz\nLabel: zviz\nSuite: local\nCodename: local\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\nArchitectures: all amd64\n"
        f"SHA256:\n {hashlib.sha256(packages.encode()).hexdigest()} {len(packages)} Packages\n"
    )
    _write(os.path.join(tree, "Release"), release)


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
        shim_config: str | None = None,
    ) -> tuple[str, subprocess.CompletedProcess]:
        """`ctr run` of IMAGE with ARGS: zviz under PROFILE, runc as it is; in the network
        namespace at NETNS (else the new one ctr makes: loopback only). MOUNTS: ctr
        `--mount` values. Detached, the output goes to self.log(container). SHIM_CONFIG:
        the zviz shim's config for this container (the operator's: docs/shim.md)."""
        container_id = self.new_id(f"zviz-wl-{self.runtime}")
        options = ["--runtime", RUNTIMES[self.runtime]]
        if self.runtime == "zviz":
            options += ["--annotation", f"io.zviz.profile={profile}"]
            if shim_config:
                options += ["--runtime-config-path", shim_config]
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
