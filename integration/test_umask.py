"""A container does not depend on its caller's umask (issue 14 item 5: "whatever runc
accepts ... zviz runs").

Operators' shells and services often run with umask 0027 or 0077 (CIS benchmarks ask
for 027). runc makes PID 1's workload run with `process.user.umask`, else 0022, whatever
its caller's umask (libcontainer finalizeRootfs); zviz does the same, and makes what the
container must reach (its cgroup directories, the mount points and /dev of its rootfs)
as under umask 0022, so the container's root, a mapped uid in a user namespace, can
search them. Before, `umask 0027; zviz run` failed: "mount(/proc/self/fd/5/cpu):
Permission denied" (the container's cgroup directories were 0750).

An exec gets its own `process.user.umask`, else the container's, else 0022 (runc's exec
takes the container's and, without one, its caller's: docs/cli.md "runc compatibility").

Each caller here is a real process with that umask: `zviz run` (served by a fork server
of that umask, and the slow path), `zviz create`/`exec`/`start`/`delete`, and a private
containerd started with it, whose shims inherit it.
"""

import contextlib
import json
import os
import stat
import subprocess
import tempfile
import time

import pytest

from integration.ids import tagged, unique_id
from integration.zviz_cli import Zviz, edit_config, leftovers
from runtime import cgroups, forkserver
from tools.containerd import PrivateContainerd

CALLERS_UMASKS = [0o027, 0o077]
# PID 1's and an exec's, as runc's, without process.user.umask.
DEFAULT_UMASK = "0022"
# Served: by a fork server of the caller's umask (a client with another umask reaches a
# server of its own: runtime/forkserver.py INHERITED_STATUS_FIELDS). Slow: no server.
PATHS = {"served": {}, "slow": {"ZVIZ_NO_FORKSERVER": "1"}}
RUNC = "io.containerd.runc.v2"


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


@pytest.fixture(params=CALLERS_UMASKS, ids=lambda mask: f"umask{mask:04o}")
def callers_umask(request) -> int:
    return request.param


def _with_umask(mask: int):
    return lambda: os.umask(mask)


def _zviz_with_umask(zviz, mask: int, *args, env=None, timeout=60):
    return subprocess.run(
        [zviz.binary, "--root", zviz.root, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=_with_umask(mask),
        stdin=subprocess.DEVNULL,
    )


def _create_with_umask(zviz, mask: int, bundle: str, container_id: str) -> None:
    """`zviz create` by a caller with umask MASK. PID 1 keeps the command's
    stdio: not a pipe we would wait on."""
    with tempfile.TemporaryFile("w+") as err:
        created = subprocess.run(
            [zviz.binary, "--root", zviz.root, "create", "--bundle", bundle, container_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=60,
            preexec_fn=_with_umask(mask),
        )
        err.seek(0)
        assert created.returncode == 0, err.read()


def _run_with_umask(zviz, mask: int, bundle: str, path: str) -> subprocess.CompletedProcess:
    """`zviz run` by a caller with umask MASK, the way PATH names; its result."""
    deadline = time.monotonic() + 30
    while True:
        result = _zviz_with_umask(
            zviz, mask, "--debug", "run", "--bundle", bundle, unique_id(), env=PATHS[path]
        )
        assert result.returncode == 0, result.stderr
        served = forkserver.SLOW_PATH not in result.stderr
        if path == "slow" or served:
            assert served == (path == "served"), result.stderr
            return result
        # The first client of this umask starts its server: a later one is served.
        assert time.monotonic() < deadline, f"a run is never served: {result.stderr}"
        time.sleep(0.2)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_run_ignores_its_callers_umask(zviz, make_bundle, callers_umask, path):
    bundle = make_bundle(["sh", "-c", "umask; ls /sys/fs/cgroup >/dev/null && echo cgroups"])
    result = _run_with_umask(zviz, callers_umask, bundle, path)
    assert result.stdout.split() == [DEFAULT_UMASK, "cgroups"], result.stderr


@pytest.mark.parametrize("path", list(PATHS))
def test_the_configs_umask_is_the_workloads(zviz, make_bundle, path):
    bundle = make_bundle(["sh", "-c", "umask"])
    edit_config(bundle, lambda config: config["process"]["user"].update(umask=0o007))
    result = _run_with_umask(zviz, 0o077, bundle, path)
    assert result.stdout.strip() == "0007", result.stderr


def _mode(path: str) -> str:
    return f"{stat.S_IMODE(os.stat(path).st_mode):04o}"


def _exec_umask(zviz, mask: int, container_id: str, *process_file) -> tuple[str, str]:
    """(the umask an exec by a caller with umask MASK sees, the name of its parent)."""
    result = _zviz_with_umask(
        zviz, mask, "exec", *process_file, container_id, *([] if process_file else _SHOW)
    )
    assert result.returncode == 0, result.stderr
    umask, parent = result.stdout.split()
    return umask, parent


# What an exec prints: its umask, and its parent's name (zviz-anchor when the container's
# exec anchor forked it, runtime/exec_anchor.py; "outside" when its parent is the
# runtime's exec child, outside the container's pid namespace: the old path).
_SHOW = ["sh", "-c", 'umask; parent=$(cat /proc/$PPID/comm 2>/dev/null); echo "${parent:-outside}"']
PID1S_UMASK = ["grep", "Umask", "/proc/1/status"]


def _process_file(tmp_path, bundle: str, umask: int | None) -> list[str]:
    """`--process FILE`: the container's process running _SHOW, with umask UMASK."""
    with open(os.path.join(bundle, "config.json")) as f:
        process = json.load(f)["process"]
    process["args"] = _SHOW
    process["user"].pop("umask", None)
    if umask is not None:
        process["user"]["umask"] = umask
    path = tmp_path / tagged("process.json")
    path.write_text(json.dumps(process))
    return ["--process", str(path)]


@pytest.mark.parametrize("configs_umask", [None, 0o007], ids=["no-umask", "umask0007"])
def test_a_containers_life_ignores_its_callers_umask(zviz, make_bundle, tmp_path, configs_umask):
    """create, exec (before start: the old path; after: the exec anchor's), start and
    delete, each by a caller with umask 0077: the container's cgroup directories
    (two levels made for it) are 0755 as under 0022, and every process gets the
    config's umask, else 0022; an exec's own process.user.umask wins."""
    container_id = unique_id("zviz-umask")
    cgroups_path = f"/{unique_id('zviz-umask-parent')}/{container_id}"
    bundle = make_bundle(["sleep", "60"])

    def configure(config):
        config["linux"]["cgroupsPath"] = cgroups_path
        if configs_umask is not None:
            config["process"]["user"]["umask"] = configs_umask

    edit_config(bundle, configure)
    wanted = DEFAULT_UMASK if configs_umask is None else f"{configs_umask:04o}"
    strict = 0o077
    groups = set(cgroups.for_container(container_id, cgroups_path).paths.values())
    try:
        _create_with_umask(zviz, strict, bundle, container_id)
        for directory in groups:
            assert (_mode(os.path.dirname(directory)), _mode(directory)) == ("0755", "0755"), (
                directory
            )
        assert _exec_umask(zviz, strict, container_id)[0] == wanted
        own = _process_file(tmp_path, bundle, 0o005)
        assert _exec_umask(zviz, strict, container_id, *own)[0] == "0005"
        started = _zviz_with_umask(zviz, strict, "start", container_id)
        assert started.returncode == 0, started.stderr
        assert _exec_umask(zviz, strict, container_id) == (wanted, "zviz-anchor")
        assert _exec_umask(zviz, strict, container_id, *own)[0] == "0005"
        pid1 = _zviz_with_umask(zviz, strict, "exec", container_id, *PID1S_UMASK)
        assert pid1.stdout.split() == ["Umask:", wanted], pid1.stderr
    finally:
        deleted = _zviz_with_umask(zviz, strict, "delete", "--force", container_id)
        # The parent level is not the container's (delete leaves it, as runc does): ours.
        for directory in groups:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(directory))
    assert deleted.returncode == 0, deleted.stderr
    assert leftovers(container_id, zviz.root) == []


@pytest.fixture(scope="module")
def strict_containerd(busybox_archive):
    """A private containerd 1.6 (and so its shims) running with umask 0027."""
    instance = PrivateContainerd(umask=0o027).start()
    try:
        instance.import_image(busybox_archive)
        yield instance
    finally:
        instance.stop()


@pytest.mark.containerd
@pytest.mark.parametrize("runtime", [RUNC, "io.containerd.zviz.v2"], ids=["runc", "zviz"])
def test_a_containerd_with_a_strict_umask_runs_containers(strict_containerd, runtime):
    """`ctr run` and `ctr task exec` under a containerd whose umask is 0027 (the reference
    runc's column: the container runs, its PID 1 with 0022). An exec without a umask
    (ctr's copies the container's process, which has none) gets 0022 from zviz; runc's
    exec inherits its caller's, the shim's: containerd's 0027."""
    from tools.mkimage import DEFAULT_REF

    container_id = unique_id("zviz-umask-ctr")
    ctr = strict_containerd.ctr
    started = ctr(
        "run", "-d", "--runtime", runtime, DEFAULT_REF, container_id,
        "sleep", "60",
        check=False,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        executed = ctr(
            "task", "exec", "--exec-id", tagged("exec"), container_id,
            "sh", "-c", "grep Umask /proc/1/status; umask",
            check=False,
        )  # fmt: skip
        assert executed.returncode == 0, executed.stderr
        execs = "0027" if runtime == RUNC else DEFAULT_UMASK
        assert executed.stdout.split() == ["Umask:", DEFAULT_UMASK, execs]
    finally:
        ctr("tasks", "kill", "-a", "-s", "SIGKILL", container_id, check=False)
        deadline = time.monotonic() + 20
        while ctr("tasks", "delete", container_id, check=False).returncode != 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ctr("containers", "delete", container_id, check=False)
