"""config.json's id mappings as containerd 2.x writes them for a hostUsers: false pod.

For such a pod containerd 2.x (test_containerd2_cri.py runs one through its CRI) makes
the pod's user namespace itself and pins it: the sandbox's config.json joins it by path
AND states its mappings, and the pod's /etc/hosts, /etc/hostname and /etc/resolv.conf
are bind mounts with uidMappings/gidMappings of their own (OCI id-mapped mounts), files
containerd made as host root that the pod's root must own. Here the same config.json
shapes go straight to `zviz run`:

- mappings given with a user namespace path must be what that namespace maps;
- a bind mount's own mappings are made (an id-mapped mount), when they are the
  container's; any other mapping is refused, never silently left out.
"""

import contextlib
import os
import subprocess
import time

import pytest

from integration.ids import tagged, unique_id
from integration.zviz_cli import Zviz, edit_config

# The kubelet hands each hostUsers: false pod a 65536-aligned range of host ids.
HOST_ID = 0x80000
SIZE = 65536


def mapping(host_id: int = HOST_ID) -> list[dict]:
    return [{"containerID": 0, "hostID": host_id, "size": SIZE}]


def with_mappings(config, host_id: int = HOST_ID, userns_path: str | None = None) -> None:
    """A user namespace in CONFIG (joined at USERNS_PATH if given) and its mappings."""
    namespaces = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "user"]
    user = {"type": "user", "path": userns_path} if userns_path else {"type": "user"}
    config["linux"]["namespaces"] = [*namespaces, user]
    config["linux"]["uidMappings"] = mapping(host_id)
    config["linux"]["gidMappings"] = mapping(host_id)


@contextlib.contextmanager
def pinned_user_namespace(host_id: int):
    """A process in a user namespace of its own mapping 0 -> HOST_ID (SIZE ids), as
    containerd's pinned one: its /proc/PID/ns/user path."""
    holder = subprocess.Popen(["unshare", "--user", "sleep", "300"])
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/user") == own:
            assert time.monotonic() < deadline, "unshare --user never unshared"
            time.sleep(0.01)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{name}", "w") as f:
                f.write(f"0 {host_id} {SIZE}\n")
        yield f"/proc/{holder.pid}/ns/user"
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("zum-root")))


def test_mappings_given_with_the_joined_namespace_path_are_checked_against_it(zviz, make_bundle):
    bundle = make_bundle(["cat", "/proc/self/uid_map"])
    with pinned_user_namespace(HOST_ID) as userns:
        edit_config(bundle, lambda c: with_mappings(c, HOST_ID, userns))
        same = zviz("run", "--bundle", bundle, unique_id("zum-join"))
        edit_config(bundle, lambda c: with_mappings(c, HOST_ID + SIZE, userns))
        other = zviz("run", "--bundle", bundle, unique_id("zum-join"))
    assert same.returncode == 0, same.stderr
    assert same.stdout.split() == ["0", str(HOST_ID), str(SIZE)]
    assert other.returncode != 0
    assert "are not what the user namespace joined maps" in other.stderr, other.stderr


def test_a_bind_mount_with_the_containers_mappings_is_id_mapped(zviz, make_bundle, tmp_path):
    # containerd's /etc/hosts: made by host root, bound writable, mapped with the pod's ids.
    shared = tmp_path / "sandbox"
    shared.mkdir()
    (shared / "hosts").write_text("127.0.0.1 localhost\n")
    bundle = make_bundle(["sh", "-c", "stat -c '%u %g' /pod/hosts && touch /pod/made && echo ok"])

    def change(config):
        with_mappings(config)
        config["mounts"].append(
            {
                "destination": "/pod",
                "type": "bind",
                "source": str(shared),
                "options": ["rbind", "rw"],
                "uidMappings": mapping(),
                "gidMappings": mapping(),
            }
        )

    edit_config(bundle, change)
    result = zviz("run", "--bundle", bundle, unique_id("zum-idmap"))
    assert result.returncode == 0, result.stderr
    # Host root's file is the container root's; what the container's root makes through
    # the mount is stored with the ids the mapping gives back: host root's (as under runc).
    assert result.stdout.split() == ["0", "0", "ok"], result.stdout
    made = (shared / "made").stat()
    assert (made.st_uid, made.st_gid) == (0, 0)


def test_a_bind_mount_mapped_otherwise_than_the_container_is_refused(zviz, make_bundle, tmp_path):
    shared = tmp_path / "elsewhere"
    shared.mkdir()
    bundle = make_bundle(["true"])

    def change(config):
        with_mappings(config)
        config["mounts"].append(
            {
                "destination": "/elsewhere",
                "type": "bind",
                "source": str(shared),
                "options": ["rbind", "ro"],
                # Container root would be host root through this mount.
                "uidMappings": [{"containerID": 0, "hostID": 0, "size": SIZE}],
                "gidMappings": [{"containerID": 0, "hostID": 0, "size": SIZE}],
            }
        )

    edit_config(bundle, change)
    result = zviz("run", "--bundle", bundle, unique_id("zum-idmap"))
    assert result.returncode != 0
    assert "differ from the container's user namespace" in result.stderr, result.stderr
