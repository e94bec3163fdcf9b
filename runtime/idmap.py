"""The container's rootfs as its user namespace's root may use it (made by the parent).

Under the default user namespace the container's root is an unprivileged host uid
(100000), and a rootfs unpacked by root would look owned by nobody: unwritable, its
setuid bits useless. The parent, as host root, makes a detached id-mapped mount of it
instead (host uid 0 shows as the container's root) and PID 1 attaches that.

Most filesystems take an id-mapping directly (open_tree + mount_setattr). An overlay
mount cannot (EINVAL): containerd's snapshots are overlays. For those the parent builds
a new overlay over the same layers: each lower layer id-mapped, the upper layer left as
it is but its root handed to the container's root, so what the container writes is
stored under its host-mapped ids, as in a remapped snapshot. Written by
the parent as host root: id-mapped mounts need privilege over the filesystem's own user
namespace.
"""

import os

from runtime import errors, linux

_OVERLAY_LAYER_KEYS = ("lowerdir", "upperdir", "workdir")


def idmapped_rootfs(pid: int, spec, log) -> int | None:
    """A detached mount of the rootfs, id-mapped through `pid`'s user namespace.

    None when the plain rootfs is right (already owned by the host uid the container's
    root maps to, or no root mapping) or when the filesystem cannot be id-mapped; the
    latter is logged, as the container's root then cannot write its rootfs.
    """
    root_uid = host_id_of_root(pid, "uid_map")
    root_gid = host_id_of_root(pid, "gid_map")
    if root_uid is None:
        return None
    overlay = overlay_layers(spec.root.path)
    owner_probe = overlay["lowerdir"][0] if overlay else spec.root.path
    if os.stat(owner_probe).st_uid == root_uid:
        return None
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if overlay is not None:
            return _idmapped_overlay(overlay, userns, root_uid, root_gid)
        flags = linux.OPEN_TREE_CLONE | linux.OPEN_TREE_CLOEXEC | linux.AT_RECURSIVE
        tree = linux.open_tree(linux.AT_FDCWD, spec.root.path, flags)
        try:
            linux.mount_setattr_idmap(tree, userns)
        except BaseException:
            os.close(tree)
            raise
        return tree
    except OSError as exc:
        log(
            "warning",
            f"rootfs {spec.root.path}: no id-mapped mount ({exc.strerror}); the container's "
            "root sees its files as unmapped (nobody) and cannot write them",
        )
        return None
    finally:
        os.close(userns)


def overlay_layers(path: str) -> dict | None:
    """The layers and options of the overlay mounted at `path`, from mountinfo.

    None when `path` is not an overlay's mount point, or when its options cannot be
    read back safely (relative or escaped layer paths): then it is treated as any
    other filesystem.
    """
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, right_fields = left.split(), right.split()
            if len(fields) > 4 and fields[4] == target and right_fields[:1] == ["overlay"]:
                found = right_fields[2] if len(right_fields) > 2 else ""
            elif len(fields) > 4 and fields[4] == target:
                found = None  # something mounted over the overlay: the top mount counts
    if found is None:
        return None
    layers: dict = {"lowerdir": [], "options": []}
    for option in found.split(","):
        key, _, value = option.partition("=")
        if key in ("rw", "ro"):
            continue
        if key in ("lowerdir", "lowerdir+"):
            layers["lowerdir"] += value.split(":")
        elif key in _OVERLAY_LAYER_KEYS:
            layers[key] = value
        else:
            layers["options"].append((key, value if "=" in option else None))
    paths = layers["lowerdir"] + [layers.get("upperdir", "/"), layers.get("workdir", "/")]
    if not layers["lowerdir"] or any(not p.startswith("/") or "\\" in p for p in paths):
        return None
    return layers


def _idmapped_overlay(layers: dict, userns: int, root_uid: int, root_gid: int) -> int:
    """A new detached overlay over id-mapped lower layers and the original upper layer."""
    clones = []
    fs = linux.fsopen("overlay")
    try:
        for lower in layers["lowerdir"]:
            clone = linux.open_tree(
                linux.AT_FDCWD, lower, linux.OPEN_TREE_CLONE | linux.OPEN_TREE_CLOEXEC
            )
            clones.append(clone)
            linux.mount_setattr_idmap(clone, userns, recursive=False)
            linux.fsconfig(fs, linux.FSCONFIG_SET_STRING, "lowerdir+", f"/proc/self/fd/{clone}")
        if "upperdir" in layers:
            upper = layers["upperdir"]
            if os.stat(upper).st_uid != root_uid:
                # The root of the upper layer is the container's "/": its root owns it.
                os.chown(upper, root_uid, root_gid if root_gid is not None else -1)
            linux.fsconfig(fs, linux.FSCONFIG_SET_STRING, "upperdir", upper)
            linux.fsconfig(fs, linux.FSCONFIG_SET_STRING, "workdir", layers["workdir"])
        for key, value in layers["options"]:
            if value is None:
                linux.fsconfig(fs, linux.FSCONFIG_SET_FLAG, key)
            else:
                linux.fsconfig(fs, linux.FSCONFIG_SET_STRING, key, value)
        linux.fsconfig(fs, linux.FSCONFIG_CMD_CREATE)
        return linux.fsmount(fs)
    finally:
        for clone in clones:
            os.close(clone)
        os.close(fs)


def read_only_volumes(spec, source_fds, profile) -> list[tuple[str, int]]:
    """(destination, a dup of its detached clone) of each read-only bind volume to id-map
    once the container's user namespace exists (idmap_volumes); the caller closes them.

    The kubelet makes a pod's volumes for the ids the pod asked for: a secret 0640 to
    the fsGroup (host gid 2000), the service-account token 0600 to the runAsUser (host
    uid 1000). In a user namespace the container's 2000 and 1000 are other host ids
    (102000, 101000), so without a mapping the files are closed to their own pod; through
    a mount id-mapped as the rootfs is, host id N shows as N inside, as under runc.
    Only read-only volumes, made read-only in the same call: through a writable one the
    container's root would store files as host root. And only when the container cannot
    change mount flags (no CAP_SYS_ADMIN in the profile), or it could make one writable.
    `source_fds`: open_bind_sources' clones, in spec.mounts' order.
    """
    if profile is None or not profile.user_namespace or "CAP_SYS_ADMIN" in profile.capabilities:
        return []
    from runtime.rootfs import parse_options

    volumes = []
    try:
        for mount, fd in zip(spec.mounts, source_fds, strict=True):
            if getattr(mount, "uid_mappings", None):
                continue  # config.json's own id-mapping for it: requested_idmap_mounts
            if fd is not None and parse_options(mount.options)[0] & linux.MS_RDONLY:
                volumes.append((mount.destination, os.dup(fd)))
    except BaseException:
        for _, fd in volumes:
            os.close(fd)
        raise
    return volumes


def idmap_volumes(pid: int, volumes: list[tuple[str, int]], log) -> None:
    """Id-map (and make read-only) each of read_only_volumes' clones through `pid`'s user
    namespace, before PID 1 attaches them; nothing when its root is host root."""
    if not volumes or not host_id_of_root(pid, "uid_map"):
        return
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for destination, fd in volumes:
            try:
                linux.mount_setattr_idmap(fd, userns, recursive=True, read_only=True)
            except OSError as exc:
                log(
                    "warning",
                    f"volume {destination}: no id-mapped mount ({exc.strerror}); its files "
                    "keep their host ids, which the container's users are not",
                )
    finally:
        os.close(userns)


def requested_idmap_mounts(spec, source_fds) -> list[tuple[object, int]]:
    """(mount, a dup of its detached clone) of each bind mount config.json asks to be
    id-mapped (its own uidMappings/gidMappings), for idmap_requested_mounts; the caller
    closes the fds.

    containerd 2.x asks it for a hostUsers: false pod's /etc/hosts, /etc/hostname and
    /etc/resolv.conf (files it made as host root), with the pod's mappings: through
    them the pod's root owns those files, as under runc. Written through such a mount,
    files keep the ids the mapping gives back: what the pod's root writes is host
    root's on disk, which is what the mapping means and why only the container's own
    mapping is accepted (idmap_requested_mounts).
    """
    mounts = []
    try:
        for mount, fd in zip(spec.mounts or (), source_fds, strict=False):
            if getattr(mount, "uid_mappings", None):
                if fd is None:
                    raise errors.InvalidArgument(
                        f"config.json: mount {mount.destination}: id mappings on a mount"
                        " that is not a bind mount"
                    )
                mounts.append((mount, os.dup(fd)))
    except BaseException:
        for _, fd in mounts:
            os.close(fd)
        raise
    return mounts


def idmap_requested_mounts(pid: int, mounts: list[tuple[object, int]]) -> None:
    """Id-map each of requested_idmap_mounts' clones through `pid`'s user namespace,
    before PID 1 attaches them. Only a mapping that is the container's own (what its
    user namespace maps, read back from the kernel) is honoured: another one would
    need a user namespace of its own, and an id-mapping asked for and not made would
    leave the mount's files with other owners than the pod expects. Either is refused."""
    if not mounts:
        return
    actual = {name: sorted(id_map(pid, name)) for name in ("uid_map", "gid_map")}
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for mount, fd in mounts:
            for name, stated in (("uid_map", mount.uid_mappings), ("gid_map", mount.gid_mappings)):
                wanted = sorted((m.container_id, m.host_id, m.size) for m in stated)
                if wanted != actual[name]:
                    raise errors.NotImplementedByZviz(
                        f"config.json: mount {mount.destination}: {name[:3]}Mappings {wanted}"
                        f" differ from the container's user namespace ({actual[name]}); zviz"
                        " id-maps a mount only through the container's own mapping"
                    )
            linux.mount_setattr_idmap(fd, userns, recursive="rbind" in mount.options)
    finally:
        os.close(userns)


def id_map(pid: int, name: str) -> list[tuple[int, int, int]]:
    """/proc/<pid>/{uid,gid}_map as (inside, outside, count) ranges."""
    with open(f"/proc/{pid}/{name}") as f:
        return [tuple(int(v) for v in line.split()) for line in f if line.strip()]


def host_id_of_root(pid: int, name: str) -> int | None:
    """The host id that id 0 of `pid`'s user namespace is (None: unmapped)."""
    return host_id(pid, name, 0)


def host_id(pid: int, name: str, inside_id: int) -> int | None:
    """The host id that `inside_id` of `pid`'s user namespace is (None: unmapped)."""
    return host_id_in(id_map(pid, name), inside_id)


def host_id_in(ranges, inside_id: int) -> int | None:
    """The host id `inside_id` is through RANGES of (inside, outside, count), as a
    /proc uid_map or config.json's mappings give them (None: unmapped)."""
    for inside, outside, count in ranges:
        if inside <= inside_id < inside + count:
            return outside + inside_id - inside
    return None


def check_joined_user_namespace(pid: int, profile, spec_linux=None) -> None:
    """A user namespace zviz joins instead of making one must map what config.json says
    it maps (SPEC_LINUX: the spec's linux section, when it gives mappings with the
    path), and obey the profile too."""
    if spec_linux is not None and spec_linux.uid_mappings:
        stated_maps = (("uid_map", spec_linux.uid_mappings), ("gid_map", spec_linux.gid_mappings))
        for name, stated in stated_maps:
            actual = sorted(id_map(pid, name))
            expected = sorted((m.container_id, m.host_id, m.size) for m in stated)
            if actual != expected:
                raise errors.InvalidArgument(
                    f"config.json: linux.{name[:3]}Mappings {expected} are not what the user"
                    f" namespace joined maps ({actual})"
                )
    if profile is None or not profile.user_namespace or profile.allow_host_root_mapping:
        return
    for name in ("uid_map", "gid_map"):
        for inside, outside, count in id_map(pid, name):
            if outside <= 0 < outside + count:
                raise errors.InvalidArgument(
                    f"config.json: linux.namespaces: the user namespace joined maps host"
                    f" {name[:3]} 0 ({inside} {outside} {count}); profile {profile.name} allows"
                    " only unprivileged host ids"
                )
