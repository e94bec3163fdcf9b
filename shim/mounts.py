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


def mount_all(mounts, target: str) -> None:
    """Mount containerd's rootfs mounts (in order) at `target`; on failure, undo and raise."""
    done = 0
    try:
        for m in mounts:
            if m.type not in _ALLOWED_TYPES:
                raise InvalidArgument(f"rootfs mount: type {m.type!r} is not supported")
            flags, propagation, data = parse_options(m.options)
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
        raise InvalidArgument(f"rootfs mount at {target}: {e}") from e
    except BaseException:
        unmount_all(target)
        raise


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
