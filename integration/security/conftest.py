"""Fixtures for the escape probes: the static probe binary and a runner for zviz and runc."""

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import typing

import pytest

from integration.ids import tagged, unique_id
from tests.served_socket import ServedSocket
from tools.mkbundle import build_bundle, default_config

PROBE_SOURCE = os.path.join(os.path.dirname(__file__), "probes", "probe.c")
CACHE = os.path.join(tempfile.gettempdir(), "zviz-security-probes")


def build_probe(source: str = PROBE_SOURCE) -> str:
    """gcc -static a probe program once per source version; cached under the temp dir."""
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(CACHE, f"{stem}-{digest}")
    if not os.path.exists(path):
        gcc = shutil.which("gcc")
        if gcc is None:
            pytest.skip(
                "gcc missing: the escape probes are C programs (apt-get install gcc libc6-dev)"
            )
        os.makedirs(CACHE, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        subprocess.run([gcc, "-static", "-O2", "-o", tmp, source, "-lpthread"], check=True)
        os.rename(tmp, path)
    return path


BROKER_PROBE_SOURCE = os.path.join(os.path.dirname(__file__), "probes", "broker_probe.c")


def build_broker_probe() -> str:
    """gcc -static probes/broker_probe.c once per source version, as build_probe does."""
    with open(BROKER_PROBE_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    path = os.path.join(CACHE, f"broker-probe-{digest}")
    if not os.path.exists(path):
        gcc = shutil.which("gcc")
        if gcc is None:
            pytest.skip("gcc missing: the broker probes are C programs")
        os.makedirs(CACHE, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        subprocess.run([gcc, "-static", "-O2", "-o", tmp, BROKER_PROBE_SOURCE], check=True)
        os.rename(tmp, path)
    return path


@pytest.fixture(scope="session")
def broker_probe() -> str:
    return build_broker_probe()


@pytest.fixture(scope="session")
def probe_bin() -> str:
    return build_probe()


def host_listener_socket() -> ServedSocket:
    """A TCP listener on the host's loopback that greets whoever reaches it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def greet(sock):
        conn, _ = sock.accept()
        with conn, contextlib.suppress(OSError):  # a probe may be gone before the greeting
            conn.sendall(b"zviz-host-listener\n")

    return ServedSocket(server, greet)


@pytest.fixture(scope="session")
def host_listener():
    with host_listener_socket() as server:
        yield f"127.0.0.1:{server.sock.getsockname()[1]}"


class ProbeRunner:
    """Runs `probe NAME ARG` in a fresh busybox bundle under zviz (a profile) or runc."""

    def __init__(self, base: str, probe: str, zviz: str, runc: str):
        self.base, self.probe, self.zviz, self.runc = base, probe, zviz, runc

    def bundle(self, args, **config) -> str:
        path = os.path.join(self.base, unique_id("bundle"))
        build_bundle(path, args=args, **config)
        # A writable /tmp volume, as a real job has: the read-only rootfs stays read-only.
        with open(os.path.join(path, "config.json")) as f:
            spec = json.load(f)
        spec["mounts"].append(
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"],
            }
        )
        write_json(os.path.join(path, "config.json"), spec)
        # Mount points exist in the image, as in a real one (the mapped container root
        # cannot create them in a rootfs owned by host root).
        for mount in spec["mounts"]:
            if mount.get("type") == "bind":
                os.makedirs(
                    os.path.join(path, "rootfs", mount["destination"].lstrip("/")), exist_ok=True
                )
        shutil.copy2(self.probe, os.path.join(path, "rootfs", "probe"))
        return path

    def run(
        self,
        runtime: str,
        profile: str | None,
        args,
        *,
        verbose=False,
        timeout=120,
        config=None,
        cid=None,
        image_change=None,
        env=None,
        flags=(),
    ):
        bundle = self.bundle(args, **(config or {}))
        if image_change:  # a malicious image: the callable edits the rootfs
            image_change(os.path.join(bundle, "rootfs"))
        cid = cid or unique_id("zviz-sec")
        root = os.path.join(self.base, f"root-{runtime}")
        if runtime == "zviz":
            cmd = [self.zviz, "--root", root, "run", "--bundle", bundle]
            if profile:
                cmd += ["--profile", profile]
            if verbose:
                cmd.append("--verbose")
            cmd += list(flags)
        else:
            cmd = [self.runc, "--root", root, "run", "--bundle", bundle]
        cmd.append(cid)
        try:
            result = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env} if env else None,
            )
        finally:
            delete = [
                self.zviz if runtime == "zviz" else self.runc,
                "--root",
                root,
                "delete",
                "-f",
                cid,
            ]
            subprocess.run(delete, capture_output=True)
            shutil.rmtree(bundle, ignore_errors=True)
        return result

    def verdict(self, runtime: str, profile: str | None, name: str, arg: str | None = None):
        """Verdict(word, outcome, detail): word is BLOCKED, ESCAPED or ERROR; outcome what
        stopped the probe: an errno name ("EPERM"), a signal name ("SIGKILL"), NO_ERRNO for
        a check that found nothing to exploit, ESCAPED, or ERROR."""
        args = ["/probe", name] + ([arg] if arg else [])
        return parse_verdict(name, self.run(runtime, profile, args))


class Verdict(typing.NamedTuple):
    word: str
    outcome: str
    detail: str


# The outcome of a BLOCKED line with no errno (probe.c: "no errno").
NO_ERRNO = "no errno"
ERRNO_NAME = re.compile(r": errno \d+ (E[A-Z0-9]+) \(")


def parse_verdict(name: str, result: subprocess.CompletedProcess) -> Verdict:
    lines = [
        line
        for line in result.stdout.splitlines()
        if line.split(" ", 1)[0] in ("BLOCKED", "ESCAPED", "ERROR")
    ]
    if lines:
        word, _, detail = lines[-1].partition(" ")
        if word != "BLOCKED":
            return Verdict(word, word, detail)
        if detail.endswith(f": {NO_ERRNO}"):
            return Verdict(word, NO_ERRNO, detail)
        found = ERRNO_NAME.search(detail)
        if found is None:
            return Verdict("ERROR", "ERROR", f"BLOCKED line without an errno name: {detail}")
        return Verdict(word, found.group(1), detail)
    # Killed before it printed (OOM kill, seccomp kill): the runtime exits 128 + signal.
    if result.returncode > 128 or result.returncode < 0:
        number = result.returncode - 128 if result.returncode > 128 else -result.returncode
        try:
            signame = signal.Signals(number).name
        except ValueError:
            signame = f"signal {number}"
        return Verdict("BLOCKED", signame, f"{name}: killed by {signame}")
    return Verdict(
        "ERROR", "ERROR", f"{name}: exit {result.returncode}: {result.stderr.strip()[-300:]}"
    )


@pytest.fixture(scope="session")
def probes(probe_bin, zviz_bin, runc_bin):
    # ZVIZ_BIN runs the probes against another zviz build (e.g. a work-in-progress tree).
    zviz = os.environ.get("ZVIZ_BIN", zviz_bin)
    # Container root is an unprivileged host uid: the bundle must be reachable by it
    # (pytest's tmp dirs are 0700 root).
    base = tempfile.mkdtemp(prefix=tagged("zviz-sec") + "-")
    os.chmod(base, 0o755)
    try:
        yield ProbeRunner(base, probe_bin, zviz, runc_bin)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def on_the_hosts_network() -> dict:
    """config.json overrides for a container on the host's network namespace (with
    `zviz run --allow-host-network`): the one place a web-server container's loopback is
    not its own, so the broker's egress rules decide it (issue 14)."""
    linux = copy.deepcopy(default_config(["true"])["linux"])
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
    return {"linux": linux}


HOST_NETWORK_FLAG = "--allow-host-network"


def write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
