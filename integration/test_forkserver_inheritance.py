"""What a container inherits from the `zviz run` that made it, served or not.

A process without `process.rlimits` in config.json inherits them from its runtime
(runc does, and so does zviz's slow path), which inherits them from its caller. A fork
server's worker inherits them from the server instead: the server serves only a client
whose inherited attributes are its own (runtime/forkserver.py INHERITED_STATUS_FIELDS,
INHERITED_FILES), so the container sees the caller's values either way. The umask is
the exception: as under runc, the workload gets `process.user.umask`, else 0022, never
its caller's.
"""

import os
import subprocess
import time

import pytest

from integration.ids import tagged
from integration.zviz_cli import Zviz, edit_config, unique_id
from runtime import forkserver


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


def _without_rlimits(config):
    config["process"].pop("rlimits", None)


def _served_plain_run(zviz, bundle) -> subprocess.CompletedProcess:
    """A plain client (this test's attributes) is served, its server up; its result."""
    deadline = time.monotonic() + 30
    while True:
        result = zviz("--debug", "run", "--bundle", bundle, unique_id())
        assert result.returncode == 0, result.stderr
        if forkserver.SLOW_PATH not in result.stderr:
            return result
        assert time.monotonic() < deadline, f"a plain run is never served: {result.stderr}"
        time.sleep(0.2)


def _open_files(limits: str) -> list[str]:
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    return line.split()[3:5]


@pytest.mark.parametrize(
    "caller,wanted",
    [
        (["prlimit", "--nofile=777:"], "777"),
        ([], None),  # the plain client: served, this test's own limit
    ],
    ids=["lowered", "plain"],
)
def test_the_workload_inherits_the_callers_rlimit(zviz, make_bundle, caller, wanted):
    bundle = make_bundle(["cat", "/proc/self/limits"])
    edit_config(bundle, _without_rlimits)
    plain = _served_plain_run(zviz, bundle)
    with open("/proc/self/limits") as f:
        mine = _open_files(f.read())
    assert _open_files(plain.stdout) == mine
    result = subprocess.run(
        [*caller, zviz.binary, "--root", zviz.root, "run", "--bundle", bundle, unique_id()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert _open_files(result.stdout) == [wanted or mine[0], mine[1]]


@pytest.mark.parametrize("configs_umask", [None, 0o007], ids=["no-umask", "umask0007"])
@pytest.mark.parametrize("path_env", [{}, {"ZVIZ_NO_FORKSERVER": "1"}], ids=["served", "slow"])
def test_the_workload_gets_runcs_umask_whatever_the_callers(
    zviz, make_bundle, path_env, configs_umask
):
    """Not inherited (runc's rule, runtime/spawn/init.py workload_umask): 0022, or
    config.json's process.user.umask, whatever the caller's umask, served or not
    (integration/test_umask.py has stricter callers and the other commands)."""
    bundle = make_bundle(["sh", "-c", "umask"])
    if configs_umask is not None:
        edit_config(bundle, lambda config: config["process"]["user"].update(umask=configs_umask))
    wanted = "0022" if configs_umask is None else f"{configs_umask:04o}"
    if not path_env:
        assert _served_plain_run(zviz, bundle).stdout.strip() == wanted
    old = os.umask(0o022)
    os.umask(old)
    other = 0o002 if old != 0o002 else 0o000
    result = subprocess.run(
        [zviz.binary, "--root", zviz.root, "run", "--bundle", bundle, unique_id()],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **path_env},
        preexec_fn=lambda: os.umask(other),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == wanted
