"""OCI hooks under the real `zviz` CLI: where, when and with what each of the six runs.

Hooks are shell scripts on the host (busybox sh inside the container for
startContainer). The createContainer hook runs as the container's root, an
unprivileged host uid, so the scripts and the log they append to sit in a directory
everyone may reach.
"""

import json
import os
import shutil
import tempfile
import time

import pytest

from integration.ids import tagged
from integration.zviz_cli import Zviz, edit_config, leftovers, unique_id


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


@pytest.fixture
def hook_dir():
    directory = tempfile.mkdtemp(prefix=tagged("zviz-hooks") + "-")
    os.chmod(directory, 0o777)
    yield directory
    shutil.rmtree(directory)


def script(hook_dir: str, name: str, body: str) -> str:
    path = os.path.join(hook_dir, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return path


def recorder(hook_dir: str, log: str) -> str:
    """A hook that appends `<argv[1]> <user namespace> <$HOOK_VAR> <state JSON>` as a line."""
    return script(
        hook_dir, "record", f'echo "$1 $(readlink /proc/self/ns/user) $HOOK_VAR $(cat)" >> {log}'
    )


def shared_log(hook_dir: str) -> str:
    log = os.path.join(hook_dir, "log")
    with open(log, "w"):
        pass
    os.chmod(log, 0o666)
    return log


def entries(log: str) -> list[tuple[str, str, str, dict]]:
    with open(log) as f:
        lines = [line.split(" ", 3) for line in f.read().splitlines()]
    return [(kind, userns, var, json.loads(state)) for kind, userns, var, state in lines]


def hook(path: str, kind: str, **extra) -> dict:
    return {"path": path, "args": [os.path.basename(path), kind], "env": ["HOOK_VAR=set"], **extra}


def test_all_six_run_in_order_with_the_state_on_stdin(zviz, make_bundle, hook_dir):
    log = shared_log(hook_dir)
    record = recorder(hook_dir, log)
    bundle = make_bundle(["cat", "/tmp/started"])
    with open(os.path.join(bundle, "rootfs", "start-hook"), "w") as f:
        f.write('#!/bin/sh\necho "startContainer $(id -u) $HOOK_VAR $(cat)" > /tmp/started\n')
    os.chmod(os.path.join(bundle, "rootfs", "start-hook"), 0o755)

    def add_hooks(config):
        config["hooks"] = {
            kind: [hook(record, kind)]
            for kind in ("prestart", "createRuntime", "createContainer", "poststart", "poststop")
        }
        config["hooks"]["startContainer"] = [hook("/start-hook", "startContainer")]
        config["root"]["readonly"] = False

    edit_config(bundle, add_hooks)
    container_id = unique_id()
    result = zviz.run(bundle, container_id)
    assert result.returncode == 0, result.stderr

    recorded = entries(log)
    assert [kind for kind, *_ in recorded] == [
        "prestart", "createRuntime", "createContainer", "poststart", "poststop"
    ]  # fmt: skip
    for kind, _uid, var, state in recorded:
        assert var == "set", kind  # exactly the hook's env
        assert state["id"] == container_id and state["bundle"] == bundle, kind
        assert state["ociVersion"] and "annotations" in state, kind
    statuses = {kind: state["status"] for kind, _, _, state in recorded}
    assert statuses == {
        "prestart": "creating", "createRuntime": "creating", "createContainer": "creating",
        "poststart": "running", "poststop": "stopped",
    }  # fmt: skip
    pids = {state["pid"] for *_, state in recorded}
    assert len(pids) == 1 and pids.pop() > 1  # PID 1's pid on the host, in every hook
    namespaces = {kind: userns for kind, userns, *_ in recorded}
    # The runtime's hooks in the runtime's namespaces; createContainer in the container's.
    host = os.readlink("/proc/self/ns/user")
    assert namespaces["prestart"] == namespaces["createRuntime"] == namespaces["poststop"] == host
    assert namespaces["createContainer"] != host

    # startContainer ran inside the container, before the workload read its file.
    kind, uid, var, state_json = result.stdout.strip().split(" ", 3)
    assert (kind, uid, var) == ("startContainer", "0", "set")
    assert json.loads(state_json)["status"] == "created"
    assert leftovers(container_id, zviz.root) == []


@pytest.mark.parametrize("kind", ["prestart", "createRuntime", "createContainer"])
def test_a_failing_create_hook_fails_the_run_names_itself_and_leaves_nothing(
    zviz, make_bundle, hook_dir, kind
):
    failing = script(hook_dir, "fail", "echo 'no GPU here' >&2; exit 3")
    log = shared_log(hook_dir)
    bundle = make_bundle(["true"])
    edit_config(
        bundle,
        lambda c: c.update(hooks={kind: [{"path": failing}], "poststop": [hook(recorder(hook_dir, log), "poststop")]}),
    )  # fmt: skip
    container_id = unique_id()
    result = zviz.run(bundle, container_id)
    assert result.returncode != 0
    assert f"hooks.{kind}[0] ({failing}): exited with status 3: no GPU here" in result.stderr
    assert leftovers(container_id, zviz.root) == []
    assert entries(log) == []  # a container that never got created has no poststop


def test_a_failing_start_container_hook_fails_before_the_workload_runs(zviz, make_bundle, hook_dir):
    bundle = make_bundle(["sh", "-c", "echo workload ran"])
    edit_config(bundle, lambda c: c.update(hooks={"startContainer": [{"path": "/bin/false"}]}))
    container_id = unique_id()
    result = zviz.run(bundle, container_id)
    assert result.returncode != 0
    assert "hooks.startContainer[0] (/bin/false): exited with status 1" in result.stderr
    assert "workload ran" not in result.stdout
    assert leftovers(container_id, zviz.root) == []


def test_a_hook_past_its_timeout_is_killed_and_fails_the_create(zviz, make_bundle, hook_dir):
    slow = script(hook_dir, "slow", "echo waiting; sleep 60")
    bundle = make_bundle(["true"])
    edit_config(bundle, lambda c: c.update(hooks={"createRuntime": [{"path": slow, "timeout": 1}]}))
    container_id = unique_id()
    started = time.monotonic()
    result = zviz.run(bundle, container_id)
    assert result.returncode != 0
    assert time.monotonic() - started < 30
    assert "killed after its timeout of 1s: waiting" in result.stderr
    assert leftovers(container_id, zviz.root) == []


def test_a_missing_hook_binary_is_named(zviz, make_bundle):
    bundle = make_bundle(["true"])
    edit_config(bundle, lambda c: c.update(hooks={"prestart": [{"path": "/nonexistent/hook"}]}))
    result = zviz.run(bundle)
    assert result.returncode != 0
    assert "exec /nonexistent/hook: No such file or directory" in result.stderr


def test_failing_poststart_and_poststop_hooks_are_warnings_and_the_rest_still_run(
    zviz, make_bundle, hook_dir
):
    log = shared_log(hook_dir)
    record = recorder(hook_dir, log)
    bundle = make_bundle(["sh", "-c", "exit 7"])
    edit_config(
        bundle,
        lambda c: c.update(hooks={
            "poststart": [{"path": "/bin/false"}, hook(record, "poststart")],
            "poststop": [{"path": "/bin/false"}, hook(record, "poststop")],
        }),
    )  # fmt: skip
    container_id = unique_id()
    result = zviz.run(bundle, container_id)
    assert result.returncode == 7, result.stderr  # the workload's own exit code
    assert "hooks.poststart[0] (/bin/false): exited with status 1" in result.stderr
    assert "hooks.poststop[0] (/bin/false): exited with status 1" in result.stderr
    assert [kind for kind, *_ in entries(log)] == ["poststart", "poststop"]
    assert leftovers(container_id, zviz.root) == []


def test_create_start_delete_in_separate_processes_run_poststart_and_poststop(
    zviz, make_bundle, hook_dir
):
    log = shared_log(hook_dir)
    record = recorder(hook_dir, log)
    bundle = make_bundle(["sleep", "60"])
    edit_config(
        bundle,
        lambda c: c.update(hooks={kind: [hook(record, kind)] for kind in ("createRuntime", "poststart", "poststop")}),
    )  # fmt: skip
    container_id = unique_id()
    assert zviz.create(bundle, container_id).returncode == 0
    assert [kind for kind, *_ in entries(log)] == ["createRuntime"]
    assert zviz("start", container_id).returncode == 0
    assert [kind for kind, *_ in entries(log)] == ["createRuntime", "poststart"]
    assert zviz("delete", "--force", container_id).returncode == 0
    recorded = entries(log)
    assert [kind for kind, *_ in recorded] == ["createRuntime", "poststart", "poststop"]
    assert recorded[2][3]["status"] == "stopped" and recorded[2][3]["id"] == container_id
    assert leftovers(container_id, zviz.root) == []


def test_hooks_are_listed_in_features(zviz):
    result = zviz("features")
    assert result.returncode == 0
    assert set(json.loads(result.stdout)["hooks"]) == {
        "prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"
    }  # fmt: skip


def test_a_hook_path_must_be_absolute(zviz, make_bundle):
    bundle = make_bundle(["true"])
    edit_config(bundle, lambda c: c.update(hooks={"prestart": [{"path": "relative/hook"}]}))
    result = zviz.run(bundle)
    assert result.returncode == 1
    assert "hooks.prestart[0].path" in result.stderr
