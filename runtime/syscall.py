"""The syscall seam: the privileged calls of PID 1's filesystem and capability setup.

`Syscall` is the one interface the rootfs builder (runtime/rootfs.py), the capability
drop (runtime/security/capabilities.py) and `security.apply`'s no_new_privs make their
kernel calls through; `LINUX` is its real implementation, the default everywhere, and
calls runtime/linux.py's ctypes wrappers (and `os`) exactly as before. A test passes a
recording implementation instead (tests/recording_syscall.py): it records each call
and answers from a script, so the mount, pivot_root and capability sequences are
unit-tested without root, while integration/ proves them on the real kernel.

What goes through the seam: the calls that change the mount table, the process's
root, cwd or credentials, and the fd-producing calls whose flags carry a security
decision (openat2's RESOLVE_*, open_tree). Plain file work in the rootfs (mkdir, open
O_NOFOLLOW, lstat, readlink) stays on `os`: it runs unprivileged in a test's temp
directory as it does in the container. Outside the seam: the namespace calls of
runtime/spawn/, Landlock and seccomp (loaded by their own modules), and the
broker's ctypes (runtime/security/broker/: pidfd_getfd, seccomp notify ioctls).
"""

import os

from runtime import linux


class Syscall:
    """The real kernel. Every method raises OSError with errno and the call's name."""

    # The mount table.

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: int = 0,
        data: str | None = None,
    ) -> None:
        linux.mount(source, target, fstype, flags, data)

    def umount2(self, target: str, flags: int = 0) -> None:
        linux.umount2(target, flags)

    def open_tree(self, dirfd: int, path: str, flags: int) -> int:
        return linux.open_tree(dirfd, path, flags)

    def move_mount(
        self, from_dirfd: int, from_path: str, to_dirfd: int, to_path: str, flags: int
    ) -> None:
        linux.move_mount(from_dirfd, from_path, to_dirfd, to_path, flags)

    def mount_setattr(
        self,
        fd: int,
        *,
        attr_set: int = 0,
        propagation: int = 0,
        userns_fd: int = 0,
        recursive: bool = False,
        detail: str = "",
    ) -> None:
        linux.mount_setattr(
            fd,
            attr_set=attr_set,
            propagation=propagation,
            userns_fd=userns_fd,
            recursive=recursive,
            detail=detail,
        )

    def statvfs_flags(self, path: str) -> int:
        """The ST_* flags (f_flag) of the mount `path` is on."""
        return os.statvfs(path).f_flag

    # The process's root and cwd.

    def pivot_root(self, new_root: str, put_old: str) -> None:
        linux.pivot_root(new_root, put_old)

    def chroot(self, path: str) -> None:
        os.chroot(path)

    def chdir(self, path: str) -> None:
        os.chdir(path)

    def fchdir(self, fd: int) -> None:
        os.fchdir(fd)

    # Files whose creation or resolution is the security decision.

    def openat2(self, dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
        return linux.openat2(dirfd, path, flags, resolve, mode)

    def mknod(self, path: str, mode: int, device: int, dir_fd: int) -> None:
        os.mknod(path, mode, device, dir_fd=dir_fd)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, path)

    # Credentials.

    def capget(self) -> tuple[int, int, int]:
        """(effective, permitted, inheritable) of the calling thread."""
        return linux.capget()

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        linux.capset(effective, permitted, inheritable)

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        return linux.prctl(option, arg2, arg3, arg4, arg5)


LINUX = Syscall()
