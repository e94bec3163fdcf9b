"""Who chooses a container's profile (issue 10, item 1).

The annotation `io.zviz.profile` is written by whoever wrote the pod or the image; before
this fix it won over the operator's config, and a value that looked like a path loaded
that file: an image shipping `/evil.toml` (extends `development`, no user namespace)
plus `io.zviz.profile=rootfs/evil.toml` ran its workload as real host root. Now an
annotation may only name a profile the operator allows (by default the built-ins not
marked unsafe), profile files load only from root-owned directories the operator lists,
and a refused choice fails Create with an error naming the profile and the rule.

Everything runs through the real shim under a private containerd, and through `zviz run`
(whose config.json annotation is the same pod/image-author input).
"""

import os
import shutil
import tempfile

import pytest

from integration.ids import tagged, unique_id
from tools.mkimage import build_image

pytestmark = pytest.mark.containerd

ZVIZ = "io.containerd.zviz.v2"
# A local registry name: containerd would put a name without a domain under a public one.
EVIL_REF = f"zviz.local/{tagged('evil-profile')}:latest"
# What the reviewer's image shipped: the unsafe development profile, minus the user
# namespace and Landlock, plus the syscalls that lead out of a container.
EVIL_PROFILE = b"""[profile]
name = "evil"
extends = "development"
unsafe = false

[user_namespace]
required = false
allow_host_root_mapping = true

[landlock]
required = false

[seccomp]
allow_add = ["mount", "unshare", "keyctl", "io_uring_setup"]
deny_remove = ["mount", "unshare", "keyctl", "io_uring_setup"]
"""
UID_MAP = ["cat", "/proc/self/uid_map"]
# An operator's own profile file, loaded by name from profile_dirs.
OPERATOR_PROFILE = tagged("operator-profile")


@pytest.fixture(scope="module")
def evil_image(containerd, tmp_path_factory) -> str:
    archive = str(tmp_path_factory.mktemp("evil-image") / "evil.tar")
    build_image(archive, EVIL_REF, extra_files={"/evil.toml": EVIL_PROFILE})
    containerd.import_image(archive)
    return EVIL_REF


@pytest.fixture
def trusted_dir():
    """A directory the operator may list in profile_dirs: root's, not writable by others,
    on a path of root-owned directories (pytest's tmp dirs live under the world-writable
    /tmp, which the rule refuses)."""
    path = tempfile.mkdtemp(prefix=tagged("zviz-profiles") + "-", dir="/run")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def new_id() -> str:
    return unique_id("zviz-sel")


def ctr_run(containerd, image, args, *, annotation=None, config=None, config_dir=None, cid=None):
    cid = cid or new_id()
    cmd = ["run", "--rm", "--runtime", ZVIZ]
    if annotation is not None:
        cmd += ["--annotation", f"io.zviz.profile={annotation}"]
    if config is not None:
        path = os.path.join(config_dir, f"{cid}.toml")
        with open(path, "w") as f:
            f.write(config)
        cmd += ["--runtime-config-path", path]
    try:
        return containerd.ctr(*cmd, image, cid, *args, check=False, timeout=120)
    finally:
        containerd.ctr("tasks", "delete", "-f", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)


def as_host_root(result) -> bool:
    """uid_map `0 0 4294967295`: the container's root is the host's root."""
    return result.stdout.split()[:3] == ["0", "0", "4294967295"]


def host_root_of(result) -> str:
    """The host uid the container's root maps to, from `cat /proc/self/uid_map`."""
    fields = result.stdout.split()
    assert len(fields) >= 3, result.stdout + result.stderr
    return fields[1]


@pytest.mark.parametrize("where", ["image", "volume"])
def test_image_profile_file_by_annotation_is_refused(containerd, evil_image, tmp_path, where):
    """The reproduced attack: a profile file from the image (or any path the pod controls)."""
    cid = new_id()
    if where == "image":
        # containerd's bundle path is predictable, and the image's files are under rootfs/.
        bundle = os.path.join(
            containerd.state, "io.containerd.runtime.v2.task", containerd.namespace, cid
        )
        annotation = os.path.join(bundle, "rootfs", "evil.toml")
    else:
        # An emptyDir-like place the pod author can write and predict.
        annotation = str(tmp_path / "evil.toml")
        (tmp_path / "evil.toml").write_bytes(EVIL_PROFILE)
    result = ctr_run(containerd, evil_image, UID_MAP, annotation=annotation, cid=cid)
    assert not as_host_root(result), "the image's profile ran it as host root"
    assert result.returncode != 0, result.stdout
    assert annotation in result.stderr, result.stderr
    assert "never a file" in result.stderr, result.stderr


def test_development_by_annotation_refused_unless_the_operator_allows_it(
    containerd, busybox_image, tmp_path
):
    refused = ctr_run(containerd, busybox_image, ["true"], annotation="development")
    assert refused.returncode != 0
    assert "'development'" in refused.stderr and "not marked unsafe" in refused.stderr, (
        refused.stderr
    )
    allowed = ctr_run(
        containerd,
        busybox_image,
        ["true"],
        annotation="development",
        config='allowed_annotation_profiles = ["development", "web-server"]\n',
        config_dir=str(tmp_path),
    )
    assert allowed.returncode == 0, allowed.stderr


def test_operator_config_wins_over_an_annotation_it_does_not_allow(
    containerd, busybox_image, tmp_path
):
    config = 'profile = "hostile-tenant"\nallowed_annotation_profiles = ["batch-job"]\n'
    # No annotation: the operator's default (hostile-tenant maps root to host 200000).
    default = ctr_run(containerd, busybox_image, UID_MAP, config=config, config_dir=str(tmp_path))
    assert default.returncode == 0, default.stderr
    assert host_root_of(default) == "200000"
    # A built-in the operator did not list: refused, naming the rule.
    refused = ctr_run(
        containerd,
        busybox_image,
        UID_MAP,
        annotation="ci-runner",
        config=config,
        config_dir=str(tmp_path),
    )
    assert refused.returncode != 0, refused.stdout
    assert "'ci-runner'" in refused.stderr, refused.stderr
    assert "allowed_annotation_profiles" in refused.stderr, refused.stderr
    # One it listed: the annotation chooses it.
    listed = ctr_run(
        containerd,
        busybox_image,
        UID_MAP,
        annotation="batch-job",
        config=config,
        config_dir=str(tmp_path),
    )
    assert listed.returncode == 0, listed.stderr
    assert host_root_of(listed) == "100000"


def test_profile_dirs_only_root_owned(containerd, busybox_image, tmp_path, trusted_dir):
    """An operator's profile file loads by name from profile_dirs; an insecure dir is refused."""
    mine = (
        f'[profile]\nname = "{OPERATOR_PROFILE}"\nextends = "ci-runner"\n\n'
        "[user_namespace]\nhost_uid = 300000\n"
    )
    with open(os.path.join(trusted_dir, f"{OPERATOR_PROFILE}.toml"), "w") as f:
        f.write(mine)
    config = (
        f'profile_dirs = ["{trusted_dir}"]\nallowed_annotation_profiles = ["{OPERATOR_PROFILE}"]\n'
    )
    ok = ctr_run(
        containerd,
        busybox_image,
        UID_MAP,
        annotation=OPERATOR_PROFILE,
        config=config,
        config_dir=str(tmp_path),
    )
    assert ok.returncode == 0, ok.stderr
    assert host_root_of(ok) == "300000"
    # The same file where another user could replace it: a group-writable directory.
    os.chmod(trusted_dir, 0o775)
    refused = ctr_run(
        containerd,
        busybox_image,
        UID_MAP,
        annotation=OPERATOR_PROFILE,
        config=config,
        config_dir=str(tmp_path),
    )
    assert refused.returncode != 0, refused.stdout
    assert "writable by group or others" in refused.stderr, refused.stderr


def test_cli_annotation_obeys_the_same_rule(probes, tmp_path):
    """`zviz run` without --profile: config.json's annotation is the image's input too."""

    evil_file = tmp_path / "evil.toml"
    evil_file.write_bytes(EVIL_PROFILE)
    evil = probes.run(
        "zviz",
        None,
        UID_MAP,
        config={"annotations": {"io.zviz.profile": str(evil_file)}},
        cid=unique_id("zviz-sel-cli-evil"),
    )
    assert not as_host_root(evil), "the image's profile ran it as host root"
    assert evil.returncode != 0 and "never a file" in evil.stderr, evil.stdout + evil.stderr
    development = probes.run(
        "zviz",
        None,
        ["true"],
        config={"annotations": {"io.zviz.profile": "development"}},
        cid=unique_id("zviz-sel-cli-dev"),
    )
    assert development.returncode != 0 and "not marked unsafe" in development.stderr
    # --profile is the host's root choosing: any built-in, or a file.
    chosen = probes.run(
        "zviz",
        "development",
        ["true"],
        config={"annotations": {"io.zviz.profile": "development"}},
        cid=unique_id("zviz-sel-cli-flag"),
    )
    assert chosen.returncode == 0, chosen.stderr
