"""Profile selection rules (runtime/security/selection.py) and root-owned profile files."""

import os
import shutil
import tempfile

import pytest

from runtime.errors import InvalidArgument, Unavailable
from runtime.security import resolve_profile, selection
from shim import config as shim_config
from tests.privileges import writes_root_owned_profiles

MINE = '[profile]\nextends = "ci-runner"\n\n[user_namespace]\nhost_uid = 300000\n'


@pytest.fixture
def root_dir():
    """A root-owned 0755 directory on a path of root-owned directories (not under /tmp)."""
    path = tempfile.mkdtemp(prefix="zviz-unit-profiles-", dir="/run")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def test_default_rule_names_builtins_not_unsafe():
    policy = selection.ProfilePolicy()
    assert selection.choose({"io.zviz.profile": "web-server"}, policy).name == "web-server"
    assert selection.choose({}, policy).name == "ci-runner"
    with pytest.raises(InvalidArgument, match=r"'development'.*not marked unsafe"):
        selection.choose({"io.zviz.profile": "development"}, policy)
    with pytest.raises(InvalidArgument, match="unknown profile 'nope'"):
        selection.choose({"io.zviz.profile": "nope"}, policy)


@pytest.mark.parametrize("value", ["/etc/zviz/x.toml", "rootfs/evil.toml", "x.toml", "..", ""])
def test_annotation_never_names_a_file(value):
    with pytest.raises(InvalidArgument, match="never a file"):
        selection.choose({"io.zviz.profile": value}, selection.ProfilePolicy())


@writes_root_owned_profiles
def test_operator_list_decides(root_dir):
    write(os.path.join(root_dir, "mine.toml"), MINE)
    policy = selection.ProfilePolicy(
        default="hostile-tenant", allowed=("development", "mine"), profile_dirs=(root_dir,)
    )
    assert selection.choose(None, policy).name == "hostile-tenant"
    assert selection.choose({"io.zviz.profile": "development"}, policy).name == "development"
    assert selection.choose({"io.zviz.profile": "mine"}, policy).host_uid == 300000
    with pytest.raises(InvalidArgument, match="allowed_annotation_profiles"):
        selection.choose({"io.zviz.profile": "ci-runner"}, policy)
    with pytest.raises(InvalidArgument, match="not a profile name"):
        selection.ProfilePolicy(allowed=("/etc/x.toml",))


def test_cli_flag_still_loads_any_file_the_annotation_cannot(tmp_path):
    path = write(str(tmp_path / "mine.toml"), MINE)
    assert resolve_profile(path).host_uid == 300000  # --profile: root on the host chose it
    with pytest.raises(InvalidArgument, match="never a file"):
        resolve_profile(None, {"io.zviz.profile": path})


@writes_root_owned_profiles
def test_resolve_profile_is_the_one_decision_for_the_cli_and_the_shim(root_dir):
    """The shim hands its operator's policy to the core, which resolves it with the same
    function as `--profile` and the default rule (it once chose in the shim itself)."""
    write(os.path.join(root_dir, "mine.toml"), MINE)
    policy = selection.ProfilePolicy(
        default="hostile-tenant", allowed=("mine",), profile_dirs=(root_dir,)
    )
    assert resolve_profile(policy, {}).name == "hostile-tenant"
    assert resolve_profile(policy, {"io.zviz.profile": "mine"}).host_uid == 300000
    with pytest.raises(InvalidArgument, match="allowed_annotation_profiles"):
        resolve_profile(policy, {"io.zviz.profile": "web-server"})
    decided = resolve_profile(None, {"io.zviz.profile": "web-server"})
    assert decided.name == "web-server"  # the default rule, as selection.ProfilePolicy()
    assert resolve_profile(decided, {"io.zviz.profile": "batch-job"}) is decided


def test_the_profile_range_is_used_only_where_config_json_leaves_the_mapping_to_it(tmp_path):
    """maps_profile_ids: where harden_spec writes the profile's range, and so the only
    case the shim's per-container id pool is asked for a range."""
    from runtime import security
    from tests.test_security_layers import make_spec

    with_userns = resolve_profile("ci-runner")
    assert with_userns.user_namespace
    own = make_spec(tmp_path)
    assert security.maps_profile_ids(own, with_userns)
    mapped = make_spec(
        tmp_path,
        namespaces=[{"type": "user"}, {"type": "mount"}, {"type": "uts"}],
        uidMappings=[{"containerID": 0, "hostID": 400000, "size": 10}],
        gidMappings=[{"containerID": 0, "hostID": 400000, "size": 10}],
    )
    assert not security.maps_profile_ids(mapped, with_userns)
    joined = make_spec(
        tmp_path,
        namespaces=[
            {"type": "user", "path": "/proc/self/ns/user"},
            {"type": "uts"},
            {"type": "mount"},
        ],
    )
    assert not security.maps_profile_ids(joined, with_userns)
    security.harden_spec(own, with_userns)
    assert own.linux.uid_mappings[0].host_id == with_userns.host_uid


@writes_root_owned_profiles
def test_root_owned_file_loads(root_dir):
    path = write(os.path.join(root_dir, "mine.toml"), MINE)
    assert selection.load_operator_profile(path, ()).host_uid == 300000
    assert selection.load_operator_profile("mine", (root_dir,)).host_uid == 300000


@writes_root_owned_profiles
@pytest.mark.parametrize(
    "spoil, problem",
    [
        (lambda d, f: os.chmod(d, 0o775), "writable by group or others"),
        (lambda d, f: os.chmod(f, 0o666), "writable by group or others"),
        (lambda d, f: os.chown(f, 65534, 65534), "owned by uid 65534"),
        (lambda d, f: os.chown(d, 65534, 65534), "owned by uid 65534"),
    ],
)
def test_profile_file_others_could_change_is_refused(root_dir, spoil, problem):
    path = write(os.path.join(root_dir, "mine.toml"), MINE)
    spoil(root_dir, path)
    with pytest.raises(InvalidArgument, match=problem):
        selection.load_operator_profile("mine", (root_dir,))


@writes_root_owned_profiles
def test_symlinks_and_fifos_are_refused(root_dir, tmp_path):
    target = write(str(tmp_path / "evil.toml"), MINE)
    os.symlink(target, os.path.join(root_dir, "link.toml"))
    with pytest.raises(InvalidArgument, match="symlinks are not followed"):
        selection.load_operator_profile("link", (root_dir,))
    os.mkfifo(os.path.join(root_dir, "fifo.toml"), 0o644)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        selection.load_operator_profile("fifo", (root_dir,))
    # /tmp is world-writable: anything under it is refused.
    with pytest.raises(InvalidArgument, match="/tmp is writable by group or others"):
        selection.load_operator_profile(target, ())


@writes_root_owned_profiles
def test_what_a_root_owned_file_extends_is_checked_too(root_dir, tmp_path):
    evil = write(str(tmp_path / "evil.toml"), '[profile]\nextends = "development"\n')
    write(os.path.join(root_dir, "mine.toml"), f'[profile]\nextends = "{evil}"\n')
    with pytest.raises(InvalidArgument, match="writable by group or others"):
        selection.load_operator_profile("mine", (root_dir,))


def test_runtime_options_config_falls_back_per_key(tmp_path):
    machine = shim_config.ShimConfig(profile="batch-job", profile_dirs=("/etc/zviz/profiles",))
    path = tmp_path / "shim.toml"
    path.write_text('allowed_annotation_profiles = ["web-server"]\n')
    merged = shim_config.load_config(str(path)).over(machine)
    assert merged.profile == "batch-job"
    assert merged.allowed_annotation_profiles == ("web-server",)
    assert merged.profile_dirs == ("/etc/zviz/profiles",)
    path.write_text('profile_dirs = "/etc"\n')
    with pytest.raises(shim_config.ConfigError, match="profile_dirs: must be a list"):
        shim_config.load_config(str(path))


def test_id_pool_reserves_distinct_ranges_and_frees_only_its_own(tmp_path, monkeypatch):
    from shim import idpool

    monkeypatch.setattr(idpool, "POOL_DIR", str(tmp_path / "ids"))
    first = idpool.reserve(1000000, 2, "ns/a")
    second = idpool.reserve(1000000, 2, "ns/b")
    assert (first, second) == (1000000, 1000000 + idpool.RANGE_SIZE)
    with pytest.raises(Unavailable, match="all 2 ranges"):
        idpool.reserve(1000000, 2, "ns/c")
    idpool.release(first, "ns/b")  # not b's range: stays held
    assert os.path.exists(os.path.join(idpool.POOL_DIR, str(first)))
    idpool.release(first, "ns/a")
    assert idpool.reserve(1000000, 2, "ns/c") == first


def test_id_ranges_config_is_checked(tmp_path):
    path = tmp_path / "shim.toml"
    path.write_text('id_ranges = "tenant"\n')
    with pytest.raises(shim_config.ConfigError, match="id_ranges"):
        shim_config.load_config(str(path))
    path.write_text("id_pool_ranges = 0\n")
    with pytest.raises(shim_config.ConfigError, match="id_pool_ranges"):
        shim_config.load_config(str(path))
