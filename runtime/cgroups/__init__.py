"""Container cgroups through the cgroupfs driver, on cgroup v1 and v2.

    cg = cgroups.for_container(container_id, cgroups_path)   # v1 or v2, detected
    cg.create(); cg.apply(resources); cg.add_pid(pid)
    ... cg.freeze(); cg.thaw(); cg.stats(); cg.oom_watcher() ...
    cg.destroy()
    cgroups.load(cg.paths)                                   # in a later process

Only groups below the path given (default /zviz/<id>) are ever created, written or
removed: the host's own groups are read, never changed. A hybrid host (v1 controllers
plus a cgroup2 mount holding few or no controllers) is treated as v1, as runc does.
"""

import os
import posixpath

from runtime.cgroups.common import Cgroup
from runtime.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "Cgroup",
    "Hierarchy",
    "cgroup_at",
    "container_path",
    "detect_version",
    "for_container",
    "load",
    "parse_mountinfo",
]

DEFAULT_PARENT = "/zviz"
V2_KEY = "unified"


class Hierarchy:
    """One cgroup hierarchy as mounted (a line of /proc/self/mountinfo): not an OCI mount."""

    __slots__ = ("mount_point", "root", "version", "controllers")

    def __init__(self, mount_point: str, root: str, version: int, controllers: frozenset[str]):
        self.mount_point = mount_point
        self.root = root
        self.version = version
        self.controllers = controllers

    def __repr__(self):
        return f"Hierarchy({self.mount_point}, root={self.root}, v{self.version}, {sorted(self.controllers)})"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Hierarchy]:
    """The cgroup and cgroup2 mounts in a mountinfo text, in mount order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        right_fields = right.split()
        if len(right_fields) < 3 or right_fields[0] not in ("cgroup", "cgroup2"):
            continue
        left_fields = left.split()
        root, mount_point = _unescape(left_fields[3]), _unescape(left_fields[4])
        if right_fields[0] == "cgroup2":
            mounts.append(Hierarchy(mount_point, root, 2, frozenset()))
            continue
        controllers = frozenset(
            opt for opt in right_fields[2].split(",") if opt not in _V1_NON_CONTROLLER_OPTIONS
        )
        mounts.append(Hierarchy(mount_point, root, 1, controllers))
    return mounts


# Super options of a v1 cgroup mount that are not controller names.
_V1_NON_CONTROLLER_OPTIONS = {"rw", "ro", "noprefix", "clone_children", "xattr", "cpuset_v2_mode"}


def detect_version(mounts: list[Hierarchy]) -> int:
    """2 when /sys/fs/cgroup itself is cgroup2 (or cgroup2 is all there is), else 1."""
    for mount in mounts:
        if mount.mount_point == "/sys/fs/cgroup" and mount.version == 2:
            return 2
    if any(m.version == 1 and m.controllers - {"name=systemd"} for m in mounts):
        return 1
    if any(m.version == 2 for m in mounts):
        return 2
    raise FailedPrecondition("no cgroup filesystem is mounted (see /proc/self/mountinfo)")


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controller: path}; the v2 entry ("0::/x") is keyed "unified"."""
    result = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hier_id, controllers, path = parts
        if not controllers:
            result[V2_KEY] = path
            continue
        for controller in controllers.split(","):
            result[controller] = path
    return result


def container_path(cgroups_path: str | None, container_id: str) -> tuple[str, bool]:
    """(normalized path, relative?) for linux.cgroupsPath, as runc reads it.

    Absolute paths are below each hierarchy's root; relative ones below the cgroup of
    the calling process. A path that would name the base itself or climb out of it is
    refused: zviz only writes into groups it creates.
    """
    field = "config.json: linux.cgroupsPath"
    if cgroups_path is None or cgroups_path == "":
        return f"{DEFAULT_PARENT}/{container_id}", False
    if not isinstance(cgroups_path, str):
        raise InvalidArgument(f"{field}: must be a string")
    if "\x00" in cgroups_path or "\n" in cgroups_path:
        raise InvalidArgument(f"{field}: must not contain a NUL or newline, got {cgroups_path!r}")
    if not cgroups_path.startswith("/") and cgroups_path.count(":") == 2:
        return systemd_path(cgroups_path), False
    relative = not cgroups_path.startswith("/")
    parts = [p for p in cgroups_path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"{field}: must not contain '..', got {cgroups_path!r}")
    if not parts:
        # The container's cgroup is removed on delete: it must be one of its own.
        raise InvalidArgument(
            f"{field}: must name a cgroup below the root (or the caller's own cgroup), "
            f"got {cgroups_path!r}: zviz only creates its own sub-groups"
        )
    return "/" + "/".join(parts), relative


def systemd_path(cgroups_path: str) -> str:
    """The cgroupfs path systemd gives a runc-style `slice:prefix:name` cgroupsPath.

    containerd's CRI sends these when the kubelet uses the systemd cgroup driver
    ("kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>"). zviz creates the group
    itself through cgroupfs where systemd would put the unit: each dash of a slice name
    is a level (a-b.slice lives in a.slice), and the unit is <prefix>-<name>.scope. No
    D-Bus: systemd does not know the scope, but the pod's slice, which it manages,
    contains it.
    """
    field = "config.json: linux.cgroupsPath"
    slice_name, prefix, name = cgroups_path.split(":")
    slice_name = slice_name or "system.slice"
    if not name or "/" in prefix or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"{field}: {cgroups_path!r}: not a slice:prefix:name path")
    if name.endswith(".slice"):
        unit = name
    else:
        unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    if slice_name == "-.slice":
        return "/" + unit
    stem = slice_name[: -len(".slice")]
    if (
        not slice_name.endswith(".slice")
        or "/" in slice_name
        or not stem
        or stem.startswith("-")
        or stem.endswith("-")
        or "--" in stem
    ):
        raise InvalidArgument(f"{field}: {cgroups_path!r}: {slice_name!r} is not a systemd slice")
    parts = stem.split("-")
    levels = ["-".join(parts[: i + 1]) + ".slice" for i in range(len(parts))]
    return "/" + "/".join(levels) + "/" + unit


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _host_mounts() -> list[Hierarchy]:
    return parse_mountinfo(_read_text("/proc/self/mountinfo"))


def _below(mount: Hierarchy, own_path: str) -> str:
    """The caller's cgroup path relative to this mount's root."""
    if mount.root != "/" and (own_path == mount.root or own_path.startswith(mount.root + "/")):
        own_path = own_path[len(mount.root) :]
    return own_path or "/"


def for_container(container_id: str, cgroups_path: str | None = None, log=None) -> Cgroup:
    """The (not yet created) cgroup of a container on this host's cgroup version.

    `log(level, message)` (a runtime.log.Log) receives notes on settings skipped.
    """
    path, relative = container_path(cgroups_path, container_id)
    own = _read_text("/proc/self/cgroup") if relative else ""
    cgroup = cgroup_at(path, relative, _host_mounts(), parse_proc_cgroup(own))
    cgroup.log = log
    return cgroup


def cgroup_at(path: str, relative: bool, mounts: list[Hierarchy], own: dict[str, str]) -> Cgroup:
    """The cgroup at a container_path() result, given the mounts and the caller's cgroups.

    Touches no file: what the host looks like comes in as arguments.
    """
    version = detect_version(mounts)
    if version == 2:
        from runtime.cgroups.v2 import CgroupV2

        mount = _v2_mount(mounts)
        base = _below(mount, own.get(V2_KEY, "/")) if relative else "/"
        directory = posixpath.normpath(mount.mount_point + posixpath.join(base, path[1:]))
        return CgroupV2(directory, base_dir=posixpath.normpath(mount.mount_point + base))

    from runtime.cgroups.v1 import KNOWN_CONTROLLERS, CgroupV1

    paths, bases = {}, {}
    for mount in mounts:
        if mount.version != 1:
            continue
        for controller in sorted(mount.controllers & KNOWN_CONTROLLERS):
            if controller in paths:
                continue  # the same hierarchy mounted twice: the first mount serves
            base = _below(mount, own.get(controller, "/")) if relative else "/"
            paths[controller] = posixpath.normpath(
                mount.mount_point + posixpath.join(base, path[1:])
            )
            bases[controller] = posixpath.normpath(mount.mount_point + base)
    return CgroupV1(paths, bases)


def warm_up_attach() -> None:
    """Start, in a thread, the wait the next cgroup.procs write would block on (v2).

    Every cgroup.procs write takes the kernel's one global cgroup_threadgroup_rwsem for
    writing, and the first writer after a quiet spell waits an RCU grace period (8-12 ms
    on this 2-vCPU VM) while holding cgroup_mutex; writers within the next grace period
    do not wait again. CgroupV2.prepare_join() calls this right after the group is made
    (earlier would block that mkdir): a no-op move of this process into the cgroup it
    is already in ("0" names the writer) pays the wait while the namespaces and the
    rootfs are built, and PID 1's real join is then quick. Best effort: a failure only
    means the real join pays the wait itself.
    """
    try:
        own = parse_proc_cgroup(_read_text("/proc/self/cgroup")).get(V2_KEY)
        mount = _v2_mount(_host_mounts())
    except (OSError, IndexError):
        return
    if own is None:
        return
    target = mount.mount_point + _below(mount, own).rstrip("/") + "/cgroup.procs"
    import _thread

    def move_self() -> None:
        try:
            with open(target, "w") as f:
                f.write("0")
        except OSError:
            pass

    _thread.start_new_thread(move_self, ())


def _v2_mount(mounts: list[Hierarchy]) -> Hierarchy:
    """The cgroup2 mount containers go in: /sys/fs/cgroup, else the first one."""
    unified = [m for m in mounts if m.version == 2]
    return next((m for m in unified if m.mount_point == "/sys/fs/cgroup"), unified[0])


def load(paths: dict[str, str], log=None) -> Cgroup:
    """Re-opens a container's cgroup from the `paths` a previous process persisted."""
    if not paths or not all(isinstance(p, str) and os.path.isabs(p) for p in paths.values()):
        raise InvalidArgument(f"cgroup paths must be absolute directories, got {paths!r}")
    if set(paths) == {V2_KEY}:
        from runtime.cgroups.v2 import CgroupV2

        cgroup: Cgroup = CgroupV2(paths[V2_KEY])
    else:
        from runtime.cgroups.v1 import CgroupV1

        cgroup = CgroupV1(dict(paths))
    cgroup.log = log
    return cgroup
