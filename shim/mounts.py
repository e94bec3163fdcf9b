"""The rootfs mounts containerd sends in Create, mounted at `<bundle>/rootfs`.

Options are read as containerd's `mount.Mount` does, by the same table config.json's
mounts use: known words become mount flags, the rest is the filesystem's data string
(overlay's lowerdir/upperdir/workdir).
"""

import errno
import os

from runtime import linux
from runtime.errors import InvalidArgument
from runtime.rootfs import parse_options  # one reading of mount options, as in config.json

_ALLOWED_TYPES = {"overlay", "bind", "rbind", "tmpfs", "ext4", "xfs", "btrfs"}


def mount_all(mounts, target: str, spec_linux=None) -> None:
    """Mount containerd's rootfs mounts (in order) at `target`; on failure, undo and raise.
    SPEC_LINUX: a function returning config.json's linux section (its id mappings, which an
    overlay's uidmap= and gidmap= options must repeat), called only when a mount has them:
    the core decodes config.json anyway, the shim only for a hostUsers: false pod."""
    done = 0
    m = None
    try:
        for m in mounts:
            if m.type not in _ALLOWED_TYPES:
                raise InvalidArgument(f"rootfs mount: type {m.type!r} is not supported")
            flags, propagation, data = parse_options(_without_id_mapping(m, spec_linux or dict))
            if m.type in ("bind", "rbind"):
                flags |= linux.MS_BIND | (linux.MS_REC if m.type == "rbind" else 0)
            fstype = None if flags & linux.MS_BIND else m.type
            linux.mount(
                m.source,
                target,
                fstype,
                flags & ~linux.MS_RDONLY if flags & linux.MS_BIND else flags,
                data or None,
            )
            done += 1
            if flags & linux.MS_BIND and flags & linux.MS_RDONLY:
                # A bind mount ignores MS_RDONLY until it is remounted with it.
                linux.mount(None, target, None, flags | linux.MS_REMOUNT, None)
            if propagation:
                linux.mount(None, target, None, propagation, None)
    except OSError as e:
        unmount_all(target)
        what = f"{m.type} {','.join(m.options)}" if m is not None else ""
        raise InvalidArgument(f"rootfs mount at {target} ({what}): {e}") from e
    except BaseException:
        unmount_all(target)
        raise


def _without_id_mapping(mount, spec_linux) -> list[str]:
    """MOUNT's options without containerd 2.x's uidmap=/gidmap=, which ask for the overlay's
    lower layers id-mapped through the pod's user namespace (a hostUsers: false pod).

    The kernel knows no such option, and zviz does that mapping anyway: the runtime
    builds the container's overlay again over lower layers id-mapped through the
    container's own user namespace (runtime/idmap.py), which config.json's mappings make
    or the runtime checks the joined one against. So the options must say exactly what
    those mappings say; any other mapping is refused rather than silently replaced.
    """
    kept = []
    stated_linux = None
    for option in mount.options:
        key, _, value = option.partition("=")
        if key not in ("uidmap", "gidmap"):
            kept.append(option)
            continue
        if stated_linux is None:
            stated_linux = spec_linux()
        spec_key = "uidMappings" if key == "uidmap" else "gidMappings"
        stated = sorted(
            f"{m.get('containerID')}:{m.get('hostID')}:{m.get('size')}"
            for m in stated_linux.get(spec_key) or ()
        )
        if mount.type != "overlay" or sorted(value.split(",")) != stated:
            raise InvalidArgument(
                f"rootfs mount: {mount.type} option {key}={value}: zviz id-maps an overlay's"
                f" layers through config.json's linux.{spec_key} ({','.join(stated) or 'none'})"
                " and no other mapping"
            )
    return kept


def unmount_all(target: str) -> None:
    """Unmount everything stacked at `target` (lazily: a straggler must not block Delete)."""
    for _ in range(64):
        try:
            linux.umount2(target, linux.MNT_DETACH)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise


def rootfs_path(bundle: str) -> str:
    return os.path.join(bundle, "rootfs")
