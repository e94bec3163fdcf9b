"""The recording implementation of the syscall seam (runtime/syscall.py), for root-free tests.

`RecordingSyscall` has `Syscall`'s methods with the same signatures (a test checks
they never drift apart). Each call is appended to `calls` as a `Call`: its arguments by
parameter name, and `where`: for each path or fd argument, the path it names at that
moment, relative to the container's root ("/proc" for `root`/proc; "host:/dev/null"
outside it), read from the real fd (/proc/self/fd) so a test sees where a mount would
land, not just an fd number.

What it does instead of the kernel:
- The mount table, the root and the cwd: recorded only (mount, umount2, move_mount,
  mount_setattr, pivot_root, chroot, chdir, fchdir, mknod, symlink). The test process's
  own cwd and root never change.
- fd-producing calls return real fds, so the caller's os.fstat/os.close work on them:
  openat2 is the real openat2 (unprivileged: RESOLVE_BENEATH and RESOLVE_NO_SYMLINKS
  are checked by the kernel on the test's temp directory), open_tree an O_PATH fd on
  the path (a stand-in for the detached clone). Both are moved to numbers from 512 up
  that are never handed out twice, so `opened_by(fd)` names the call that made an fd
  and `open_fds()` what the caller never closed.
- Capabilities: a model of one thread's five sets and no_new_privs, enforcing the
  kernel's rules (capabilities(7), prctl(2)) that make the drop order matter:
  PR_CAPBSET_DROP needs CAP_SETPCAP effective; capset may not add to permitted, nor
  effective beyond permitted, nor inheritable beyond the old inheritable and permitted
  sets (beyond the bounding set even with CAP_SETPCAP); an ambient raise needs the
  capability both permitted and inheritable; capset drops ambient capabilities that
  are no longer both.
- statvfs_flags: `st_flags[path]` (container path), else 0.

`fail(name, errno, when)` makes every later call of `name` that `when(call)` accepts raise
OSError(errno) shaped as runtime/linux.py's ("mount(/proc/self/fd/7): No such device"),
after it is recorded. `result(name, value, when)` scripts a return value.
"""

import errno
import fcntl
import os
from dataclasses import dataclass, field

from runtime import linux

CAP_SETPCAP = 8
_FIRST_FD = 512
# Parameters naming a path or an fd, resolved into Call.where.
_PATH_PARAMETERS = ("source", "target", "path", "new_root", "to_path")
_FD_PARAMETERS = ("fd", "from_dirfd", "dir_fd")


@dataclass
class Call:
    name: str
    args: dict
    where: dict = field(default_factory=dict)
    result: object = None

    def __repr__(self) -> str:
        shown = {k: self.where.get(k, v) for k, v in self.args.items()}
        return f"{self.name}({shown})"


class RecordingSyscall:
    def __init__(
        self,
        root: str | None = None,
        *,
        effective: int = 0,
        permitted: int = 0,
        inheritable: int = 0,
        bounding: int | None = None,
        cap_last_cap: int = 40,
    ):
        # The directory standing for the container's root (the builder's cwd).
        self.root = os.path.realpath(root) if root else None
        self.calls: list[Call] = []
        self.st_flags: dict[str, int] = {}
        self._failures: list[tuple[str, int, object]] = []
        self._results: list[tuple[str, object, object]] = []
        self._next_fd = _FIRST_FD
        self._opened: dict[int, Call] = {}
        self.pivoted = False
        self.cap_last_cap = cap_last_cap
        everything = (1 << (cap_last_cap + 1)) - 1
        self.effective = effective
        self.permitted = permitted
        self.inheritable = inheritable
        self.bounding = everything if bounding is None else bounding
        self.ambient = 0
        self.no_new_privs = False
        self.keepcaps = False

    # --- scripting and reading the record ---

    def fail(self, name: str, errno_value: int, when=None) -> None:
        self._failures.append((name, errno_value, when))

    def result(self, name: str, value, when=None) -> None:
        self._results.append((name, value, when))

    def named(self, *names: str) -> list[Call]:
        return [c for c in self.calls if c.name in names]

    def opened_by(self, fd: int) -> Call | None:
        """The openat2 or open_tree call that returned `fd` (None: not one of ours)."""
        return self._opened.get(fd)

    def open_fds(self) -> list[int]:
        """The fds this recorder handed out that are still open."""
        still = []
        for fd in self._opened:
            try:
                os.fstat(fd)
            except OSError:
                continue
            still.append(fd)
        return still

    def fd_of(self, path_argument: str) -> int | None:
        """N of a "/proc/self/fd/N[/...]" argument."""
        if not isinstance(path_argument, str) or not path_argument.startswith("/proc/self/fd/"):
            return None
        return int(path_argument.split("/")[4])

    # --- the seam's methods ---

    def mount(self, source, target, fstype, flags=0, data=None):
        self._record("mount", detail=target, source=source, target=target, fstype=fstype,
                     flags=flags, data=data)  # fmt: skip

    def umount2(self, target, flags=0):
        self._record("umount2", detail=target, target=target, flags=flags)

    def open_tree(self, dirfd, path, flags):
        call = self._record("open_tree", detail=path, dirfd=dirfd, path=path, flags=flags)
        fd = os.open(
            path,
            os.O_PATH | os.O_CLOEXEC,
            dir_fd=None if dirfd == linux.AT_FDCWD else dirfd,
        )
        return self._hand_out(fd, call)

    def move_mount(self, from_dirfd, from_path, to_dirfd, to_path, flags):
        self._record("move_mount", detail=to_path, from_dirfd=from_dirfd, from_path=from_path,
                     to_dirfd=to_dirfd, to_path=to_path, flags=flags)  # fmt: skip

    def mount_setattr(
        self, fd, *, attr_set=0, propagation=0, userns_fd=0, recursive=False, detail=""
    ):
        self._record("mount_setattr", detail=detail or str(fd), fd=fd, attr_set=attr_set,
                     propagation=propagation, userns_fd=userns_fd, recursive=recursive)  # fmt: skip

    def statvfs_flags(self, path):
        call = self._record("statvfs_flags", detail=path, path=path)
        if call.result is not None:
            return call.result
        return self.st_flags.get(call.where.get("path", path), 0)

    def pivot_root(self, new_root, put_old):
        self._record("pivot_root", detail=new_root, new_root=new_root, put_old=put_old)
        self.pivoted = True

    def chroot(self, path):
        self._record("chroot", detail=path, path=path)

    def chdir(self, path):
        self._record("chdir", detail=path, path=path)

    def fchdir(self, fd):
        self._record("fchdir", detail=str(fd), fd=fd)

    def openat2(self, dirfd, path, flags, resolve, mode=0):
        call = self._record("openat2", detail=path, dirfd=dirfd, path=path, flags=flags,
                            resolve=resolve, mode=mode)  # fmt: skip
        return self._hand_out(linux.openat2(dirfd, path, flags, resolve, mode), call)

    def mknod(self, path, mode, device, dir_fd):
        self._record("mknod", detail=path, path=path, mode=mode, device=device, dir_fd=dir_fd)

    def symlink(self, target, path):
        # `target` is the link's text, not a path this process names: kept as given.
        self._record("symlink", detail=path, link_text=target, path=path)

    def capget(self):
        self._record("capget")
        return self.effective, self.permitted, self.inheritable

    def capset(self, effective, permitted, inheritable):
        self._record("capset", effective=effective, permitted=permitted, inheritable=inheritable)
        allowed_inheritable = self.inheritable | self.permitted
        if self.effective & (1 << CAP_SETPCAP):
            allowed_inheritable = self.inheritable | self.bounding
        if (
            permitted & ~self.permitted
            or effective & ~permitted
            or inheritable & ~allowed_inheritable
            or inheritable & ~(self.inheritable | self.bounding)
        ):
            raise _error("capset", errno.EPERM)
        self.effective, self.permitted, self.inheritable = effective, permitted, inheritable
        self.ambient &= permitted & inheritable

    def prctl(self, option, arg2=0, arg3=0, arg4=0, arg5=0):
        call = self._record("prctl", detail=str(option), option=option, arg2=arg2, arg3=arg3,
                            arg4=arg4, arg5=arg5)  # fmt: skip
        if call.result is not None:
            return call.result
        if option in (linux.PR_CAPBSET_READ, linux.PR_CAPBSET_DROP):
            if not 0 <= arg2 <= self.cap_last_cap:
                raise _error("prctl", errno.EINVAL, str(option))
            if option == linux.PR_CAPBSET_READ:
                return 1 if self.bounding & (1 << arg2) else 0
            if not self.effective & (1 << CAP_SETPCAP):
                raise _error("prctl", errno.EPERM, str(option))
            self.bounding &= ~(1 << arg2)
        elif option == linux.PR_CAP_AMBIENT:
            if arg2 == linux.PR_CAP_AMBIENT_CLEAR_ALL:
                self.ambient = 0
            elif arg2 == linux.PR_CAP_AMBIENT_RAISE:
                if not (self.permitted & self.inheritable) & (1 << arg3):
                    raise _error("prctl", errno.EPERM, str(option))
                self.ambient |= 1 << arg3
            elif arg2 == linux.PR_CAP_AMBIENT_LOWER:
                self.ambient &= ~(1 << arg3)
        elif option == linux.PR_SET_NO_NEW_PRIVS:
            self.no_new_privs = bool(arg2) or self.no_new_privs  # it cannot be unset
        elif option == linux.PR_SET_KEEPCAPS:
            self.keepcaps = bool(arg2)
        return 0

    # --- internals ---

    def _record(self, name: str, detail: str | None = None, **args) -> Call:
        call = Call(name, args)
        for key, value in args.items():
            place = self._where(key, value)
            if place is not None:
                call.where[key] = place
        self.calls.append(call)
        for failing, errno_value, when in self._failures:
            if failing == name and (when is None or when(call)):
                raise _error(name, errno_value, detail)
        for scripted, value, when in self._results:
            if scripted == name and (when is None or when(call)):
                call.result = value
        return call

    def _hand_out(self, fd: int, call: Call) -> int:
        """`fd` moved to a number never handed out before, remembered as made by `call`."""
        try:
            unique = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, self._next_fd)
        finally:
            os.close(fd)
        self._next_fd = unique + 1
        self._opened[unique] = call
        call.result = unique
        call.where["result"] = self._container_path(os.readlink(f"/proc/self/fd/{unique}"))
        return unique

    def _where(self, key: str, value) -> str | None:
        if key in _FD_PARAMETERS and isinstance(value, int) and value >= 0:
            return self._resolve_fd(value, "")
        if key == "to_path" and value == "":
            # move_mount onto AT_FDCWD with MOVE_MOUNT_T_EMPTY_PATH: the cwd itself.
            return self._container_path(os.getcwd())
        if key not in _PATH_PARAMETERS or not isinstance(value, str) or not value:
            return None
        fd = self.fd_of(value)
        if fd is not None:
            rest = value.split("/", 5)[5] if value.count("/") >= 5 else ""
            return self._resolve_fd(fd, rest)
        if key == "source" and not value.startswith("/"):
            return None  # a filesystem's source name ("proc", "tmpfs"), not a path
        if value.startswith("/"):
            # After pivot_root "/" is the container's root; before it, the host's.
            return value if self.pivoted else "host:" + value
        return self._container_path(os.path.normpath(os.path.join(os.getcwd(), value)))

    def _resolve_fd(self, fd: int, rest: str) -> str:
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return f"<closed fd {fd}>"
        return self._container_path(os.path.join(real, rest) if rest else real)

    def _container_path(self, real: str) -> str:
        if self.root is not None:
            if real == self.root:
                return "/"
            if real.startswith(self.root + "/"):
                return real[len(self.root) :]
        return "host:" + real


def _error(name: str, errno_value: int, detail: str | None = None) -> OSError:
    where = f"{name}({detail})" if detail else name
    return OSError(errno_value, f"{where}: {os.strerror(errno_value)}")
