"""A mount destination swapped for a symlink after it was resolved must not escape.

A volume shared with another (hostile) container can change under zviz between
`secure_join` resolving a destination inside it and the mount itself (the shape of
runc's CVE-2021-30465). The test widens that window deterministically: right after
`secure_join` returns, the destination directory becomes a symlink to a host
directory outside the rootfs. The mount must then fail with a clear error, never
land on the host directory. Runs in a forked child with its own mount namespace.
"""

import json
import os

import pytest

from runtime import errors, linux, rootfs
from runtime.rootfs import Mount, RootfsBuilder
from tests.privileges import mounts_in_own_namespace

pytestmark = mounts_in_own_namespace


def _in_private_mount_namespace(body) -> dict:
    """Run body() in a forked child with its own mount namespace; returns its dict."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            result = body()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"crash": repr(exc)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split(" ")[4] for line in f}


def _builder(bundle: str) -> RootfsBuilder:
    return RootfsBuilder(
        None,
        bundle=bundle,
        cgroup_paths={},
        no_pivot=False,
        in_userns=False,
        new_netns=False,
        log=lambda *a, **k: None,
    )


def _swap_for_a_symlink_once_resolved(monkeypatch, unsafe_path: str, host_dir) -> None:
    """Right after `secure_join` resolves UNSAFE_PATH, the rootfs's vol/sub (relative to
    the working directory: the rootfs) becomes a symlink to HOST_DIR."""
    real_secure_join = rootfs.secure_join

    def racing_secure_join(base, unsafe):
        resolved = real_secure_join(base, unsafe)
        if unsafe == unsafe_path:
            os.rmdir("vol/sub")
            os.symlink(str(host_dir), "vol/sub")
        return resolved

    monkeypatch.setattr(rootfs, "secure_join", racing_secure_join)


@pytest.mark.parametrize(
    "mount",
    [
        Mount("/vol/sub", "tmpfs", "tmpfs", ["nosuid"]),
        Mount("/vol/sub", "bind", "src", ["rbind", "ro"]),
    ],
    ids=["tmpfs", "bind-ro"],
)
def test_destination_swapped_for_a_symlink_never_mounts_outside_the_rootfs(
    tmp_path, monkeypatch, mount
):
    bundle = tmp_path / "bundle"
    root = bundle / "rootfs"
    (root / "vol" / "sub").mkdir(parents=True)
    (bundle / "src").mkdir()
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "marker").write_text("host\n")
    _swap_for_a_symlink_once_resolved(monkeypatch, "/vol/sub", host_dir)

    def body():
        os.chdir(root)
        try:
            _builder(str(bundle)).mount_one(mount)
            error = None
        except errors.ZvizError as exc:
            error = str(exc)
        return {
            "error": error,
            "host_dir_mounted": str(host_dir) in _mount_points(),
            "host_dir_intact": os.path.exists(host_dir / "marker"),
        }

    result = _in_private_mount_namespace(body)
    assert "crash" not in result, result
    assert result["host_dir_mounted"] is False
    assert result["host_dir_intact"] is True
    assert result["error"] and "/vol/sub" in result["error"], result


def test_an_ordinary_destination_still_mounts_inside(tmp_path):
    bundle = tmp_path / "bundle"
    root = bundle / "rootfs"
    (root / "vol").mkdir(parents=True)
    # An image symlink resolved inside the rootfs is fine: /link -> /vol.
    os.symlink("/vol", root / "link")

    def body():
        os.chdir(root)
        builder = _builder(str(bundle))
        builder.mount_one(Mount("/link/new", "tmpfs", "tmpfs", ["nosuid", "ro"]))
        target = os.path.join(str(root), "vol", "new")
        return {
            "mounted": target in _mount_points(),
            "readonly": bool(os.statvfs(target).f_flag & os.ST_RDONLY),
        }

    result = _in_private_mount_namespace(body)
    assert result == {"mounted": True, "readonly": True}


@pytest.mark.parametrize(
    "mount",
    [
        Mount("/vol/sub/deeper/new", "tmpfs", "tmpfs", []),
        Mount("/vol/sub/deeper/file", "bind", "src-file", ["bind"]),
    ],
    ids=["directory", "file"],
)
def test_mount_point_creation_never_follows_a_swapped_symlink(tmp_path, monkeypatch, mount):
    bundle = tmp_path / "bundle"
    root = bundle / "rootfs"
    (root / "vol" / "sub").mkdir(parents=True)
    (bundle / "src-file").write_text("volume file\n")
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    real_secure_join = rootfs.secure_join

    def racing_secure_join(base, unsafe):
        resolved = real_secure_join(base, unsafe)
        if unsafe == mount.destination:
            os.rmdir("vol/sub")
            os.symlink(str(host_dir), "vol/sub")
        return resolved

    monkeypatch.setattr(rootfs, "secure_join", racing_secure_join)

    def body():
        os.chdir(root)
        try:
            _builder(str(bundle)).mount_one(mount)
            error = None
        except errors.ZvizError as exc:
            error = str(exc)
        return {"error": error, "host_dir": sorted(os.listdir(host_dir))}

    result = _in_private_mount_namespace(body)
    assert "crash" not in result, result
    assert result["host_dir"] == [], result
    assert result["error"] and mount.destination in result["error"], result


def test_a_fifo_where_a_file_mount_point_is_expected_does_not_hang(tmp_path):
    bundle = tmp_path / "bundle"
    root = bundle / "rootfs"
    (root / "etc").mkdir(parents=True)
    os.mkfifo(root / "etc" / "hosts")
    (bundle / "hosts").write_text("127.0.0.1 localhost\n")

    def body():
        os.chdir(root)
        _builder(str(bundle)).mount_one(Mount("/etc/hosts", "bind", "hosts", ["bind", "ro"]))
        with open(os.path.join(str(root), "etc", "hosts")) as f:
            return {"content": f.read()}

    assert _in_private_mount_namespace(body) == {"content": "127.0.0.1 localhost\n"}
