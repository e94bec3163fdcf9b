"""`zviz node check` and `zviz node install` for real: this kernel, Debian's 6.1 under QEMU,
and a real containerd that loads the config install wrote and runs a container through the
shim it linked, all from the wheel installed outside the checkout.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from integration.cgroup2_vm import missing_requirements, run_in_v2_vm
from integration.ids import tagged, unique_id
from integration.wheel_install import installed
from runtime.commands import run_cli
from runtime.security import landlock
from shim import audit_reader
from tools.containerd import CONFIG, PrivateContainerd
from tools.mkimage import DEFAULT_REF, build_image

STATUSES = {"ok", "warn", "fail"}
# What this machine has (kernel 6.18, cgroup v1, Landlock ABI 7): each must be ok here.
MUST_BE_OK_HERE = ("landlock", "seccomp-notify", "pidfd_getfd", "userns", "idmapped-overlay")


@pytest.fixture(scope="module")
def install():
    return installed()


def node_check(install, *args) -> tuple[int, dict]:
    result = install.run("zviz", "node", "check", "--format", "json", *args)
    assert result.stderr == ""
    return result.returncode, json.loads(result.stdout)


def by_name(report: dict) -> dict:
    return {c["name"]: c for c in report["checks"]}


def test_node_check_passes_on_this_machine(install):
    code, report = node_check(install)
    checks = by_name(report)
    assert code == 0, report
    assert report["ok"] is True
    for name in MUST_BE_OK_HERE:
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["landlock"]["detail"].startswith(f"ABI {landlock.abi_version()}:")
    assert checks["kernel"]["detail"] == f"Linux {os.uname().release}"
    assert checks["cgroups"]["status"] == "ok"
    assert checks["containerd"]["detail"].startswith("version ")


def test_node_check_json_shape_and_text_lines_agree(install):
    _code, report = node_check(install)
    assert set(report) == {"checks", "ok"}
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail"}
        assert check["status"] in STATUSES and check["detail"]
    text = install.run("zviz", "node", "check")
    lines = text.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        [c["status"], c["name"]] for c in report["checks"]
    ]


@pytest.mark.parametrize("abi", [0])
def test_node_check_fails_where_the_default_profile_cannot_be_enforced(monkeypatch, capsys, abi):
    """A stand-in for a kernel without Landlock: the probe answers ABI 0 (the real ABI 2
    kernel is test_node_check_on_the_6_1_guest)."""
    monkeypatch.setattr(landlock, "abi_version", lambda: abi)
    code = run_cli(["node", "check", "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["ok"] is False
    assert by_name(report)["landlock"]["status"] == "fail"


GUEST_SCRIPT = """
import json, sys
from runtime.node import check
for profile in ("ci-runner", "hostile-tenant"):
    checks = check.run_checks(profile, "/nonexistent/config.toml")
    print("RESULT " + json.dumps({"profile": profile, "ok": check.passed(checks),
          "checks": {c.name: [c.status, c.detail] for c in checks}}))
"""


def test_node_check_on_the_6_1_guest():
    """Debian's 6.1 (Landlock ABI 2, cgroup v2) under QEMU: the real older kernel."""
    reason = missing_requirements()
    if reason:
        pytest.skip(f"no 6.1 guest: {reason}")
    rc, output = run_in_v2_vm(GUEST_SCRIPT, timeout=170)
    assert rc == 0, output[-4000:]
    results = {
        r["profile"]: r
        for r in (
            json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")
        )
    }
    default = results["ci-runner"]
    assert default["ok"] is True, default
    assert default["checks"]["landlock"][0] == "warn"  # runs, without what its may_lack names
    assert default["checks"]["landlock"][1].startswith("ABI 2:")
    assert default["checks"]["cgroups"][1].startswith("v2")
    assert default["checks"]["userns"][0] == "ok"
    # hostile-tenant lacks nothing it may do without: refused on ABI 2
    strict = results["hostile-tenant"]
    assert strict["ok"] is False
    assert strict["checks"]["landlock"][0] == "fail"


# --- node install with a real containerd -------------------------------------------------


def _containerd_config(base: str, with_cri_section: bool) -> str:
    text = CONFIG.format(
        root=os.path.join(base, "root"),
        state=os.path.join(base, "state"),
        address=os.path.join(base, "c.sock"),
        level="info",
        disabled="",
    )
    if with_cri_section:
        text += (
            '\n[plugins."io.containerd.grpc.v1.cri"]\n'
            '  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"\n'
            "  disable_apparmor = true\n"
        )
    return text


def _zviz_runtime_in_dump(config_path: str) -> bool:
    """Whether containerd, reading CONFIG_PATH and its imports, has the zviz runtime."""
    dump = subprocess.run(
        ["containerd", "--config", config_path, "config", "dump"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    header = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.zviz]'
    if header not in dump:
        return False
    entry = dump.split(header, 1)[1].split("\n[", 1)[0]
    return 'runtime_type = "io.containerd.zviz.v2"' in entry


@pytest.mark.parametrize("with_cri_section", [False, True], ids=["drop-in", "in-place"])
def test_containerd_loads_the_written_config_and_runs_zviz(install, tmp_path, with_cri_section):
    base = tempfile.mkdtemp(prefix=f"zc-{tagged('node')}-", dir="/run")
    os.chmod(base, 0o711)
    containerd = PrivateContainerd(base_dir=base)
    root = str(tmp_path / tagged("node-root"))
    config = os.path.join(root, "etc", "containerd", "config.toml")
    os.makedirs(os.path.dirname(config))
    with open(config, "w") as f:
        f.write(_containerd_config(base, with_cri_section))
    try:
        result = install.run("zviz", "node", "install", "--root", root)
        assert result.returncode == 0, result.stdout + result.stderr
        drop_in = os.path.join(root, "etc", "containerd", "conf.d", "zviz.toml")
        assert os.path.exists(drop_in) != with_cri_section
        assert _zviz_runtime_in_dump(config)

        # containerd finds the shim on its PATH: ROOT/usr/local/bin, not the checkout's venv
        containerd.config_path = config
        containerd.env = install.env(PATH=f"{root}/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        _start(containerd)
        archive = str(tmp_path / "busybox.tar")
        build_image(archive, DEFAULT_REF)
        containerd.import_image(archive)
        container = unique_id("zviz-node")
        run = containerd.ctr(
            "run",
            "-d",
            "--runtime",
            "io.containerd.zviz.v2",
            DEFAULT_REF,
            container,
            "sleep",
            "30",
        )
        assert run.returncode == 0, run.stderr
        shim = os.path.join(root, "usr", "local", "bin", "containerd-shim-zviz-v2")
        with open(shim, "rb") as f:
            assert f.read(4) == b"\x7fELF"  # the fork server's compiled client for `start`
        # the daemon runs the wheel install's Python entry with its own interpreter
        argv = _argv_of_process_running(os.path.join(install.bin, "containerd-shim-zviz-v2"))
        assert argv[0] == os.path.join(install.bin, "python"), argv
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", container, check=False)
        containerd.ctr("tasks", "delete", "-f", container, check=False, timeout=30)
        containerd.ctr("containers", "delete", container, check=False)
        done = containerd.ctr(
            "run",
            "--rm",
            "--runtime",
            "io.containerd.zviz.v2",
            DEFAULT_REF,
            unique_id("zviz-node"),
            "sh",
            "-c",
            "echo via-node-install",
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "via-node-install"
    finally:
        containerd.stop()
    result = install.run("zviz", "node", "uninstall", "--root", root)
    assert result.returncode == 0, result.stdout
    with open(config) as f:
        assert f.read() == _containerd_config(base, with_cri_section)


def test_after_node_install_an_exec_through_ctr_writes_to_pid_1s_output(install, tmp_path):
    """`kubectl exec ... > /proc/1/fd/1` on a node set up from the wheel: node install
    compiles the exec anchor from the source the wheel ships (without it every exec has a
    Landlock domain of its own, which may not open PID 1's fds), and node check says so."""
    base = tempfile.mkdtemp(prefix=f"zc-{tagged('node')}-", dir="/run")
    os.chmod(base, 0o711)
    containerd = PrivateContainerd(base_dir=base)
    root = str(tmp_path / tagged("node-root"))
    config = os.path.join(root, "etc", "containerd", "config.toml")
    os.makedirs(os.path.dirname(config))
    with open(config, "w") as f:
        f.write(_containerd_config(base, False))
    anchor = os.path.join(install.bin, "zviz-anchor")
    container = unique_id("zviz-node-exec")
    reader_dir = os.path.join("/run", tagged("zviz-audit-reader-node"))
    running = None
    try:
        result = install.run("zviz", "node", "install", "--root", root)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"exec-anchor: {anchor} (execs run in PID 1's Landlock domain)" in result.stdout
        _code, report = node_check(install)
        line = by_name(report)["exec-anchor"]
        assert line["status"] == "ok", line
        assert line["detail"].startswith(f"{anchor}: execs run in PID 1's Landlock domain")
        # The broker's warden, from the source the wheel ships too.
        warden = os.path.join(install.bin, "zviz-warden")
        assert f"broker-warden: {warden} (each seccomp broker's warden is" in result.stdout
        assert by_name(report)["broker-warden"]["status"] == "ok", report

        containerd.config_path = config
        containerd.env = install.env(
            PATH=f"{root}/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            # The shim's audit reader, ours alone (the node's is shared), stopped below.
            **{audit_reader.DIR_VARIABLE: reader_dir},
        )
        _start(containerd)
        archive = str(tmp_path / "busybox.tar")
        build_image(archive, DEFAULT_REF)
        containerd.import_image(archive)
        # Attached: PID 1's stdout is the shim's pipe, copied to ctr's stdout (ours).
        running = subprocess.Popen(
            [containerd.ctr_bin, "--address", containerd.address, "-n", containerd.namespace]
            + ["run", "--runtime", "io.containerd.zviz.v2", DEFAULT_REF, container]
            + ["sh", "-c", "echo started; while :; do sleep 0.1; done"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=containerd.env,
        )
        assert _read_line(running.stdout.fileno(), 60) == "started"
        executed = containerd.ctr(
            "task", "exec", "--exec-id", "write-pid1", container,
            "sh", "-c", "echo written-by-exec > /proc/1/fd/1 && echo wrote",
            check=False,
        )  # fmt: skip
        assert executed.returncode == 0, executed.stdout + executed.stderr
        assert executed.stdout.strip() == "wrote"
        assert _read_line(running.stdout.fileno(), 10) == "written-by-exec"
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", container, check=False)
        if running is not None:
            try:
                running.wait(timeout=30)
            except subprocess.TimeoutExpired:
                running.kill()
                running.wait()
        containerd.ctr("tasks", "delete", "-f", container, check=False, timeout=30)
        containerd.ctr("containers", "delete", container, check=False)
        containerd.stop()
        _stop_audit_reader(reader_dir)
        install.run("zviz", "node", "uninstall", "--root", root)


def _stop_audit_reader(where: str) -> None:
    """The reader the shim started in WHERE exits with its last daemon, maybe after the
    session's leak check: stopped here (its pid is in its lock file)."""
    try:
        with open(os.path.join(where, audit_reader.LOCK_NAME)) as f:
            pid = int(f.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"shim.audit_reader" in f.read():
                os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
    shutil.rmtree(where, ignore_errors=True)


def _read_line(fd: int, timeout: float) -> str:
    """One line from FD, or what came before the timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode().rstrip("\n")


def _start(containerd: PrivateContainerd, timeout: float = 30) -> None:
    """PrivateContainerd.start, with the config already written (by `zviz node install`)."""
    log = open(containerd.log_path, "ab")
    containerd.proc = subprocess.Popen(
        ["containerd", "--config", containerd.config_path],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=containerd.env,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert containerd.proc.poll() is None, f"containerd exited; see {containerd.log_path}"
        if (
            os.path.exists(containerd.address)
            and containerd.ctr("version", check=False).returncode == 0
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"containerd did not answer; see {containerd.log_path}")


def _argv_of_process_running(script: str) -> list[str]:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if len(argv) > 1 and argv[1] == script:
            return argv
    raise AssertionError(f"no process runs {script}")


def test_node_install_builds_the_fast_client_for_the_wheel_install(install, tmp_path, make_bundle):
    """The client compiled by node install serves `zviz run` through this install's fork server."""
    root = str(tmp_path / tagged("node-root"))
    os.makedirs(os.path.join(root, "etc", "containerd"))
    result = install.run("zviz", "node", "install", "--root", root)
    assert result.returncode == 0, result.stdout + result.stderr
    client = os.path.join(root, "usr", "local", "bin", "zviz")
    with open(client, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    state = str(tmp_path / tagged("state"))
    path = f"{os.path.dirname(client)}:/usr/sbin:/usr/bin:/sbin:/bin"
    check = install.run("zviz", "node", "check", "--format", "json", PATH=path)
    assert by_name(json.loads(check.stdout))["fast-path"]["status"] == "ok"
    servers_before = _fork_servers(install)
    try:
        # The first run starts the server (and runs the slow way); later runs are served.
        deadline = time.monotonic() + 20
        served = False
        while not served and time.monotonic() < deadline:
            bundle = make_bundle(["sleep", "1"])
            run = subprocess.Popen(
                [client, "--root", state, "run", "--bundle", bundle, unique_id("zviz-fast")],
                env=install.env(),
                cwd=install.prefix,
            )
            time.sleep(0.5)
            # Served: the client stays the C program (the server's worker runs the
            # container); the slow way, it has exec'd the install's Python entry.
            served = os.path.realpath(f"/proc/{run.pid}/exe") == os.path.realpath(client)
            assert run.wait(timeout=60) == 0
        assert served, "no run was served by the wheel install's fork server"
    finally:
        for pid in _fork_servers(install) - servers_before:
            os.kill(pid, 15)
    assert install.run("zviz", "node", "uninstall", "--root", root).returncode == 0
    assert not os.path.lexists(client)


def _fork_servers(install) -> set[int]:
    """Fork servers started from this install (runtime/forkserver.py): ours to stop."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[0].decode(errors="replace").startswith(install.bin) and argv[1:3] == [
            b"-m",
            b"runtime.forkserver",
        ]:
            found.add(int(pid))
    return found
