"""`zviz profile learn` (issue 15 item 4): learn -> run -> probe.

A workload runs once under `zviz profile learn --base BASE -- zviz run ...`; the profile
it writes must let the same workload run enforcing, and a probe that does one thing the
workload never did (a syscall BASE denies, a write to another directory, a connect to
another endpoint, a bind of another port) must still be refused.

The busybox cases each need one part of learning (without it the enforcing run fails);
the workload cases run the suite's Debian images (integration/workloads, `make images`)
from bundles made of their cached archives.
"""

import contextlib
import json
import os
import shutil
import subprocess
import tempfile

import pytest

from integration.ids import tagged, unique_id
from integration.podnet import PEER_IP, POD_IP, PodNetwork
from integration.zviz_cli import edit_config

# One action per argument; prints "ACTION ok" or "ACTION errno N".
PROBE_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static void report(const char *what, long rc) {
    if (rc < 0) printf("%s errno %d\n", what, errno);
    else printf("%s ok\n", what);
    fflush(stdout);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char *a = argv[i];
        if (!strcmp(a, "kcmp")) {
            pid_t me = getpid();
            report(a, syscall(SYS_kcmp, me, me, 0, 0, 0));
        } else if (!strcmp(a, "sysfs")) {
            report(a, syscall(SYS_sysfs, 3));
        } else if (!strcmp(a, "unshare")) {
            report(a, unshare(CLONE_NEWUTS));
        } else if (!strncmp(a, "write:", 6)) {
            int fd = open(a + 6, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) { report(a, write(fd, "x\n", 2)); close(fd); }
            else report(a, -1);
        } else if (!strncmp(a, "connect:", 8)) {
            char host[64]; int port;
            sscanf(a + 8, "%63[^:]:%d", host, &port);
            struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
            inet_pton(AF_INET, host, &sa.sin_addr);
            int s = socket(AF_INET, SOCK_STREAM, 0);
            if (s < 0) { report(a, -1); continue; }
            report(a, connect(s, (struct sockaddr *)&sa, sizeof sa));
            close(s);
        } else {
            printf("%s unknown\n", a);
        }
    }
    return 0;
}
"""
EPERM, EACCES, EROFS, ECONNREFUSED = 1, 13, 30, 111


@pytest.fixture(scope="module")
def probe_binary(tmp_path_factory) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc missing: the learning probe is a static C program")
    directory = tmp_path_factory.mktemp(tagged("learn-probe"))
    source = directory / "probe.c"
    source.write_text(PROBE_C)
    binary = str(directory / "probe")
    subprocess.run([gcc, "-static", "-O2", "-o", binary, str(source)], check=True)
    return binary


@pytest.fixture
def learn_root(tmp_path) -> str:
    root = tmp_path / tagged("learn-root")
    root.mkdir()
    return str(root)


def _answers(stdout: str) -> dict[str, str]:
    answers = {}
    for line in stdout.splitlines():
        what, _, result = line.partition(" ")
        if result:
            answers[what] = result
    return answers


def learn(zviz_bin, root, base, out, bundle, *, timeout=120) -> subprocess.CompletedProcess:
    """`zviz profile learn --base BASE --out OUT -- zviz --root ROOT run ID BUNDLE`."""
    container_id = unique_id("s5learn")
    with deleted_after(zviz_bin, root, container_id):
        result = subprocess.run(
            [zviz_bin, "profile", "learn", "--base", base, "--out", out, "--",
             "zviz", "--root", root, "run", container_id, bundle],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result


def run(zviz_bin, root, profile, bundle, *, timeout=120) -> subprocess.CompletedProcess:
    container_id = unique_id("s5learn")
    with deleted_after(zviz_bin, root, container_id):
        return subprocess.run(
            [zviz_bin, "--root", root, "run", "--profile", profile, container_id, bundle],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


@contextlib.contextmanager
def deleted_after(zviz_bin, root, container_id):
    """`zviz delete --force ID` after the block, whatever happened: a timeout SIGKILLs
    the learner (or a slow-path run), whose container then outlives it (issue 16:
    stopped containers' cgroups and their empty zviz parents were left by this suite);
    a delete of an id that is gone succeeds."""
    try:
        yield
    finally:
        subprocess.run(
            [zviz_bin, "--root", root, "delete", "--force", container_id],
            capture_output=True, timeout=60,
        )  # fmt: skip


def probe_bundle(make_bundle, probe_binary, *actions, **overrides) -> str:
    bundle = make_bundle(args=["/bin/probe", *actions], **overrides)
    shutil.copy(probe_binary, os.path.join(bundle, "rootfs/bin/probe"))
    edit_config(bundle, lambda c: c["root"].update(readonly=False))
    return bundle


def _learned(path: str) -> dict:
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def test_learns_the_syscalls_the_base_refuses(
    zviz_bin, learn_root, make_bundle, probe_binary, tmp_path
):
    """kcmp (ci-runner denies it, not escape class) is learned; unshare (escape class) is
    tried, stays refused and is never learned; sysfs, never used, stays denied."""
    workload = ("kcmp", "unshare")
    out = str(tmp_path / "learned.toml")
    bundle = probe_bundle(make_bundle, probe_binary, *workload)
    learning = learn(zviz_bin, learn_root, "ci-runner", out, bundle)
    answers = _answers(learning.stdout)
    assert answers == {"kcmp": "ok", "unshare": f"errno {EPERM}"}, learning.stdout

    learned = _learned(out)
    assert learned["profile"]["extends"] == "ci-runner"
    assert learned["seccomp"]["allow_add"] == ["kcmp"]
    assert "unshare" not in json.dumps(learned)
    assert "unshare: escape class" in open(out).read()

    # The workload runs enforcing under what was learned; under the base it is refused.
    bundle = probe_bundle(make_bundle, probe_binary, *workload, "sysfs")
    enforced = _answers(run(zviz_bin, learn_root, out, bundle).stdout)
    assert enforced == {"kcmp": "ok", "unshare": f"errno {EPERM}", "sysfs": f"errno {EPERM}"}
    under_base = _answers(run(zviz_bin, learn_root, "ci-runner", bundle).stdout)
    assert under_base["kcmp"] == f"errno {EPERM}"


def test_learns_the_directories_it_writes(
    zviz_bin, learn_root, make_bundle, probe_binary, tmp_path
):
    """The rootfs is writable while learning; the directory written (not its parent, not
    the rootfs) is learned. A sibling directory and a config.json volume stay as they were."""
    out = str(tmp_path / "learned.toml")
    volume = tmp_path / tagged("learn-volume")
    volume.mkdir()
    mount = {"destination": "/mnt/ro", "type": "bind", "source": str(volume),
             "options": ["rbind", "ro"]}  # fmt: skip

    def fresh_bundle(*actions):
        bundle = probe_bundle(make_bundle, probe_binary, *actions)
        for directory in ("srv/data", "srv/other", "mnt/ro"):
            os.makedirs(os.path.join(bundle, "rootfs", directory))
        edit_config(bundle, lambda c: c["mounts"].append(mount))
        return bundle

    workload = ("write:/srv/data/state", "write:/tmp/scratch", "write:/mnt/ro/file")
    learning = learn(zviz_bin, learn_root, "ci-runner", out, fresh_bundle(*workload))
    answers = _answers(learning.stdout)
    assert answers["write:/srv/data/state"] == "ok", learning.stdout
    # A read-only volume stays read-only while learning: the rootfs is opened up, not mounts.
    assert answers["write:/mnt/ro/file"] == f"errno {EROFS}", learning.stdout
    assert _learned(out)["landlock"]["writable_add"] == ["/srv/data"]
    assert not os.listdir(volume)

    probe = (*workload, "write:/srv/data/more", "write:/srv/other/file", "write:/etc/planted")
    enforced = _answers(run(zviz_bin, learn_root, out, fresh_bundle(*probe)).stdout)
    assert enforced["write:/srv/data/state"] == "ok"
    assert enforced["write:/srv/data/more"] == "ok"
    assert enforced["write:/srv/other/file"] == f"errno {EACCES}"
    assert enforced["write:/etc/planted"] == f"errno {EACCES}"
    under_base = _answers(run(zviz_bin, learn_root, "ci-runner", fresh_bundle(*workload)).stdout)
    assert under_base["write:/srv/data/state"] == f"errno {EACCES}"


@pytest.fixture
def pod_network():
    net = PodNetwork(tag="s5learn")
    try:
        yield net
    finally:
        net.delete()


def test_learns_the_endpoints_it_reaches(
    zviz_bin, learn_root, make_bundle, probe_binary, tmp_path, pod_network
):
    """In a pod's network namespace ci-runner's broker refuses every way out; learning
    lets the workload's connect through (audited) and turns it into an egress rule. No
    listener is needed: a connect let through is refused by the peer (ECONNREFUSED), one
    the broker refuses fails EPERM."""
    out = str(tmp_path / "learned.toml")

    def fresh_bundle(*actions):
        return pod_network.join(probe_bundle(make_bundle, probe_binary, *actions))

    workload = (f"connect:{PEER_IP}:9000",)
    learning = learn(zviz_bin, learn_root, "ci-runner", out, fresh_bundle(*workload))
    assert _answers(learning.stdout)[workload[0]] == f"errno {ECONNREFUSED}", learning.stdout
    network = _learned(out)["network"]
    assert network["egress_add"] == [{"cidr": f"{PEER_IP}/32", "ports": [9000]}]
    assert network["mode"] == "namespace"

    probe = (*workload, f"connect:{PEER_IP}:9001")
    enforced = _answers(run(zviz_bin, learn_root, out, fresh_bundle(*probe)).stdout)
    assert enforced == {workload[0]: f"errno {ECONNREFUSED}", probe[1]: f"errno {EPERM}"}
    under_base = _answers(run(zviz_bin, learn_root, "ci-runner", fresh_bundle(*workload)).stdout)
    assert under_base[workload[0]] == f"errno {EPERM}"


def test_learns_the_name_behind_an_address(
    zviz_bin, learn_root, make_bundle, probe_binary, tmp_path, pod_network
):
    """The workload asks DNS for svc.s5learn.test (a server in the peer namespace answers
    the peer's address) and connects there: learning writes the name, not the address
    (egress_hosts), and the DNS server as an address rule. Enforcing, the broker resolves
    the name itself and lets the connect through; another port of the same address, and
    the address's own port 9000 once the name points elsewhere, are refused."""
    from tests.fake_dns import FakeDns

    name = "svc.s5learn.test"
    server = FakeDns(PEER_IP, 53, pod_network.peer_path)
    server.names[name] = [(PEER_IP, 1)]
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(f"nameserver {PEER_IP}\n")
    mount = {"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv_conf),
             "options": ["rbind", "ro"]}  # fmt: skip
    out = str(tmp_path / "learned.toml")

    def fresh_bundle(*actions):
        bundle = probe_bundle(make_bundle, probe_binary, *actions)
        script = f"nslookup {name} >/dev/null && /bin/probe {' '.join(actions)}"
        edit_config(bundle, lambda c: (c["process"].update(args=["sh", "-c", script]),
                                       c["mounts"].append(mount)))  # fmt: skip
        return pod_network.join(bundle)

    try:
        workload = (f"connect:{PEER_IP}:9000",)
        learning = learn(zviz_bin, learn_root, "ci-runner", out, fresh_bundle(*workload))
        assert _answers(learning.stdout)[workload[0]] == f"errno {ECONNREFUSED}", learning
        network = _learned(out)["network"]
        assert network["egress_hosts_add"] == [f"{name}:9000"], network
        assert network["egress_add"] == [{"cidr": f"{PEER_IP}/32", "ports": [53]}], network

        probe = (*workload, f"connect:{PEER_IP}:9001")
        enforced = _answers(run(zviz_bin, learn_root, out, fresh_bundle(*probe)).stdout)
        assert enforced == {workload[0]: f"errno {ECONNREFUSED}", probe[1]: f"errno {EPERM}"}
        server.names[name] = [("198.51.100.9", 1)]  # the name moves: the address is not granted
        moved = _answers(run(zviz_bin, learn_root, out, fresh_bundle(*workload)).stdout)
        assert moved == {workload[0]: f"errno {EPERM}"}
    finally:
        server.close()


def test_the_command_must_be_a_zviz_run(zviz_bin, learn_root, tmp_path):
    for command in (
        ["runc", "run", "x", "."],
        ["zviz", "delete", "x"],
        ["zviz", "run", "-d", "x", "."],
    ):
        result = subprocess.run(
            [zviz_bin, "profile", "learn", "--base", "ci-runner", "--", *command],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 1 and "profile learn" in result.stderr, result.stderr


# --- the workload suite's images (integration/workloads), as bundles ---


@pytest.fixture(scope="module")
def image_rootfs():
    """image_rootfs(NAME) -> a directory holding image NAME's layer, unpacked once per
    module from the cached archive (`make images`); skips when it was never built."""
    from tools import debimage

    unpacked: dict[str, str] = {}
    top = tempfile.mkdtemp(prefix=tagged("s5learn-images") + "-", dir="/var/tmp")

    def rootfs(name: str) -> str:
        if name not in unpacked:
            archive = debimage.IMAGES[name].archive(debimage.host_release())
            if not os.path.exists(archive):
                pytest.skip(f"the {name} workload image is not built: run `make images`")
            directory = os.path.join(top, name)
            os.mkdir(directory)
            layer = subprocess.run(
                ["tar", "-xOf", archive, _layer_member(archive)], capture_output=True, check=True
            ).stdout
            subprocess.run(
                ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-x", "-C", directory],
                input=layer, check=True,
            )  # fmt: skip
            unpacked[name] = directory
        return unpacked[name]

    try:
        yield rootfs
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _layer_member(archive: str) -> str:
    import tarfile

    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{digest}"))
    return "blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]


@pytest.fixture
def image_bundle(tmp_path):
    """image_bundle(LOWER, ARGS) -> a bundle whose rootfs is a fresh overlay on LOWER (each
    run starts from the image as built, as under containerd); unmounted after the test."""
    from tools.mkbundle import default_config

    mounted: list[str] = []
    counter = iter(range(100))

    def make(lower: str, args: list[str]) -> str:
        bundle = tmp_path / f"{tagged('s5learn-bundle')}-{next(counter)}"
        for part in ("upper", "work", "rootfs"):
            (bundle / part).mkdir(parents=True)
        options = f"lowerdir={lower},upperdir={bundle / 'upper'},workdir={bundle / 'work'}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(bundle / "rootfs")], check=True
        )
        mounted.append(str(bundle / "rootfs"))
        config = default_config(args=args, terminal=False)
        config["root"]["readonly"] = False
        config["process"]["env"].append("HOME=/root")
        # containerd's default set, as the workload suite's containers get it (the
        # profile drops what is beyond its ceiling).
        config["process"]["capabilities"] = {
            kind: list(CONTAINERD_CAPABILITIES) for kind in ("bounding", "effective", "permitted")
        }
        (bundle / "config.json").write_text(json.dumps(config, indent=2))
        return str(bundle)

    try:
        yield make
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", path], check=False)


CONTAINERD_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)  # fmt: skip


def _with_probe(bundle: str, probe_binary: str, *actions: str) -> str:
    shutil.copy(probe_binary, os.path.join(bundle, "rootfs/usr/local/bin/probe"))
    edit_config(bundle, lambda c: c["process"].update(args=["/usr/local/bin/probe", *actions]))
    return bundle


def test_ci_job_learned_from_hostile_tenant(
    zviz_bin, learn_root, image_rootfs, image_bundle, probe_binary, tmp_path
):
    """The CI job (git clone, gcc/make, pytest) learned from hostile-tenant, the smallest
    base: the syscalls git, gcc and Python need beyond it and the directory the job builds
    in (/root) are learned; the job then passes enforcing, and a probe's kcmp and a write
    to /etc (neither of which the job did) are refused."""
    from tools.workloads import CI_BUILD_JOB, CI_REPOSITORY, ci_bare_repository

    lower = image_rootfs("ci")
    repository = tempfile.mkdtemp(prefix=tagged("s5learn-repo") + "-")
    os.chmod(repository, 0o755)
    bare = ci_bare_repository(repository)
    volume = {"destination": CI_REPOSITORY, "type": "bind", "source": bare,
              "options": ["rbind", "ro"]}  # fmt: skip
    out = str(tmp_path / "ci-learned.toml")

    def job_bundle(args=CI_BUILD_JOB):
        bundle = image_bundle(lower, list(args))
        edit_config(bundle, lambda c: c["mounts"].append(volume))
        return bundle

    try:
        under_base = run(zviz_bin, learn_root, "hostile-tenant", job_bundle(), timeout=300)
        assert under_base.returncode != 0, under_base.stdout  # it needs what is learned

        learning = learn(zviz_bin, learn_root, "hostile-tenant", out, job_bundle(), timeout=300)
        assert "3 passed" in learning.stdout, f"{learning.stdout}\n{learning.stderr}"
        learned = _learned(out)
        assert learned["landlock"]["writable_add"] == ["/root"], learned
        assert learned["seccomp"]["allow_add"], learned
        assert "kcmp" not in learned["seccomp"]["allow_add"]

        enforced = run(zviz_bin, learn_root, out, job_bundle(), timeout=300)
        assert enforced.returncode == 0, f"{enforced.stdout}\n{enforced.stderr}"
        assert "hello, job" in enforced.stdout.splitlines()
        assert any(line.startswith("3 passed") for line in enforced.stdout.splitlines())

        probe = _with_probe(
            job_bundle(), probe_binary, "write:/root/ok", "kcmp", "write:/etc/planted"
        )
        answers = _answers(run(zviz_bin, learn_root, out, probe).stdout)
        assert answers == {
            "write:/root/ok": "ok",
            "kcmp": f"errno {EPERM}",
            "write:/etc/planted": f"errno {EACCES}",
        }
    finally:
        shutil.rmtree(repository, ignore_errors=True)


class Server:
    """A server's `zviz profile learn ... -- zviz run` (or plain `zviz run` under a
    profile), stopped by the test once it has driven it: SIGKILL through `zviz kill` (a
    PID 1 without a SIGTERM handler ignores SIGTERM), then the profile is written."""

    def __init__(self, zviz_bin, root, bundle, *, learn_base=None, out=None, profile=None):
        self.zviz_bin, self.root, self.id = zviz_bin, root, unique_id("s5learn")
        run_command = [zviz_bin, "--root", root, "run"]
        if learn_base is None:
            command = [*run_command, "--profile", profile, self.id, bundle]
        else:
            command = [zviz_bin, "profile", "learn", "--base", learn_base, "--out", out,
                       "--", "zviz", "--root", root, "run", self.id, bundle]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def stop(self) -> tuple[str, str]:
        subprocess.run(
            [self.zviz_bin, "--root", self.root, "kill", self.id, "SIGKILL"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        try:
            return self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        finally:
            # A learner killed above (or one that failed) leaves the container: gone now.
            with deleted_after(self.zviz_bin, self.root, self.id):
                pass


def test_nginx_learned_without_var_writes(
    zviz_bin, learn_root, image_rootfs, image_bundle, probe_binary, tmp_path, pod_network
):
    """nginx under web-server with /var/lib, /var/log and /var/cache taken out (a base of
    the operator's): it exits at start; learning finds the directories it writes, and
    nginx then serves a client in another network namespace enforcing. A write to a
    directory it never wrote, and kcmp, are refused."""
    from integration.workloads.test_nginx import FETCH
    from tools.workloads import NGINX

    base = tmp_path / "web-no-var.toml"
    base.write_text(
        '[profile]\nextends = "web-server"\n'
        '[landlock]\nwritable_remove = ["/var/lib", "/var/log", "/var/cache"]\n'
    )
    lower = image_rootfs("nginx")
    out = str(tmp_path / "nginx-learned.toml")

    def nginx_bundle(args=NGINX):
        return pod_network.join(image_bundle(lower, list(args)))

    under_base = run(zviz_bin, learn_root, str(base), nginx_bundle(), timeout=60)
    assert under_base.returncode != 0 and "Permission denied" in under_base.stderr

    for profile in (None, out):  # learning, then enforcing what was learned
        learning = dict(learn_base=str(base), out=out) if profile is None else {}
        server = Server(zviz_bin, learn_root, nginx_bundle(), profile=profile, **learning)
        try:
            fetched = pod_network.in_peer(FETCH, f"http://{POD_IP}/", "30", timeout=60)
        finally:
            stdout, stderr = server.stop()
        assert fetched.returncode == 0, f"{fetched.stderr}\nnginx:\n{stdout}\n{stderr}"
        assert fetched.stdout.startswith("200\n") and "nginx" in fetched.stdout
        if profile is None:
            assert server.process.returncode == 0, stderr
            learned = _learned(out)
            writable = learned["landlock"]["writable_add"]
            assert {"/var/lib/nginx", "/var/log/nginx"} <= set(writable), learned
            assert not any(learn_dir in ("/", "/var") for learn_dir in writable), learned

    probe = _with_probe(
        nginx_bundle(), probe_binary, "write:/var/log/nginx/ok", "write:/var/cache/planted", "kcmp"
    )
    answers = _answers(run(zviz_bin, learn_root, out, probe).stdout)
    assert answers == {
        "write:/var/log/nginx/ok": "ok",
        "write:/var/cache/planted": f"errno {EACCES}",
        "kcmp": f"errno {EPERM}",
    }


# The suite's Python service on a port web-server's bind rules do not list.
SERVICE_PORT = 8081
BIND_PROBE = """
import socket
for port in (8081, 8082):
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port))
        print(f"bind:{port} ok")
    except OSError as e:
        print(f"bind:{port} errno {e.errno}")
    s.close()
"""


def test_python_service_learned_on_its_own_port(
    zviz_bin, learn_root, image_rootfs, image_bundle, tmp_path, pod_network
):
    """The Python asyncio service listening on 8081, which web-server's bind rules do not
    list: it fails to start under web-server; learning turns its bind into a bind rule
    (and a Landlock port); it then answers a client loop enforcing, and a bind of 8082,
    never done, is refused."""
    from integration.workloads.http_service import CLIENT
    from tools.workloads import PYTHON_SERVICE

    lower = image_rootfs("python")
    out = str(tmp_path / "python-learned.toml")
    service = ["python3", "-c", PYTHON_SERVICE, str(SERVICE_PORT)]

    def service_bundle(args=service):
        return pod_network.join(image_bundle(lower, list(args)))

    under_base = run(zviz_bin, learn_root, "web-server", service_bundle(), timeout=60)
    assert under_base.returncode != 0 and "PermissionError" in under_base.stderr

    for profile in (None, out):
        learning = dict(learn_base="web-server", out=out) if profile is None else {}
        server = Server(zviz_bin, learn_root, service_bundle(), profile=profile, **learning)
        try:
            driven = pod_network.in_peer(CLIENT, POD_IP, str(SERVICE_PORT), "50", timeout=90)
        finally:
            stdout, stderr = server.stop()
        assert driven.returncode == 0, f"{driven.stderr}\nservice:\n{stdout}\n{stderr}"
        assert driven.stdout.split() == ["1", "50"]
        if profile is None:
            assert server.process.returncode == 0, stderr
            network = _learned(out)["network"]
            assert network["bind_add"] == [{"cidr": "0.0.0.0/32", "ports": [SERVICE_PORT]}]
            assert network["tcp_bind_add"] == [SERVICE_PORT]

    probe = run(zviz_bin, learn_root, out, service_bundle(["python3", "-c", BIND_PROBE]))
    assert _answers(probe.stdout) == {"bind:8081": "ok", "bind:8082": f"errno {EPERM}"}, (
        probe.stderr
    )
