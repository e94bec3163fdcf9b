"""PID 1's filesystem sequence, pinned without root through the syscall seam.

RootfsBuilder runs for real on a temp directory standing for the rootfs (secure_join,
the mount points it makes, openat2's RESOLVE_* checks are the kernel's, unprivileged),
with every mount, pivot_root, chdir and mknod recorded instead of made
(tests/recording_syscall.py). integration/test_filesystem.py and integration/security/
prove the same sequence on the real kernel as root; these pin its order and its
arguments, as any user.
"""

import errno
import os
import stat

import pytest

from runtime import errors, linux, rootfs
from runtime.defaults import default_config
from runtime.rootfs import RootfsBuilder, open_bind_sources
from runtime.spec import parse_spec
from tests.recording_syscall import RecordingSyscall

PINNED = linux.RESOLVE_BENEATH | linux.RESOLVE_NO_SYMLINKS
VOLUME = "/data"


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """A bundle with an empty rootfs (the cwd, as in PID 1) and a host volume."""
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "volume").mkdir()
    monkeypatch.chdir(tmp_path / "rootfs")
    return tmp_path


def make_spec(bundle, **linux_section):
    config = default_config()
    # The cgroup mount reads the host's hierarchies from /proc/self/mountinfo: pinned by
    # integration/test_cgroups.py on each host layout, left out here.
    config["mounts"] = [m for m in config["mounts"] if m["type"] != "cgroup"]
    config["mounts"].append(
        {"destination": VOLUME, "type": "bind", "source": str(bundle / "volume"),
         "options": ["rbind", "ro"]}
    )  # fmt: skip
    config["linux"].update(linux_section)
    return parse_spec(config, str(bundle))


def make_builder(bundle, spec, recorder, **overrides):
    # The parent's clones of the bind sources (host root, before any namespace): not
    # part of PID 1's sequence, so left out of the record.
    bind_source_fds = open_bind_sources(spec.mounts, str(bundle), syscall=recorder)
    recorder.calls.clear()
    options = dict(
        bundle=str(bundle),
        cgroup_paths={},
        no_pivot=False,
        in_userns=False,
        new_netns=True,
        log=lambda level, message: None,
        bind_source_fds=bind_source_fds,
        syscall=recorder,
    )
    options.update(overrides)
    return RootfsBuilder(spec, **options)


def built(bundle, recorder=None, spec=None, **overrides):
    recorder = recorder or RecordingSyscall(bundle / "rootfs")
    spec = spec or make_spec(bundle)
    make_builder(bundle, spec, recorder, **overrides).build()
    return recorder


def mount_calls(recorder):
    """(where the call lands, fstype or the call's name) of each mount and move_mount."""
    landed = []
    for call in recorder.named("mount", "move_mount"):
        if call.name == "mount":
            landed.append((call.where.get("target"), call.args["fstype"]))
        else:
            landed.append((call.where.get("to_path"), "move_mount"))
    return landed


def test_root_propagation_is_cut_before_anything_is_mounted(bundle):
    calls = built(bundle).calls
    first = calls[0]
    assert first.name == "mount"
    assert first.args["target"] == "/" and first.args["source"] is None
    assert first.args["flags"] == linux.MS_SLAVE | linux.MS_REC
    # The rootfs: a clone of the cwd, made private before it is attached and entered.
    names = [c.name for c in calls[1:5]]
    assert names == ["open_tree", "mount_setattr", "move_mount", "fchdir"]
    clone, private, attach, enter = calls[1:5]
    assert clone.where["path"] == "/" and clone.args["flags"] & linux.AT_RECURSIVE
    assert private.args["propagation"] == linux.MS_PRIVATE and private.args["recursive"]
    assert private.args["fd"] == attach.args["from_dirfd"] == enter.args["fd"] == clone.result
    assert attach.where["to_path"] == "/"
    # Onto the cwd without a lookup, which would need search permission on it.
    assert attach.args["to_path"] == "" and attach.args["flags"] & linux.MOVE_MOUNT_T_EMPTY_PATH


def test_a_private_rootfs_propagation_is_private_from_the_start(bundle):
    calls = built(bundle, spec=make_spec(bundle, rootfsPropagation="private")).calls
    assert calls[0].args["flags"] == linux.MS_PRIVATE | linux.MS_REC


def test_every_mount_lands_through_an_fd_opened_beneath_the_root_without_symlinks(bundle):
    recorder = built(bundle)
    pivot = recorder.calls.index(recorder.named("pivot_root")[0])
    rootfs_attach = recorder.named("move_mount")[0]
    checked = 0
    for call in recorder.calls[:pivot]:
        if call.name not in ("mount", "move_mount") or call is rootfs_attach:
            continue
        if call.args.get("target") == "/":
            continue  # the propagation of "/" itself, before anything else
        target = call.args.get("target") or call.args.get("to_path")
        fd = recorder.fd_of(target)
        assert fd is not None, f"{call}: by path, not through a pinned fd"
        opener = recorder.opened_by(fd)
        if opener is None:
            # A default device: bound onto a file made O_NOFOLLOW in the pinned /dev.
            assert call.args["source"].startswith("/dev/"), call
            assert call.where["target"] == call.args["source"], call
        else:
            assert opener.name == "openat2", call
            assert opener.args["resolve"] == PINNED, call
            assert opener.args["dirfd"] == linux.AT_FDCWD and opener.args["flags"] & os.O_PATH
            assert not opener.args["path"].startswith("/"), opener
        checked += 1
    assert checked >= 12


def test_mounts_land_in_config_order_then_devices_then_pivot(bundle):
    recorder = built(bundle)
    landed = mount_calls(recorder)
    assert landed[:2] == [("host:/", None), ("/", "move_mount")]
    assert landed[2:11] == [
        ("/proc", "proc"),
        ("/dev", "tmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/dev/mqueue", "mqueue"),
        ("/sys", "sysfs"),
        (VOLUME, "move_mount"),  # the parent's clone of the source, then
        (VOLUME, "move_mount"),  # a clone made here in its place (mountinfo keeps config order)
        (VOLUME, None),  # its "ro": a bind remount, as a bind cannot be made read-only
    ]
    # The parent's clone is let go once its replacement is made (detached, never left).
    detached = [c for c in recorder.named("umount2") if c.where.get("target") == VOLUME]
    assert [c.args["flags"] for c in detached] == [linux.MNT_DETACH]
    devices = [target for target, _ in landed[11:17]]
    assert devices == [f"/dev/{name}" for name in rootfs.DEFAULT_DEVICES]
    volume = recorder.named("move_mount")[1]
    assert volume.where["from_dirfd"] == "host:" + str(bundle / "volume")
    remount = [c for c in recorder.named("mount") if c.where.get("target") == VOLUME][0]
    assert remount.args["flags"] & (linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY) == (
        linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
    )
    links = {c.where["path"]: c.args["link_text"] for c in recorder.named("symlink")}
    assert links == {f"/dev/{name}": target for target, name in rootfs.DEV_SYMLINKS}
    assert [c.name for c in recorder.calls[-4:]] == ["pivot_root", "mount", "umount2", "chdir"]


def test_proc_and_sys_are_never_mounted_through_an_image_symlink(bundle):
    os.mkdir("elsewhere")
    os.symlink("elsewhere", "proc")
    recorder = RecordingSyscall(bundle / "rootfs")
    with pytest.raises(errors.InvalidArgument, match="/proc: proc must be mounted on an ordinary"):
        built(bundle, recorder)
    assert "/elsewhere" not in [target for target, _ in mount_calls(recorder)]
    assert recorder.open_fds() == []


def test_a_destination_swapped_for_a_symlink_after_it_was_resolved_is_refused(
    bundle, monkeypatch, tmp_path
):
    """The race of runc's CVE-2021-30465, without root: the kernel's RESOLVE_NO_SYMLINKS
    refuses the swapped path, so nothing is mounted on the host directory."""
    host = tmp_path / "host-dir"
    host.mkdir()
    real_secure_join = rootfs.secure_join

    def racing_secure_join(base, unsafe):
        resolved = real_secure_join(base, unsafe)
        if unsafe == VOLUME:
            os.makedirs(resolved, exist_ok=True)
            os.rmdir(resolved)
            os.symlink(host, resolved)
        return resolved

    monkeypatch.setattr(rootfs, "secure_join", racing_secure_join)
    recorder = RecordingSyscall(bundle / "rootfs")
    with pytest.raises(errors.ZvizError, match=f"{VOLUME}: .*(changed|not a directory)"):
        built(bundle, recorder)
    assert not [t for t, _ in mount_calls(recorder) if t and str(host) in t]
    assert recorder.open_fds() == []


def test_pivot_root_then_the_old_root_is_made_slave_and_detached(bundle):
    marks = []
    recorder = RecordingSyscall(bundle / "rootfs")
    spec = make_spec(bundle)
    builder = make_builder(bundle, spec, recorder)
    builder.build(before_pivot=lambda: marks.append(len(recorder.calls)))
    pivot, slave, detach, chdir = recorder.calls[-4:]
    assert marks == [len(recorder.calls) - 4], "the hooks run with every mount made, before pivot"
    assert (pivot.name, pivot.args) == ("pivot_root", {"new_root": ".", "put_old": "."})
    assert (slave.name, slave.args["target"], slave.args["flags"]) == (
        "mount", ".", linux.MS_SLAVE | linux.MS_REC
    )  # fmt: skip
    assert (detach.name, detach.args) == ("umount2", {"target": ".", "flags": linux.MNT_DETACH})
    assert (chdir.name, chdir.args) == ("chdir", {"path": "/"})
    assert not recorder.named("chroot")


def test_a_refused_pivot_root_is_an_error_never_a_chroot(bundle):
    recorder = RecordingSyscall(bundle / "rootfs")
    recorder.fail("pivot_root", errno.EINVAL)
    with pytest.raises(errors.FailedPrecondition, match="pivot_root refused"):
        built(bundle, recorder)
    assert recorder.calls[-1].name == "pivot_root"
    # No chroot, and the old root never detached (the one umount2 is a volume's re-clone).
    assert not recorder.named("chroot")
    assert {c.where.get("target") for c in recorder.named("umount2")} == {VOLUME}


def test_no_pivot_moves_the_rootfs_over_slash_and_chroots(bundle):
    recorder = built(bundle, no_pivot=True)
    move, chroot, chdir = recorder.calls[-3:]
    assert (move.name, move.args["source"], move.args["target"]) == ("mount", ".", "/")
    assert move.args["flags"] == linux.MS_MOVE
    assert (chroot.name, chroot.args, chdir.args) == ("chroot", {"path": "."}, {"path": "/"})
    assert not recorder.named("pivot_root")


def test_finish_masks_then_makes_read_only_then_the_root_last(bundle):
    spec = make_spec(bundle)
    recorder = RecordingSyscall(bundle / "rootfs")
    builder = make_builder(bundle, spec, recorder)
    builder.build()
    recorder.calls.clear()
    # A directory masks with a read-only tmpfs; a path this kernel lacks is skipped.
    recorder.fail("mount", errno.ENOTDIR, lambda c: c.args["target"] == "/proc/acpi"
                  and c.args["source"] == "/dev/null")  # fmt: skip
    recorder.fail("mount", errno.ENOENT, lambda c: c.args["target"] == "/proc/timer_stats")
    # A user namespace locks nosuid/nodev on the rootfs mount: the remount must keep them.
    recorder.st_flags["/"] = os.ST_NOSUID | os.ST_NODEV
    builder.finish()
    mounts = recorder.named("mount")
    masked = [c.args["target"] for c in mounts if c.args["source"] == "/dev/null"]
    assert masked == spec.linux.masked_paths
    assert [(c.args["target"], c.args["fstype"], c.args["flags"]) for c in mounts
            if c.args["source"] == "tmpfs"] == [("/proc/acpi", "tmpfs", linux.MS_RDONLY)]  # fmt: skip
    first_readonly = next(i for i, c in enumerate(mounts) if c.args["target"] == "/proc/bus")
    assert all(c.args["source"] in ("/dev/null", "tmpfs") for c in mounts[:first_readonly])
    readonly = mounts[first_readonly:-1]
    for path in spec.linux.readonly_paths:
        bind, remount = [c for c in readonly if c.args["target"] == path]
        assert bind.args["flags"] == linux.MS_BIND | linux.MS_REC
        lock = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
        assert remount.args["flags"] & lock == lock and remount.args["flags"] & linux.MS_REMOUNT
    root = mounts[-1]
    assert root.args["target"] == "/" and root.args["source"] is None
    assert root.args["flags"] == (
        linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
    )


def test_a_failing_mount_names_its_destination_and_leaves_no_fd_behind(bundle):
    recorder = RecordingSyscall(bundle / "rootfs")
    recorder.fail("mount", errno.ENODEV, lambda c: c.where.get("target") == "/dev/shm")
    spec = make_spec(bundle)
    builder = make_builder(bundle, spec, recorder)
    volume_fd = builder.bind_source_fds[-1]
    with pytest.raises(OSError) as raised:
        builder.build()
    assert raised.value.errno == errno.ENODEV
    assert "config.json: mounts: /dev/shm" in str(raised.value)
    # Nothing after the failure, and every fd closed: the caller's bind source too,
    # so what remains is the mount namespace alone, which dies with PID 1.
    assert mount_calls(recorder)[-1] == ("/dev/shm", "tmpfs")
    assert not recorder.named("pivot_root")
    assert recorder.open_fds() == []
    with pytest.raises(OSError):
        os.fstat(volume_fd)


def test_a_failing_rootfs_clone_closes_the_callers_fds_too(bundle):
    recorder = RecordingSyscall(bundle / "rootfs")
    recorder.fail("move_mount", errno.EPERM, lambda c: c.where.get("to_path") == "/")
    spec = make_spec(bundle)
    builder = make_builder(bundle, spec, recorder)
    with pytest.raises(OSError, match="move_mount"):
        builder.build()
    assert recorder.open_fds() == []


def test_sysfs_refused_falls_back_to_the_hosts_sys_read_only_everywhere_beneath(bundle):
    recorder = RecordingSyscall(bundle / "rootfs")
    recorder.fail("mount", errno.EPERM, lambda c: c.args["fstype"] == "sysfs")
    recorder = built(bundle, recorder)
    clone = [c for c in recorder.named("open_tree") if c.args["path"] == "/sys"]
    assert len(clone) == 1 and clone[0].args["flags"] & linux.AT_RECURSIVE
    setattrs = [c for c in recorder.named("mount_setattr") if c.args["fd"] == clone[0].result]
    assert [c.args["propagation"] for c in setattrs] == [rootfs.VOLUME_PROPAGATION, 0]
    locked = setattrs[1].args
    assert locked["recursive"] and locked["attr_set"] == (
        linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV
        | linux.MOUNT_ATTR_NOEXEC
    )  # fmt: skip
    attach = [c for c in recorder.named("move_mount") if c.args["from_dirfd"] == clone[0].result]
    assert [c.where["to_path"] for c in attach] == ["/sys"]
    # Locked before attached: never a moment with a writable host /sys in the container.
    assert recorder.calls.index(setattrs[1]) < recorder.calls.index(attach[0])


def test_a_device_absent_from_the_host_is_made_by_mknod_in_the_pinned_parent(bundle):
    spec = make_spec(
        bundle,
        devices=[{"path": "/dev/s5seam-dev", "type": "c", "major": 10, "minor": 250,
                  "fileMode": 0o620}],
    )  # fmt: skip
    recorder = built(bundle, spec=spec)
    (mknod,) = recorder.named("mknod")
    assert mknod.args["path"] == "s5seam-dev" and mknod.where["dir_fd"] == "/dev"
    assert mknod.args["mode"] == stat.S_IFCHR | 0o620
    assert mknod.args["device"] == os.makedev(10, 250)
    assert recorder.opened_by(mknod.args["dir_fd"]).args["resolve"] == PINNED


def test_a_device_in_a_user_namespace_must_exist_on_the_host(bundle):
    spec = make_spec(bundle, devices=[{"path": "/dev/s5seam-dev", "type": "c", "major": 10,
                                       "minor": 250}])  # fmt: skip
    recorder = RecordingSyscall(bundle / "rootfs")
    with pytest.raises(errors.InvalidArgument, match="no host device .* to bind"):
        built(bundle, recorder, spec=spec, in_userns=True)
    assert not recorder.named("mknod", "pivot_root")


def cgroup_spec(bundle):
    config_spec = make_spec(bundle)
    cgroup = parse_spec(default_config(), str(bundle)).mounts[-1]
    assert cgroup.type == "cgroup"
    config_spec.mounts.insert(len(config_spec.mounts) - 1, cgroup)
    return config_spec


OWN_GROUPS = {"memory": "/sys/fs/cgroup/memory/s5seam", "pids": "/sys/fs/cgroup/pids/s5seam"}
LOCKED = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC


def test_cgroup_v1_is_a_read_only_tmpfs_holding_only_the_containers_own_groups(bundle, monkeypatch):
    monkeypatch.setattr(
        rootfs,
        "_cgroup_mountpoints",
        lambda: [
            ("/sys/fs/cgroup/memory", "cgroup"),
            ("/sys/fs/cgroup/pids", "cgroup"),
            ("/sys/fs/cgroup/cpu,cpuacct", "cgroup"),
        ],
    )
    spec = cgroup_spec(bundle)
    recorder = built(bundle, spec=spec, cgroup_paths=OWN_GROUPS)
    calls = [c for c in recorder.named("mount") if c.where.get("target", "").startswith("/sys/fs")]
    assert [(c.where["target"], c.args["source"]) for c in calls] == [
        ("/sys/fs/cgroup", "tmpfs"),
        ("/sys/fs/cgroup/memory", OWN_GROUPS["memory"]),
        ("/sys/fs/cgroup/memory", None),
        ("/sys/fs/cgroup/pids", OWN_GROUPS["pids"]),
        ("/sys/fs/cgroup/pids", None),
        ("/sys/fs/cgroup", None),
    ]
    tmpfs, _, remount, _, _, read_only = calls
    assert (tmpfs.args["flags"], tmpfs.args["data"]) == (LOCKED, "mode=755")
    assert remount.args["flags"] & (linux.MS_REMOUNT | linux.MS_RDONLY | LOCKED) == (
        linux.MS_REMOUNT | linux.MS_RDONLY | LOCKED
    )
    assert read_only.args["flags"] == linux.MS_REMOUNT | linux.MS_RDONLY | LOCKED


def test_cgroup_v2_binds_the_containers_own_group_read_only(bundle, monkeypatch):
    monkeypatch.setattr(rootfs, "_cgroup_mountpoints", lambda: [("/sys/fs/cgroup", "cgroup2")])
    own = {"": "/sys/fs/cgroup/s5seam"}
    recorder = built(bundle, spec=cgroup_spec(bundle), cgroup_paths=own)
    calls = [c for c in recorder.named("mount") if c.where.get("target", "").startswith("/sys/fs")]
    assert [(c.where["target"], c.args["source"]) for c in calls] == [
        ("/sys/fs/cgroup", own[""]),
        ("/sys/fs/cgroup", None),
    ]
    bind, remount = calls
    assert bind.args["flags"] == linux.MS_BIND
    assert remount.args["flags"] & (linux.MS_REMOUNT | linux.MS_RDONLY | LOCKED) == (
        linux.MS_REMOUNT | linux.MS_RDONLY | LOCKED
    )
    for call in calls:
        assert recorder.opened_by(recorder.fd_of(call.args["target"])).args["resolve"] == PINNED
