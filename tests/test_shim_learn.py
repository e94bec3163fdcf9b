"""The shim's learn mode without containers: who may ask for it, where its file goes, and
how `zviz profile learn -- ctr ...` reads the ctr command (the runs themselves:
integration/test_profile_learn_shim.py)."""

import os
import stat

import pytest

from runtime.errors import InvalidArgument
from runtime.security import selection
from runtime.security.learn_ctr import CtrRun
from shim import config as shim_config
from shim import learn as shim_learn
from tests.privileges import needs_root

POD = {
    "io.kubernetes.cri.sandbox-namespace": "team-a",
    "io.kubernetes.cri.sandbox-name": "web-0",
    "io.kubernetes.cri.container-name": "app",
}


def test_learning_is_the_operators_choice():
    learn = selection.ProfilePolicy(mode="learn")
    assert selection.learning({}, learn)
    assert selection.choose({}, learn).mode == "audit"  # a sandbox: audit, never learnt
    # The annotation may ask for stricter (enforce), never for learning on its own.
    assert not selection.learning({"io.zviz.mode": "enforce"}, learn)
    enforcing = selection.ProfilePolicy()
    assert not selection.learning({}, enforcing)
    with pytest.raises(InvalidArgument, match="not in the operator's allowed_annotation_modes"):
        selection.learning({"io.zviz.mode": "learn"}, enforcing)
    allowed = selection.ProfilePolicy(allowed_modes=("learn",))
    assert selection.learning({"io.zviz.mode": "learn"}, allowed)
    assert selection.base_profile({"io.zviz.mode": "learn"}, allowed).name == "ci-runner"
    with pytest.raises(InvalidArgument, match="is not one of enforce, audit, learn"):
        selection.ProfilePolicy(mode="learning")


def test_learn_dir_must_be_absolute(tmp_path):
    config = tmp_path / "shim.toml"
    config.write_text('mode = "learn"\nlearn_dir = "learned"\n')
    with pytest.raises(shim_config.ConfigError, match="learn_dir: must be an absolute path"):
        shim_config.load_config(str(config))
    config.write_text('mode = "learn"\nlearn_dir = "/var/lib/zviz/learned"\n')
    loaded = shim_config.load_config(str(config))
    assert shim_learn.may_learn(loaded) and loaded.learn_dir == "/var/lib/zviz/learned"
    assert not shim_learn.may_learn(shim_config.ShimConfig())


def test_the_learned_file_is_named_by_the_pod_and_stays_in_learn_dir():
    assert shim_learn.learned_file_name("k8s.io", "abc", POD) == "team-a_web-0_app.toml"
    assert shim_learn.learned_file_name("default", "job1", {}) == "default_job1.toml"
    # Names a pod chooses cannot leave the directory nor hide the file.
    hostile = {
        "io.kubernetes.cri.sandbox-namespace": "../..",
        "io.kubernetes.cri.sandbox-name": "/etc/cron.d/x\n",
        "io.kubernetes.cri.container-name": "." * 300,
    }
    name = shim_learn.learned_file_name("k8s.io", "abc", hostile)
    assert "/" not in name and not name.startswith(".") and name.isprintable(), name
    assert len(name) < 255


@needs_root("the learned file's directory must be root's")
def test_learn_dir_is_made_root_only_and_no_symlink_is_followed(tmp_path):
    learn_dir = tmp_path / "learned"
    learn_dir.mkdir(mode=0o777)
    os.chmod(learn_dir, 0o777)
    path = shim_learn.write_learned(str(learn_dir), "a_b.toml", "[profile]\n")
    assert stat.S_IMODE(os.stat(learn_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert open(path).read() == "[profile]\n"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    with pytest.raises(OSError):
        shim_learn.write_learned(str(tmp_path / "link"), "a_b.toml", "x")
    assert not os.listdir(elsewhere)
    with pytest.raises(InvalidArgument):
        shim_learn.write_learned(str(learn_dir), "../a.toml", "x")


def test_the_ctr_command_is_read_for_its_namespace_and_id():
    command = CtrRun(
        ["ctr", "--address", "/run/c.sock", "-n", "ns1", "run", "--rm", "--runtime",
         "io.containerd.zviz.v2", "--runtime-config-path=/etc/x.toml", "-t",
         "--mount", "type=bind,src=/a,dst=/b", "img:latest", "job1", "sh", "-c", "true"]
    )  # fmt: skip
    assert (command.namespace, command.container_id) == ("ns1", "job1")
    assert command.options["--runtime-config-path"] == "/etc/x.toml"
    assert command.has("--rm") and not command.has("--detach", "-d")
    extra = command.with_run_options(["--annotation", "io.zviz.mode=learn"])
    assert extra[extra.index("run") + 1 : extra.index("run") + 3] == [
        "--annotation",
        "io.zviz.mode=learn",
    ]
    for argv in (["ctr", "images", "ls"], ["ctr", "run", "img"], ["runc", "run", "x"]):
        with pytest.raises(InvalidArgument, match="profile learn"):
            CtrRun(argv)
