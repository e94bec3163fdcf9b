"""The rootfs mounts containerd sends in Create, mounted at `<bundle>/rootfs`.

Options are read as containerd's `mount.Mount` does: known words become mount flags,
the rest is the filesystem's data string (overlay's lowerdir/upperdir/workdir).
"""

import errno
import os

from runtime import linux
from runtime.errors import InvalidArgument

# option -> (flags to clear, flags to set)
_FLAGS = {
    "async": (linux.MS_SYNCHRONOUS, 0),
    "atime": (linux.MS_NOATIME, 0),
    "bind": (0, linux.MS_BIND),
    "defaults": (0, 0),
    "dev": (linux.MS_NODEV, 0),
    "diratime": (linux.MS_NODIRATIME, 0),
    "dirsync": (0, linux.MS_DIRSYNC),
    "exec": (linux.MS_NOEXEC, 0),
    "mand": (0, linux.MS_MANDLOCK),
    "noatime": (0, linux.MS_NOATIME),
    "nodev": (0, linux.MS_NODEV),
    "nodiratime": (0, linux.MS_NODIRATIME),
    "noexec": (0, linux.MS_NOEXEC),
    "nomand": (linux.MS_MANDLOCK, 0),
    "norelatime": (linux.MS_RELATIME, 0),
    "nostrictatime": (linux.MS_STRICTATIME, 0),
    "nosuid": (0, linux.MS_NOSUID),
    "rbind": (0, linux.MS_BIND | linux.MS_REC),
    "relatime": (0, linux.MS_RELATIME),
    "remount": (0, linux.MS_REMOUNT),
    "ro": (0, linux.MS_RDONLY),
    "rw": (linux.MS_RDONLY, 0),
    "strictatime": (0, linux.MS_STRICTATIME),
    "suid": (linux.MS_NOSUID, 0),
    "sync": (0, linux.MS_SYNCHRONOUS),
}
_PROPAGATION = {
    "private": linux.MS_PRIVATE,
    "rprivate": linux.MS_PRIVATE | linux.MS_REC,
    "shared": linux.MS_SHARED,
    "rshared": linux.MS_SHARED | linux.MS_REC,
    "slave": linux.MS_SLAVE,
    "rslave": linux.MS_SLAVE | linux.MS_REC,
    "unbindable": linux.MS_UNBINDABLE,
    "runbindable": linux.MS_UNBINDABLE | linux.MS_REC,
}
_ALLOWED_TYPES = {"overlay", "bind", "rbind", "tmpfs", "ext4", "xfs", "btrfs"}


def parse_options(options) -> tuple[int, int, str]:
    """(flags, propagation flags, data) of a containerd mount's options."""
    flags = 0
    propagation = 0
    data = []
    for option in options:
        if option in _FLAGS:
            clear, set_ = _FLAGS[option]
            flags = (flags & ~clear) | set_
        elif option in _PROPAGATION:
            propagation |= _PROPAGATION[option]
        else:
            data.append(option)
    return flags, propagation, ",".join(data)


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


def is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


def rootfs_path(bundle: str) -> str:
    return os.path.join(bundle, "rootfs")
