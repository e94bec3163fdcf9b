"""PID 1's filesystem: rootfs, OCI mounts, auto-mounts, /dev, masked and read-only paths.

Runs inside the container's fresh mount namespace (PID 1, before execve). Every mount
lives in that namespace, so nothing here can leak onto the host: the namespace and
its mounts vanish with the container's last process.

Order (as runc): make "/" rslave (so nothing propagates back to the host), make the
rootfs a private mount of itself, mount the OCI mounts merged with the auto-mounts
(bind sources are clones made slaves: see VOLUME_PROPAGATION), populate /dev,
pivot_root (MS_MOVE + chroot only with --no-pivot: a refused pivot_root is an error),
then `finish()`: masked paths, read-only paths, read-only root, propagation.

Mount destinations are resolved inside the rootfs (`secure_join`): a symlink in an
untrusted image never sends a mount onto the host.
"""

import errno
import os
import stat

from runtime import errors, linux
from runtime.spec import Mount
from runtime.syscall import LINUX, Syscall

# Option name -> (flags to set, flags to clear).
_FLAG_OPTIONS = {
    "defaults": (0, 0),  # fstab's word for "no flags": never filesystem data
    "ro": (linux.MS_RDONLY, 0),
    "rw": (0, linux.MS_RDONLY),
    "nosuid": (linux.MS_NOSUID, 0),
    "suid": (0, linux.MS_NOSUID),
    "nodev": (linux.MS_NODEV, 0),
    "dev": (0, linux.MS_NODEV),
    "noexec": (linux.MS_NOEXEC, 0),
    "exec": (0, linux.MS_NOEXEC),
    "sync": (linux.MS_SYNCHRONOUS, 0),
    "async": (0, linux.MS_SYNCHRONOUS),
    "dirsync": (linux.MS_DIRSYNC, 0),
    "remount": (linux.MS_REMOUNT, 0),
    "mand": (linux.MS_MANDLOCK, 0),
    "nomand": (0, linux.MS_MANDLOCK),
    "atime": (0, linux.MS_NOATIME),
    "noatime": (linux.MS_NOATIME, 0),
    "diratime": (0, linux.MS_NODIRATIME),
    "nodiratime": (linux.MS_NODIRATIME, 0),
    "relatime": (linux.MS_RELATIME, 0),
    "norelatime": (0, linux.MS_RELATIME),
    "strictatime": (linux.MS_STRICTATIME, 0),
    "nostrictatime": (0, linux.MS_STRICTATIME),
    "lazytime": (linux.MS_LAZYTIME, 0),
    "nolazytime": (0, linux.MS_LAZYTIME),
    "nosymfollow": (linux.MS_NOSYMFOLLOW, 0),
    "symfollow": (0, linux.MS_NOSYMFOLLOW),
    "bind": (linux.MS_BIND, 0),
    "rbind": (linux.MS_BIND | linux.MS_REC, 0),
}

PROPAGATION = {
    "private": linux.MS_PRIVATE,
    "rprivate": linux.MS_PRIVATE | linux.MS_REC,
    "shared": linux.MS_SHARED,
    "rshared": linux.MS_SHARED | linux.MS_REC,
    "slave": linux.MS_SLAVE,
    "rslave": linux.MS_SLAVE | linux.MS_REC,
    "unbindable": linux.MS_UNBINDABLE,
    "runbindable": linux.MS_UNBINDABLE | linux.MS_REC,
}

# Flags the kernel locks on a mount made in a less privileged user namespace: a
# read-only remount must repeat them or it fails with EPERM.
_LOCKABLE = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_RDONLY
_STATVFS_TO_MS = (
    (os.ST_RDONLY, linux.MS_RDONLY),
    (os.ST_NOSUID, linux.MS_NOSUID),
    (os.ST_NODEV, linux.MS_NODEV),
    (os.ST_NOEXEC, linux.MS_NOEXEC),
    (getattr(os, "ST_NOATIME", 1024), linux.MS_NOATIME),
    (getattr(os, "ST_NODIRATIME", 2048), linux.MS_NODIRATIME),
    (getattr(os, "ST_RELATIME", 4096), linux.MS_RELATIME),
)

# The devices every container gets, bind-mounted from the host: binding (not mknod)
# works inside a user namespace, where mknod is refused.
DEFAULT_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

DEV_SYMLINKS = (
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
)


# The options that make any mount a bind, read off the one option table above.
BIND_OPTIONS = frozenset(
    name for name, (set_flags, _) in _FLAG_OPTIONS.items() if set_flags & linux.MS_BIND
)


def is_bind(m) -> bool:
    """Whether a mount (a spec.Mount) is a bind: type "bind", or a bind
    option whatever its type. The one decision: spec.Mount.is_bind asks it too."""
    return m.type == "bind" or not BIND_OPTIONS.isdisjoint(m.options or ())


# What the container's mounts receive from the host, and never send back. A volume is
# a slave of its source: host mounts beneath the source still show inside (as under
# runc's default rslave root, which Kubernetes' HostToContainer relies on), nothing
# the container mounts in it reaches the host. The rootfs is a private mount of its
# own: pivot_root refuses a shared one, and nothing crosses either way.
VOLUME_PROPAGATION = linux.MS_SLAVE
ROOTFS_PROPAGATION = linux.MS_PRIVATE


def clone_mount(path: str, *, recursive: bool, propagation: int, syscall: Syscall = LINUX) -> int:
    """A detached clone (open_tree) of the mount at `path`, with `propagation` set.

    open_tree copies the source's propagation: a clone of a mount in the host's
    shared peer group is one more peer, and whatever is later mounted beneath the
    clone would show up on the host. The propagation is set before anyone can
    mount anything on the clone.
    """
    flags = (
        linux.OPEN_TREE_CLONE | linux.OPEN_TREE_CLOEXEC | (linux.AT_RECURSIVE if recursive else 0)
    )
    fd = syscall.open_tree(linux.AT_FDCWD, path, flags)
    try:
        syscall.mount_setattr(fd, propagation=propagation, recursive=recursive, detail=path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_bind_sources(mounts, bundle: str, syscall: Syscall = LINUX) -> list[int | None]:
    """A detached clone (open_tree) of each bind mount's source; None for other mounts.

    Called by the zviz parent as host root, before any namespace: in a user namespace
    the container's root (an unprivileged host uid) often cannot walk to a source
    (kubelet's volumes, containerd's per-sandbox files under 0700 directories).
    PID 1 attaches each clone by fd. The caller closes the fds.
    """
    fds: list[int | None] = []
    try:
        for m in mounts or ():
            mount_flags = parse_options(m.options)[0]
            if not is_bind(m):
                fds.append(None)
                continue
            source = m.source or ""
            if not os.path.isabs(source):
                source = os.path.join(bundle, source)
            try:
                fds.append(
                    clone_mount(
                        source,
                        recursive=bool(mount_flags & linux.MS_REC),
                        propagation=VOLUME_PROPAGATION,
                        syscall=syscall,
                    )
                )
            except FileNotFoundError:
                raise errors.InvalidArgument(
                    f"config.json: mounts: {m.destination}: bind source {source} does not exist"
                ) from None
    except BaseException:
        for fd in fds:
            if fd is not None:
                os.close(fd)
        raise
    return fds


# The auto-mounts: what a container gets at these paths unless config.json mounts
# something there itself.
AUTO_MOUNTS = (
    Mount("/proc", "proc", "proc", ["nosuid", "nodev", "noexec"]),
    Mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
    Mount(
        "/dev/pts",
        "devpts",
        "devpts",
        ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
    ),
    Mount("/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
    Mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
)


def parse_options(options) -> tuple[int, int, str]:
    """config.json mount options -> (mount flags, propagation flags, data string)."""
    flags, propagation, data = 0, 0, []
    for option in options or ():
        if option in _FLAG_OPTIONS:
            set_flags, clear_flags = _FLAG_OPTIONS[option]
            flags = (flags | set_flags) & ~clear_flags
        elif option in PROPAGATION:
            propagation |= PROPAGATION[option]
        elif option in ("idmap", "ridmap"):
            raise errors.NotImplementedByZviz(f"mount option {option!r} is not supported")
        else:
            data.append(option)
    return flags, propagation, ",".join(data)


def merge_mounts(user_mounts) -> list[Mount]:
    """config.json's mounts with the auto-mounts they don't override, parents first.

    A user mount at an auto-mount's destination replaces it. Each remaining
    auto-mount goes after the last user mount that is its ancestor and after the
    auto-mount before it, so /dev/pts still lands on top of a user-provided /dev.
    """
    merged = [
        Mount(m.destination, m.type, m.source, list(m.options or ()), source_fd=m.source_fd)
        for m in user_mounts
    ]
    taken = {_clean(m.destination) for m in merged}
    previous_auto = None
    for auto in AUTO_MOUNTS:
        if auto.destination in taken:
            continue
        position = 0
        for index, m in enumerate(merged):
            if m is previous_auto or _is_ancestor(_clean(m.destination), auto.destination):
                position = index + 1
        merged.insert(position, auto)
        previous_auto = auto
    return merged


def _clean(path: str) -> str:
    return "/" + os.path.normpath(path).lstrip("/")


def _is_ancestor(parent: str, child: str) -> bool:
    return parent == "/" or child.startswith(parent.rstrip("/") + "/")


def secure_join(root: str, unsafe: str) -> str:
    """`unsafe` resolved inside `root`: symlinks and `..` can never leave it.

    Resolves each existing component by hand (absolute links restart at `root`);
    components that don't exist yet are kept as they are, and the walk goes on
    after them: "missing/../link" climbs back and must still resolve `link`.
    """
    parts = [p for p in unsafe.split("/") if p]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 255:
                raise errors.InvalidArgument(f"{unsafe}: too many symlinks inside the rootfs")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _mount_flags_of(path: str, syscall: Syscall) -> int:
    """The MS_* flags `path`'s mount has now (to keep locked flags on remount)."""
    st_flags = syscall.statvfs_flags(path)
    flags = 0
    for st_flag, ms_flag in _STATVFS_TO_MS:
        if st_flags & st_flag:
            flags |= ms_flag
    return flags


def remount_bind(path: str, flags: int, syscall: Syscall = LINUX) -> None:
    """Change a bind mount's flags, keeping the ones the kernel locked."""
    current = _mount_flags_of(path, syscall) & _LOCKABLE
    syscall.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | current | flags)


def pin(path: str, destination: str, field: str = "mounts", syscall: Syscall = LINUX) -> int:
    """An O_PATH fd on `path`, opened with no symlink anywhere on the way (`path` is
    relative to the cwd, the rootfs, and came from `secure_join`, so it has none).

    `secure_join` resolves a destination, then the mount (or mknod) happens: a shared
    volume changed by another container in between (a directory swapped for a
    symlink) would otherwise move it onto the host, whose root PID 1 still has. The
    kernel then acts on exactly the directory that was checked, or zviz refuses.
    """
    try:
        return syscall.openat2(
            linux.AT_FDCWD,
            path,
            os.O_PATH | os.O_CLOEXEC,
            linux.RESOLVE_BENEATH | linux.RESOLVE_NO_SYMLINKS,
        )
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOENT, errno.ENOTDIR):
            raise errors.InvalidArgument(
                f"config.json: {field}: {destination}: the destination changed while it was"
                " being mounted (a symlink appeared inside the rootfs): refused"
            ) from None
        raise


def at_pinned(path: str, destination: str, action, syscall: Syscall = LINUX):
    """action("/proc/self/fd/N") with N a `pin` on `path`."""
    fd = pin(path, destination, syscall=syscall)
    try:
        return action(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _make_mountpoint(
    path: str, destination: str, as_file: bool = False, field: str = "mounts"
) -> None:
    """Create `path` (relative to the cwd, the rootfs) as a directory, or as a file
    (as_file: a bind of a non-directory).

    One component at a time, each opened O_NOFOLLOW beneath the last: a directory
    swapped for a symlink meanwhile (a shared volume) is refused, never followed to
    create directories or files on the host. An existing file of any kind (a fifo
    in the image) is left as it is: the mount covers it, nothing opens it.
    """
    parts = [p for p in os.path.normpath(path).split("/") if p not in ("", ".")]
    directories = parts[:-1] if as_file else parts
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in directories:
            try:
                os.mkdir(name, 0o777, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                inner = os.open(
                    name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise errors.InvalidArgument(
                        f"config.json: {field}: {destination}: {name} is not a directory inside"
                        " the rootfs (a file, or a symlink that appeared while mounting): refused"
                    ) from None
                raise
            os.close(fd)
            fd = inner
        if as_file and parts:
            try:
                os.close(
                    os.open(
                        parts[-1],
                        os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o644,
                        dir_fd=fd,
                    )
                )
            except FileExistsError:
                pass
    finally:
        os.close(fd)


class RootfsBuilder:
    """Builds the filesystem of one container (call build() then finish() after pivot).

    Every kernel call that changes the mount table, the root or the cwd goes through
    `syscall` (runtime/syscall.py): the real kernel by default, a recording one in the
    root-free tests that pin this sequence (tests/test_rootfs_sequence.py).
    """

    def __init__(
        self,
        spec,
        *,
        bundle: str,
        cgroup_paths: dict,
        no_pivot: bool,
        in_userns: bool,
        new_netns: bool,
        log,
        rootfs_mount_fd: int | None = None,
        bind_source_fds: list[int | None] | None = None,
        syscall: Syscall = LINUX,
    ):
        self.spec = spec
        # Every path below is relative to the cwd, which is the rootfs (see build()).
        self.rootfs = "."
        self.bundle = bundle
        self.cgroup_paths = cgroup_paths or {}
        self.no_pivot = no_pivot
        self.in_userns = in_userns
        self.new_netns = new_netns
        self.log = log
        self.syscall = syscall
        self.dev_is_bind = False
        # A detached, id-mapped clone of the rootfs made by the parent (or None).
        self.rootfs_mount_fd = rootfs_mount_fd
        # Per spec.mounts entry: its bind source's clone made by the parent (or None).
        self.bind_source_fds = bind_source_fds or []

    def build(self, before_pivot=None) -> None:
        """Everything up to and including pivot_root; the cwd must be the rootfs.

        before_pivot(): called with every mount in place, just before pivot_root
        (where the OCI createRuntime and createContainer hooks run).

        The namespace child chdir'd into the rootfs while it was still host root, so
        PID 1 never walks the rootfs's path from "/": in a user namespace the
        container's root often may not (a bundle under a 0700 directory).

        The builder owns the fds it was given (rootfs_mount_fd, bind_source_fds):
        each is closed once used, and on a failure every one not yet used is closed
        too, so the caller is left with mounts only in the container's own mount
        namespace (which vanishes with it) and no fd to account for.
        """
        fds = self.bind_source_fds or [None] * len(self.spec.mounts or ())
        user_mounts = [
            Mount(m.destination, m.type, m.source, list(m.options or ()), source_fd=fd)
            for m, fd in zip(self.spec.mounts or (), fds, strict=True)
        ]
        merged = merge_mounts(user_mounts)
        try:
            propagation = PROPAGATION.get(self.spec.linux.rootfs_propagation or "", 0)
            # Private (not slave) when asked, otherwise slave: host mount events still
            # reach the container but nothing the container mounts reaches the host.
            base = propagation if propagation & linux.MS_PRIVATE else linux.MS_SLAVE | linux.MS_REC
            self.syscall.mount(None, "/", None, base | linux.MS_REC)
            self.enter_own_rootfs_mount()
            for m in merged:
                self.mount_one(m)
        except BaseException:
            for m in merged:
                if m.source_fd is not None:
                    os.close(m.source_fd)
                    m.source_fd = None
            if self.rootfs_mount_fd is not None:
                os.close(self.rootfs_mount_fd)
                self.rootfs_mount_fd = None
            raise
        if not self.dev_is_bind:
            self.populate_dev()
        if before_pivot is not None:
            before_pivot()
        self.pivot()

    def enter_own_rootfs_mount(self) -> None:
        """Make the cwd the root of a rootfs mount that belongs to this namespace.

        pivot_root refuses the copied (locked) mount a new user namespace inherits,
        so the rootfs gets a fresh mount: a detached clone of the cwd (open_tree),
        or the id-mapped clone the parent made, attached over the cwd and entered
        by fd, never by a path walk the container's root may not be allowed.
        """
        fd = self.rootfs_mount_fd
        try:
            if fd is None:
                fd = clone_mount(
                    ".", recursive=True, propagation=ROOTFS_PROPAGATION, syscall=self.syscall
                )
            else:
                # The parent's clone was made in the host's namespace, as a peer of
                # the bundle's mount when that is shared: private before anything is
                # mounted beneath it.
                self.syscall.mount_setattr(
                    fd, propagation=ROOTFS_PROPAGATION, recursive=True, detail="rootfs"
                )
            # Onto the cwd itself (T_EMPTY_PATH): even "." is a lookup, which needs search
            # permission on the cwd, and the bundle's rootfs may deny the container's
            # root it (containerd under umask 0027 makes a snapshot's root 0750).
            self.syscall.move_mount(
                fd,
                "",
                linux.AT_FDCWD,
                "",
                linux.MOVE_MOUNT_F_EMPTY_PATH | linux.MOVE_MOUNT_T_EMPTY_PATH,
            )
            self.syscall.fchdir(fd)
        finally:
            if fd is not None:
                os.close(fd)
            self.rootfs_mount_fd = None

    def mount_one(self, m: Mount) -> None:
        """Mount `m` beneath the rootfs; a kernel refusal names m's destination."""
        try:
            self._mount_one(m)
        except OSError as exc:
            if exc.errno is None:
                raise
            raise OSError(
                exc.errno,
                f"config.json: mounts: {m.destination}: {exc.strerror or exc}",
            ) from None

    def _mount_one(self, m: Mount) -> None:
        syscall = self.syscall
        dest = secure_join(self.rootfs, m.destination)
        inside = os.path.relpath(dest, self.rootfs)
        landing = "/" if inside == "." else "/" + inside
        if landing == "/" or (landing == "/dev" and _clean(m.destination) != "/dev"):
            # An image symlink (/data -> /, /data -> /dev) would stack the mount on the
            # rootfs itself (the volume vanishes under pivot_root) or on the /dev tmpfs,
            # and the volume's write rule with it: the whole rootfs, or every device.
            raise errors.InvalidArgument(
                f"config.json: mounts: {m.destination}: lands on {landing} through an image"
                " symlink: refused"
            )
        flags, propagation, data = parse_options(m.options)
        if m.type in ("proc", "sysfs") or _clean(m.destination) == "/dev":
            # These are found by path after pivot_root: maskedPaths and readonlyPaths
            # by the masks, /dev by Landlock's device allowlist (a rule on /dev). Through
            # an image symlink (/dev -> /tmp, or one a later volume hides) they would
            # land where neither looks.
            plain = os.path.join(self.rootfs, *_clean(m.destination).split("/")[1:])
            if dest.rstrip("/") != plain.rstrip("/"):
                raise errors.InvalidArgument(
                    f"config.json: mounts: {m.destination}: {m.type} must be mounted on"
                    " an ordinary directory, but the image has a symlink on the way"
                )
        if is_bind(m):
            if m.source_fd is None:  # not opened by the parent (a caller of this module)
                (m.source_fd,) = open_bind_sources([m], self.bundle, syscall=syscall)
            if _clean(m.destination) == "/dev":
                self.dev_is_bind = True
            try:
                source_is_dir = stat.S_ISDIR(os.fstat(m.source_fd).st_mode)
                _make_mountpoint(dest, m.destination, as_file=not source_is_dir)
                self._attach_bind(
                    dest, m.destination, m.source_fd, bool(flags & linux.MS_REC), syscall
                )
            finally:
                os.close(m.source_fd)
                m.source_fd = None
            extra = flags & ~(linux.MS_BIND | linux.MS_REC | linux.MS_REMOUNT)
            if extra:
                at_pinned(
                    dest,
                    m.destination,
                    lambda target: remount_bind(target, extra, syscall=syscall),
                    syscall=syscall,
                )
        elif m.type == "cgroup" or m.type == "cgroup2":
            self.mount_cgroup(dest, flags, m.destination)
        else:
            if m.type in ("proc", "sysfs"):
                # Never a setuid binary, device node or executable from these.
                flags |= linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
            _make_mountpoint(dest, m.destination)
            try:
                at_pinned(
                    dest,
                    m.destination,
                    lambda target: syscall.mount(
                        m.source or m.type, target, m.type, flags, data or None
                    ),
                    syscall=syscall,
                )
            except OSError as exc:
                if m.type == "sysfs" and exc.errno == errno.EPERM:
                    # sysfs needs a network namespace owned by our user namespace;
                    # without one, show the host's /sys read-only instead.
                    self.log(
                        "warning", f"sysfs mount refused ({exc.strerror}): binding /sys read-only"
                    )
                    at_pinned(
                        dest,
                        m.destination,
                        lambda target: _bind_host_sys_read_only(target, syscall),
                        syscall=syscall,
                    )
                elif m.type == "mqueue" and exc.errno in (errno.EPERM, errno.ENODEV):
                    self.log("warning", f"mqueue mount refused ({exc.strerror}): skipped")
                else:
                    raise
        if propagation:
            at_pinned(
                dest,
                m.destination,
                lambda target: syscall.mount(None, target, None, propagation),
                syscall=syscall,
            )

    @staticmethod
    def _attach_bind(
        dest: str, destination: str, source_fd: int, recursive: bool, syscall: Syscall = LINUX
    ) -> None:
        """Attach the parent's clone of a bind source at `dest`, then put a clone of it
        made here in its place.

        The parent cloned the source before this mount namespace existed, so its mount
        id is older than every other mount's, and the kernel lists a namespace's mounts
        (/proc/self/mountinfo) by id: every bind would show ahead of the mounts
        config.json lists before it (runtime-tools' `mounts` checks the order, as
        runc keeps it). A clone made now gets a fresh id; the parent's is let go.
        """
        under = pin(dest, destination, syscall=syscall)
        try:
            under_path = f"/proc/self/fd/{under}"
            move_flags = linux.MOVE_MOUNT_F_EMPTY_PATH | linux.MOVE_MOUNT_T_SYMLINKS
            syscall.move_mount(source_fd, "", linux.AT_FDCWD, under_path, move_flags)
            # Only a mount attached in this namespace can be cloned from here.
            top = pin(dest, destination, syscall=syscall)
            try:
                top_path = f"/proc/self/fd/{top}"
                fresh = clone_mount(
                    top_path, recursive=recursive, propagation=VOLUME_PROPAGATION, syscall=syscall
                )
                syscall.umount2(top_path, linux.MNT_DETACH)
            finally:
                os.close(top)
            try:
                syscall.move_mount(fresh, "", linux.AT_FDCWD, under_path, move_flags)
            finally:
                os.close(fresh)
        finally:
            os.close(under)

    def mount_cgroup(self, dest: str, flags: int, destination: str = "/sys/fs/cgroup") -> None:
        """The container's own cgroups, read-only: a tmpfs with one bind per hierarchy.

        Binding the container's own directories (not the hierarchy roots) keeps the
        rest of the host's cgroup tree invisible, on cgroup v1 and v2 alike. Every
        mount goes through a pinned fd (`at_pinned`): inside the fresh tmpfs nothing
        but zviz can create a symlink.
        """
        syscall = self.syscall
        hierarchies = _cgroup_mountpoints()
        own = sorted(self.cgroup_paths.values()) if self.cgroup_paths else []
        unified_only = len(hierarchies) == 1 and hierarchies[0][1] == "cgroup2"
        _make_mountpoint(dest, destination)
        locked = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
        if unified_only:
            if own:
                at_pinned(
                    dest,
                    destination,
                    lambda target: syscall.mount(own[0], target, None, linux.MS_BIND),
                    syscall=syscall,
                )
                at_pinned(
                    dest,
                    destination,
                    lambda target: remount_bind(target, flags | locked, syscall=syscall),
                    syscall=syscall,
                )
            return
        at_pinned(
            dest,
            destination,
            lambda target: syscall.mount("tmpfs", target, "tmpfs", locked, "mode=755"),
            syscall=syscall,
        )
        at_pinned(
            dest,
            destination,
            lambda tmpfs: self._fill_cgroup_tmpfs(tmpfs, flags, own, hierarchies),
            syscall=syscall,
        )

    def _fill_cgroup_tmpfs(self, tmpfs: str, flags: int, own: list[str], hierarchies) -> None:
        # HIERARCHIES: mount_cgroup's reading of mountinfo, not a second one (each is
        # ~0.4 ms of PID 1's CPU here, more on a node with many mounts).
        syscall = self.syscall
        locked = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
        for mountpoint, _fstype in hierarchies:
            mine = [p for p in own if p == mountpoint or p.startswith(mountpoint + "/")]
            if not mine:
                continue
            target = os.path.join(tmpfs, os.path.relpath(mountpoint, "/sys/fs/cgroup"))
            os.makedirs(target, exist_ok=True)
            syscall.mount(mine[0], target, None, linux.MS_BIND)
            remount_bind(target, flags | locked, syscall=syscall)
        try:
            for name in os.listdir("/sys/fs/cgroup"):
                host = os.path.join("/sys/fs/cgroup", name)
                if os.path.islink(host) and not os.path.lexists(os.path.join(tmpfs, name)):
                    syscall.symlink(os.readlink(host), os.path.join(tmpfs, name))
        except OSError:
            pass
        if flags & linux.MS_RDONLY:
            syscall.mount(None, tmpfs, None, linux.MS_REMOUNT | linux.MS_RDONLY | locked)

    def populate_dev(self) -> None:
        # Through a pinned fd on the /dev mount: the path to it is the image's.
        dev_fd = pin(secure_join(self.rootfs, "/dev"), "/dev", syscall=self.syscall)
        try:
            self._populate_dev_at(dev_fd)
        finally:
            os.close(dev_fd)

    def _populate_dev_at(self, dev_fd: int) -> None:
        for name in DEFAULT_DEVICES:
            _bind_device(f"/dev/{name}", dev_fd, name, self.syscall)
        for device in self.spec.linux.devices or ():
            self._create_device(device)
        for target, name in DEV_SYMLINKS:
            link = f"/proc/self/fd/{dev_fd}/{name}"
            if os.path.lexists(link):
                if name == "ptmx":
                    os.unlink(link)
                else:
                    continue
            self.syscall.symlink(target, link)

    def _create_device(self, device) -> None:
        """One linux.devices entry (a spec.Device) inside the rootfs's /dev."""
        path, major, minor = device.path, device.major or 0, device.minor or 0
        mode = device.file_mode or 0o666
        # The host's device at the same path (the host's /dev: PID 1's root is still
        # the host's) is what a user namespace binds, as it may not mknod.
        host_ok = False
        try:
            st = os.stat(path)
            host_ok = os.major(st.st_rdev) == major and os.minor(st.st_rdev) == minor
        except OSError:
            pass
        if not host_ok and self.in_userns:
            raise errors.InvalidArgument(
                f"config.json: linux.devices: {path}: no host device {major}:{minor} at this"
                " path to bind: the container runs in a user namespace (the profile's"
                " [user_namespace] rule), which may not create device nodes (mknod)"
            )
        type_bits = {
            "c": stat.S_IFCHR,
            "u": stat.S_IFCHR,
            "b": stat.S_IFBLK,
            "p": stat.S_IFIFO,
        }.get(device.type)
        if type_bits is None and not host_ok:
            raise errors.InvalidArgument(
                f"config.json: linux.devices: {path}: unknown type {device.type!r}"
            )
        # Inside the rootfs, the parent directory made and pinned with no symlink on
        # the way, then only *at calls on it: never a path walk a swapped symlink
        # could send to the host.
        parent, name = os.path.split(os.path.normpath(secure_join(self.rootfs, path)))
        parent = parent or "."
        _make_mountpoint(parent, path, field="linux.devices")
        parent_fd = pin(parent, path, field="linux.devices", syscall=self.syscall)
        try:
            try:
                os.unlink(name, dir_fd=parent_fd)
            except FileNotFoundError:
                pass
            if host_ok:
                _bind_device(path, parent_fd, name, self.syscall)
            else:
                mode_bits = type_bits | (mode & 0o7777)
                self.syscall.mknod(name, mode_bits, os.makedev(major, minor), parent_fd)
        finally:
            os.close(parent_fd)

    def pivot(self) -> None:
        syscall = self.syscall
        if not self.no_pivot:
            try:
                syscall.pivot_root(".", ".")
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Never a silent chroot: it leaves the host's root reachable to
                # anything that gets CAP_SYS_CHROOT. Only the host's root asks for it.
                raise errors.FailedPrecondition(
                    f"pivot_root refused ({exc.strerror}): the rootfs is on ramfs or its"
                    " mount is shared; zviz does not fall back to chroot unless"
                    " --no-pivot is given"
                ) from None
            # The old root is stacked under the new one at "."; detach it, after
            # making it a slave so the unmount cannot propagate to the host.
            syscall.mount(None, ".", None, linux.MS_SLAVE | linux.MS_REC)
            syscall.umount2(".", linux.MNT_DETACH)
            syscall.chdir("/")
            return
        # --no-pivot: move the rootfs over "/" and chroot into it. Weaker than
        # pivot_root (the old root stays reachable to a process with CAP_SYS_CHROOT),
        # which is why capabilities drop that cap by default.
        syscall.mount(".", "/", None, linux.MS_MOVE)
        syscall.chroot(".")
        syscall.chdir("/")

    def finish(self) -> None:
        """After pivot: masked and read-only paths, read-only root, root propagation."""
        syscall = self.syscall
        linux_spec = self.spec.linux
        for path in linux_spec.masked_paths or ():
            mask_path(path, syscall)
        for path in linux_spec.readonly_paths or ():
            readonly_path(path, syscall)
        if self.spec.root.readonly:
            remount_bind("/", linux.MS_RDONLY, syscall=syscall)
        propagation = PROPAGATION.get(linux_spec.rootfs_propagation or "")
        if propagation:
            syscall.mount(None, "/", None, propagation)


def _bind_device(host_path: str, dir_fd: int, name: str, syscall: Syscall = LINUX) -> None:
    """Bind the host's device `host_path` onto `name` in the directory `dir_fd`
    (created as an empty file; never through a symlink)."""
    try:
        os.close(
            os.open(
                name,
                os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o666,
                dir_fd=dir_fd,
            )
        )
    except FileExistsError:
        pass
    target = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        syscall.mount(host_path, f"/proc/self/fd/{target}", None, linux.MS_BIND)
    finally:
        os.close(target)


def _bind_host_sys_read_only(target: str, syscall: Syscall = LINUX) -> None:
    """The host's /sys and every mount beneath it, read-only, nosuid, nodev, noexec.

    A remount would reach only the top mount: the host's cgroup hierarchies, securityfs,
    bpffs... beneath it would stay writable. mount_setattr(AT_RECURSIVE) sets the
    flags on the whole detached clone before it is attached.
    """
    fd = clone_mount("/sys", recursive=True, propagation=VOLUME_PROPAGATION, syscall=syscall)
    try:
        syscall.mount_setattr(
            fd,
            attr_set=linux.MOUNT_ATTR_RDONLY
            | linux.MOUNT_ATTR_NOSUID
            | linux.MOUNT_ATTR_NODEV
            | linux.MOUNT_ATTR_NOEXEC,
            recursive=True,
            detail="/sys",
        )
        syscall.move_mount(
            fd, "", linux.AT_FDCWD, target,
            linux.MOVE_MOUNT_F_EMPTY_PATH | linux.MOVE_MOUNT_T_SYMLINKS,
        )  # fmt: skip
    finally:
        os.close(fd)


def mask_path(path: str, syscall: Syscall = LINUX) -> None:
    """Make `path` unreadable: /dev/null over a file, an empty read-only tmpfs over a dir."""
    try:
        syscall.mount("/dev/null", path, None, linux.MS_BIND)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        if exc.errno != errno.ENOTDIR:
            raise
        syscall.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY, "size=0")


def readonly_path(path: str, syscall: Syscall = LINUX) -> None:
    try:
        syscall.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise
    remount_bind(
        path, linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, syscall=syscall
    )


def _cgroup_mountpoints() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of the host's cgroup hierarchies under /sys/fs/cgroup."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = right.split(" ", 1)[0]
            if fstype in ("cgroup", "cgroup2"):
                mountpoint = left.split(" ")[4]
                if mountpoint.startswith("/sys/fs/cgroup"):
                    found.append((mountpoint, fstype))
    return found
