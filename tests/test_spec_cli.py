"""A bad config.json through the real `zviz` command: one readable line, exit 1, nothing left behind."""

import json
import os
import subprocess
import sys

import pytest

from runtime.cgroups import container_path
from runtime.defaults import default_config

ZVIZ = os.path.join(os.path.dirname(sys.executable), "zviz")
CGROUP_ROOT = "/sys/fs/cgroup"


def _bad_args(config):
    config["process"]["args"] = []


def _bad_mapping(config):
    config["linux"]["namespaces"].append({"type": "user"})
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 0}]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 1}]


def _host_sysctl(config):
    config["linux"]["sysctl"] = {"vm.overcommit_memory": "1"}


def _bind_typo(config):
    config["mounts"].append(
        {"destination": "/data", "source": "/tmp", "options": ["rbind", "readonly"]}
    )


def _memory_swap(config):
    config["linux"]["resources"]["memory"] = {"limit": 64 << 20, "swap": 32 << 20}


CASES = {
    "empty args": (_bad_args, "config.json: process.args: must be a non-empty list of strings"),
    "zero-size mapping": (
        _bad_mapping,
        "config.json: linux.uidMappings[0].size: must be a positive integer",
    ),
    "host sysctl": (
        _host_sysctl,
        'config.json: linux.sysctl["vm.overcommit_memory"]: is not namespaced: '
        "a container may not change it for the whole host",
    ),
    "bind typo": (
        _bind_typo,
        "config.json: mounts[7].options[1]: unknown mount option 'readonly' "
        "(a bind mount takes only mount flags)",
    ),
    "swap below limit": (
        _memory_swap,
        "config.json: linux.resources.memory.swap: must be at least memory.limit: "
        "swap counts memory+swap (33554432 < 67108864)",
    ),
}


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "bundle" / "rootfs").mkdir(parents=True)
    return tmp_path / "bundle"


def _create(tmp_path, bundle, container_id):
    if not os.access(ZVIZ, os.X_OK):
        pytest.skip(f"{ZVIZ} is not installed: run `make install`")
    return subprocess.run(
        [ZVIZ, "--root", str(tmp_path / "state"), "create", "--bundle", str(bundle), container_id],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _assert_nothing_left(tmp_path, container_id):
    state = tmp_path / "state"
    assert not state.exists() or os.listdir(state) == [], "a failed create left container state"
    cgroup, _ = container_path(None, container_id)
    for hierarchy in os.listdir(CGROUP_ROOT):
        assert not os.path.exists(f"{CGROUP_ROOT}/{hierarchy}{cgroup}"), (
            f"cgroup left in {hierarchy}"
        )


@pytest.mark.parametrize("name", list(CASES))
def test_bad_config_fails_create_with_one_line(tmp_path, bundle, name):
    mutate, message = CASES[name]
    config = default_config(args=["true"])
    mutate(config)
    (bundle / "config.json").write_text(json.dumps(config))
    container_id = f"zviz-spec-cli-{os.getpid()}-{list(CASES).index(name)}"

    result = _create(tmp_path, bundle, container_id)

    assert result.returncode == 1
    assert result.stderr == f"zviz: {message}\n"
    assert result.stdout == ""
    _assert_nothing_left(tmp_path, container_id)


def test_malformed_json_fails_create_with_its_position(tmp_path, bundle):
    (bundle / "config.json").write_text(
        '{\n  "ociVersion": "1.2.0",\n  "root": {"path": "rootfs"},\n}\n'
    )
    container_id = f"zviz-spec-cli-{os.getpid()}-json"

    result = _create(tmp_path, bundle, container_id)

    assert result.returncode == 1
    assert result.stderr == (
        "zviz: config.json: not valid JSON: Expecting property name enclosed in double quotes "
        "at line 4 column 1\n"
    )
    _assert_nothing_left(tmp_path, container_id)
