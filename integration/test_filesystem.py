"""PID 1's filesystem: rootfs, auto-mounts, /dev, masked and read-only paths, OCI mount types."""

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

from integration.ids import tagged
from integration.zviz_cli import Zviz, edit_config, leftovers, unique_id


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / "root"))


def mounts_in(zviz, bundle) -> dict[str, tuple[str, set[str]]]:
    """mountpoint -> (fstype, options) as the container sees /proc/self/mounts."""
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    found = {}
    for line in result.stdout.splitlines():
        _source, target, fstype, options = line.split()[:4]
        found[target] = (fstype, set(options.split(",")))
    return found


def test_auto_mounts_with_safe_options(zviz, make_bundle):
    bundle = make_bundle(["cat", "/proc/self/mounts"])
    edit_config(bundle, lambda c: c.update(mounts=[]))  # every mount below is an auto-mount
    mounts = mounts_in(zviz, bundle)
    assert mounts["/proc"][0] == "proc"
    assert {"nosuid", "nodev", "noexec"} <= mounts["/proc"][1]
    assert mounts["/sys"][0] == "sysfs" and "ro" in mounts["/sys"][1]
    assert mounts["/dev"][0] == "tmpfs" and "nosuid" in mounts["/dev"][1]
    assert mounts["/dev/pts"][0] == "devpts"
    assert mounts["/dev/shm"][0] == "tmpfs"
    assert "ro" in mounts["/"][1]  # root.readonly in the default config


def test_proc_and_sys_are_read_only_where_it_matters(zviz, make_bundle):
    script = (
        "echo x > /proc/sys/kernel/hostname && echo proc-sys-writable;"
        "echo x > /proc/sysrq-trigger && echo sysrq-writable;"
        "touch /sys/kernel/x 2>/dev/null && echo sys-writable;"
        "touch /newfile 2>/dev/null && echo root-writable;"
        "echo checked"
    )
    result = zviz.run(make_bundle(["sh", "-c", script]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "checked"


def test_dev_holds_exactly_the_standard_devices(zviz, make_bundle):
    script = "ls -A /dev; echo ---; for l in stdin stdout stderr fd ptmx; do readlink /dev/$l; done; echo data > /dev/null && head -c 4 /dev/zero | wc -c"
    result = zviz.run(make_bundle(["sh", "-c", script]))
    assert result.returncode == 0, result.stderr
    listing, links = result.stdout.split("---\n")
    names = set(listing.split())
    assert {
        "null",
        "zero",
        "full",
        "random",
        "urandom",
        "tty",
        "pts",
        "shm",
        "ptmx",
        "stdin",
        "stdout",
        "stderr",
        "fd",
    } <= names
    assert not names & {"sda", "vda", "mem", "kmsg", "kvm"}
    assert links.split()[:5] == [
        "/proc/self/fd/0",
        "/proc/self/fd/1",
        "/proc/self/fd/2",
        "/proc/self/fd",
        "pts/ptmx",
    ]
    assert links.split()[5] == "4"


def test_masked_paths_are_unreadable(zviz, make_bundle):
    script = "cat /proc/timer_list | wc -c; ls -A /sys/firmware | wc -l; cat /proc/keys | wc -c"
    result = zviz.run(make_bundle(["sh", "-c", script]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "0"]


def test_user_mount_overrides_the_auto_mount(zviz, make_bundle):
    bundle = make_bundle(["cat", "/proc/self/mounts"])

    def change(config):
        config["mounts"] = [m for m in config["mounts"] if m["destination"] != "/dev/shm"]
        config["mounts"].append(
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "nodev", "size=1m"],
            }
        )

    edit_config(bundle, change)
    mounts = mounts_in(zviz, bundle)
    assert "size=1024k" in mounts["/dev/shm"][1]
    assert sum(1 for target in mounts if target == "/dev/shm") == 1


@pytest.fixture
def shared_dir():
    """A host directory the container's root (a mapped, unprivileged uid) can reach."""
    path = tempfile.mkdtemp(prefix=tagged("zviz-rt-shared") + "-")
    os.chmod(path, 0o777)
    yield pathlib.Path(path)
    shutil.rmtree(path)


def test_bind_mounts_ro_and_rw(zviz, make_bundle, shared_dir):
    shared = shared_dir
    (shared / "hello.txt").write_text("hello from the host\n")
    bundle = make_bundle(
        [
            "sh",
            "-c",
            "cat /var/hello.txt; touch /var/x 2>/dev/null && echo writable; echo rw > /run/out",
        ]
    )

    def change(config):
        config["mounts"] += [
            {
                "destination": "/var",
                "type": "bind",
                "source": str(shared),
                "options": ["rbind", "ro"],
            },
            {
                "destination": "/run",
                "type": "bind",
                "source": str(shared),
                "options": ["bind", "rw"],
            },
        ]

    edit_config(bundle, change)
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the host\n"
    assert (shared / "out").read_text() == "rw\n"
    assert not (shared / "x").exists()


def test_mountinfo_lists_binds_in_config_order(zviz, make_bundle, shared_dir):
    """The mounts appear in /proc/self/mountinfo in config.json's order, binds included
    (runtime-tools' `mounts` program checks it, as runc keeps it): the parent's clones
    of the bind sources are older than the container's other mounts, so PID 1 puts a
    fresh clone of each in its place."""
    bundle = make_bundle(["cat", "/proc/self/mountinfo"])
    order = ["/tmp/first", "/tmp/second", "/tmp/third", "/tmp/fourth"]

    def change(config):
        config["mounts"] += [
            {"destination": order[0], "type": "tmpfs", "source": "tmpfs", "options": []},
            {"destination": order[1], "source": str(shared_dir), "options": ["bind"]},
            {"destination": order[2], "type": "tmpfs", "source": "tmpfs", "options": []},
            {"destination": order[3], "source": str(shared_dir), "options": ["rbind", "ro"]},
        ]

    edit_config(bundle, change)
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    mountpoints = [line.split()[4] for line in result.stdout.splitlines()]
    assert [m for m in mountpoints if m in order] == order, mountpoints


def test_bind_sources_under_a_root_only_directory_reach_the_container(zviz, make_bundle):
    # As kubelet's pod volumes (/var/lib/kubelet, 0750) and containerd's per-sandbox
    # /etc/hosts and /dev/shm: the container's root, an unprivileged host uid, cannot
    # walk there. zviz opens each source as host root (open_tree) and PID 1 attaches it.
    private = tempfile.mkdtemp(prefix=tagged("zviz-rt-private") + "-")  # 0700, root's
    try:
        os.makedirs(os.path.join(private, "volume"))
        with open(os.path.join(private, "volume", "data"), "w") as f:
            f.write("volume data\n")
        with open(os.path.join(private, "hosts"), "w") as f:
            f.write("127.0.0.1 pod\n")
        os.chmod(os.path.join(private, "volume", "data"), 0o644)
        os.chmod(os.path.join(private, "hosts"), 0o644)
        bundle = make_bundle(["sh", "-c", "cat /data/data /etc/hosts; ls -ld /data | cut -c1"])
        edit_config(
            bundle,
            lambda c: c["mounts"].extend([
                {"destination": "/data", "type": "bind", "source": os.path.join(private, "volume"),
                 "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": os.path.join(private, "hosts"),
                 "options": ["bind", "ro"]},
            ]),
        )  # fmt: skip
        result = zviz.run(bundle)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "volume data\n127.0.0.1 pod\nd\n"
    finally:
        shutil.rmtree(private)


def test_an_overlay_rootfs_is_writable_by_the_containers_root(zviz, make_bundle, tmp_path):
    # containerd's snapshots are overlays, which cannot be id-mapped themselves: zviz
    # rebuilds the overlay over id-mapped lower layers. The container's root reads the
    # image's files as its own and its writes land in the upper layer under its host uid.
    bundle = make_bundle(
        ["sh", "-c", "echo new > /root/added && mkdir /root/made && stat -c %u /bin/busybox"]
    )
    edit_config(bundle, lambda c: c["root"].update(readonly=False))
    rootfs, lower = os.path.join(bundle, "rootfs"), os.path.join(bundle, "lower")
    os.rename(rootfs, lower)
    os.mkdir(rootfs)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, rootfs], check=True)
    try:
        result = zviz.run(bundle)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "0\n"  # the image's root-owned files are the container root's
        assert (upper / "root" / "added").read_text() == "new\n"
        assert os.stat(upper / "root" / "added").st_uid == 100000
        assert os.stat(upper / "root" / "made").st_uid == 100000
        assert os.stat(os.path.join(lower, "bin", "busybox")).st_uid == 0  # layers untouched
    finally:
        subprocess.run(["umount", rootfs], check=True)


def test_a_missing_bind_source_is_named_and_leaves_nothing(zviz, make_bundle, tmp_path):
    bundle = make_bundle(["true"])
    missing = str(tmp_path / "no-such-dir")
    edit_config(
        bundle,
        lambda c: c["mounts"].append({"destination": "/data", "type": "bind", "source": missing, "options": ["rbind"]}),
    )  # fmt: skip
    container_id = unique_id()
    result = zviz.run(bundle, container_id)
    assert result.returncode == 1
    assert f"mounts: /data: bind source {missing} does not exist" in result.stderr
    assert leftovers(container_id, zviz.root) == []


def test_a_mount_the_kernel_refuses_names_its_destination_and_leaves_nothing(zviz, make_bundle):
    bundle = make_bundle(["true"])
    edit_config(
        bundle,
        lambda c: c["mounts"].append({"destination": "/data", "type": "zviz-no-such-fs", "source": "none"}),
    )  # fmt: skip
    container_id = unique_id()
    result = zviz.run(bundle, container_id)
    assert result.returncode == 1
    # The kernel's words, and which of config.json's mounts it refused (not the fd PID 1
    # mounted through).
    assert "mounts: /data: " in result.stderr and "No such device" in result.stderr, result.stderr
    assert leftovers(container_id, zviz.root) == []


def test_symlink_in_the_image_cannot_redirect_a_mount_to_the_host(zviz, make_bundle, tmp_path):
    # The container sees its tmpfs through the symlink: the run got past the mounts.
    bundle = make_bundle(["sh", "-c", "ls /escape && stat -f -c %T /escape/m"])
    os.symlink(str(tmp_path), os.path.join(bundle, "rootfs", "escape"))
    edit_config(
        bundle,
        lambda c: c["mounts"].append(
            {"destination": "/escape/m", "type": "tmpfs", "source": "tmpfs"}
        ),
    )
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["m", "tmpfs"]
    # The mount landed inside the rootfs (at <rootfs>/<tmp_path>/m), never on the host's tmp_path.
    assert os.path.isdir(os.path.join(bundle, "rootfs", str(tmp_path).lstrip("/"), "m"))
    assert not os.path.exists(tmp_path / "m")


def test_hostname_and_domainname(zviz, make_bundle):
    bundle = make_bundle(
        ["sh", "-c", "hostname; cat /proc/sys/kernel/domainname"],
        hostname="box",
        domainname="example.org",
    )
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["box", "example.org"]


def test_sysctl_is_applied(zviz, make_bundle):
    bundle = make_bundle(["cat", "/proc/sys/net/ipv4/ip_forward"])
    edit_config(bundle, lambda c: c["linux"].update(sysctl={"net.ipv4.ip_forward": "1"}))
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_cgroup_mount_shows_only_the_containers_own_groups(zviz, make_bundle):
    bundle = make_bundle(
        [
            "sh",
            "-c",
            "cat /proc/self/cgroup; ls /sys/fs/cgroup/pids | grep -c zviz; cat /sys/fs/cgroup/pids/pids.max",
        ]
    )
    edit_config(bundle, lambda c: c["linux"]["resources"].update(pids={"limit": 77}))
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(
        line.endswith(":/") for line in lines if line.count(":") == 2 and not line.startswith("0::")
    )
    assert lines[-2] == "0"  # no sibling containers' groups are visible
    assert lines[-1] == "77"


def test_no_pivot_falls_back_to_move_and_chroot(zviz, make_bundle):
    bundle = make_bundle(["sh", "-c", "ls /; cat /proc/self/mountinfo | wc -l"])
    result = zviz("run", "--no-pivot", "--bundle", bundle, unique_id("zviz-rt-nopivot"))
    assert result.returncode == 0, result.stderr
    assert "bin" in result.stdout.split()


def test_rootfs_is_id_mapped_into_the_user_namespace(zviz, make_bundle):
    """The busybox rootfs is owned by host root; the container's root (a mapped uid) owns it inside."""
    bundle = make_bundle(
        ["sh", "-c", "cat /proc/self/uid_map; stat -c %u /bin/busybox; mkdir /newdir && echo made"]
    )

    def change(config):
        config["root"]["readonly"] = False
        namespaces = config["linux"]["namespaces"]
        if not any(ns["type"] == "user" for ns in namespaces):
            namespaces.append({"type": "user"})
        config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
        config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]

    edit_config(bundle, change)
    # development: a profile whose Landlock rules let root write anywhere in its rootfs
    result = zviz("run", "--profile", "development", "--bundle", bundle, unique_id())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0].split() == ["0", "200000", "65536"]
    assert lines[1:3] == ["0", "made"]
    # Created through the id-mapped mount: on disk it belongs to host root, not 200000.
    assert os.stat(os.path.join(bundle, "rootfs", "newdir")).st_uid == 0


def test_a_writable_path_missing_from_the_image_is_made_for_the_job(zviz, make_bundle):
    # ci-runner's writable list names /builds and /workspace; a busybox image has neither.
    # Under runc the job's root would mkdir them; under zviz "/" is read-only to the job
    # (Landlock), so PID 1 makes them before Landlock: empty, the container root's.
    job = "echo built > /builds/out && mkdir -p /workspace/job && stat -c '%u %g %a' /builds /workspace"
    bundle = make_bundle(["sh", "-c", job])
    edit_config(bundle, lambda c: c["root"].update(readonly=False))
    rootfs = os.path.join(bundle, "rootfs")
    assert not os.path.exists(os.path.join(rootfs, "builds"))
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["0 0 755", "0 0 755"]
    assert os.path.isdir(os.path.join(rootfs, "workspace", "job"))


def test_a_read_only_root_gets_no_writable_path_made(zviz, make_bundle):
    bundle = make_bundle(["sh", "-c", "test ! -e /builds && test ! -e /workspace"])
    edit_config(bundle, lambda c: c["root"].update(readonly=True))
    result = zviz.run(bundle)
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(os.path.join(bundle, "rootfs", "builds"))


def test_an_image_symlink_at_a_writable_path_is_not_followed(zviz, make_bundle):
    # /builds -> /etc/zviz-made: making "/builds" through the link would create a directory
    # in /etc and put a write rule on it; neither happens, and /etc stays read-only.
    bundle = make_bundle(["sh", "-c", "test ! -e /etc/zviz-made; echo x > /builds/f"])
    edit_config(bundle, lambda c: c["root"].update(readonly=False))
    rootfs = os.path.join(bundle, "rootfs")
    os.symlink("/etc/zviz-made", os.path.join(rootfs, "builds"))
    result = zviz.run(bundle)
    assert result.returncode != 0
    assert "can't create /builds/f" in result.stderr, result.stderr
    assert not os.path.exists(os.path.join(rootfs, "etc", "zviz-made"))
    assert os.path.islink(os.path.join(rootfs, "builds"))


def test_a_rootfs_on_a_read_only_filesystem_gets_nothing_made_and_no_warning(zviz, make_bundle):
    # root.readonly unset, but the rootfs itself is read-only (a read-only bind here):
    # the missing /builds stays missing, as under runc, and the workload's stderr stays clean.
    bundle = make_bundle(["sh", "-c", "test ! -e /builds && echo absent"])
    edit_config(bundle, lambda c: c["root"].update(readonly=False))
    rootfs = os.path.join(bundle, "rootfs")
    subprocess.run(["mount", "--bind", rootfs, rootfs], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", rootfs], check=True)
        result = zviz.run(bundle)
    finally:
        subprocess.run(["umount", rootfs], check=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "absent\n"
    assert "writable directory" not in result.stderr, result.stderr
