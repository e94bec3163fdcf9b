"""What cgroup v1 and v2 share: file access, the kill/wait/rmdir sequence, and the base class.

A cgroup file write is a single write(2) of the whole value: the kernel parses one
write per call, so buffered I/O that could split a value is never used here.
"""

import errno
import os
import signal
import time

from runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable

# Kernel answers to a cgroup file write that mean "this value is not acceptable here".
_VALUE_ERRNOS = {
    errno.EINVAL,
    errno.ERANGE,
    errno.EBUSY,
    errno.EPERM,
    errno.EOVERFLOW,
    errno.ENODEV,  # a blockIO rule for a device this host lacks
    errno.ENOSPC,
    errno.EOPNOTSUPP,
}

# How long destroy() waits for killed processes to leave and for rmdir to stop
# answering EBUSY (exiting tasks are unlinked from their cgroup a little after SIGKILL).
DESTROY_TIMEOUT_S = 10.0
FREEZE_TIMEOUT_S = 5.0


# blockIO's throttle lists: (config.json key, spec.BlockIO attribute), for the spec that
# reads them and the plans that write them.
THROTTLE_KEYS = (
    ("throttleReadBpsDevice", "throttle_read_bps_device"),
    ("throttleWriteBpsDevice", "throttle_write_bps_device"),
    ("throttleReadIOPSDevice", "throttle_read_iops_device"),
    ("throttleWriteIOPSDevice", "throttle_write_iops_device"),
)


def write_file(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read_file(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def read_int(path: str, default: int = 0, max_value: int = 0) -> int:
    """An integer cgroup file; "max" reads as max_value, a missing file as default."""
    try:
        text = read_file(path).strip()
    except FileNotFoundError:
        return default
    if text == "max":
        return max_value
    try:
        return int(text)
    except ValueError:
        return default


def read_keyed(path: str) -> dict[str, int]:
    """A flat keyed file ("key value" per line: memory.stat, cpu.stat, memory.events...)."""
    result: dict[str, int] = {}
    try:
        text = read_file(path)
    except FileNotFoundError:
        return result
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            result[key] = int(value)
        except ValueError:
            continue
    return result


def read_pids(procs_file: str) -> list[int]:
    try:
        return [int(line) for line in read_file(procs_file).split()]
    except OSError as err:
        # ENODEV: the group was removed between the open and the read (another delete
        # of the same container); gone either way, and no process was left in it.
        if err.errno not in (errno.ENOENT, errno.ENODEV):
            raise
        return []


class Write:
    """One planned cgroup file write, carrying the config.json field it comes from."""

    __slots__ = ("controller", "file", "value", "field")

    def __init__(self, controller: str, file: str, value: str, field: str):
        self.controller = controller
        self.file = file
        self.value = value
        self.field = field

    def __eq__(self, other):
        return isinstance(other, Write) and self.as_tuple() == other.as_tuple()

    def __hash__(self):
        return hash(self.as_tuple())

    def as_tuple(self) -> tuple[str, str, str, str]:
        return (self.controller, self.file, self.value, self.field)

    def __repr__(self):
        return f"Write({self.controller}/{self.file} = {self.value!r} from {self.field})"


def value_error(write: Write, err: OSError) -> InvalidArgument:
    return InvalidArgument(
        f"config.json: linux.resources.{write.field}: the kernel rejected "
        f"{write.value!r} for {write.file}: {os.strerror(err.errno or 0)}"
    )


def perform(write: Write, directory: str) -> None:
    """Writes one planned value; a value the kernel refuses becomes an InvalidArgument."""
    try:
        write_file(os.path.join(directory, write.file), write.value)
    except FileNotFoundError as err:
        raise InvalidArgument(
            f"config.json: linux.resources.{write.field}: this kernel has no {write.file} "
            f"(controller or feature not available)"
        ) from err
    except OSError as err:
        if err.errno in _VALUE_ERRNOS:
            raise value_error(write, err) from err
        raise


def offered_file(directory: str | None, candidates: tuple[str, ...]) -> str | None:
    """The first of `candidates` that exists in `directory`: the one this kernel offers.

    For files whose name depends on what the kernel was built or loaded with (the block
    I/O weight: CFQ, BFQ or io.cost each name it differently).
    """
    if directory is None:
        return None
    for name in candidates:
        if os.path.exists(os.path.join(directory, name)):
            return name
    return None


def asks_block_weight(resources) -> bool:
    """Whether `resources` (a spec.Resources) sets a block I/O weight (one of the files
    offered_file finds): only then is the cgroup directory looked at for it."""
    block_io = resources.block_io if resources is not None else None
    if block_io is None:
        return False
    return bool(block_io.weight) or any(dev.weight for dev in block_io.weight_device)


def no_weight_file(field: str, candidates: tuple[str, ...]) -> InvalidArgument:
    """The error for a block I/O weight on a kernel that offers none of the weight files."""
    return InvalidArgument(
        f"config.json: linux.resources.{field}: this kernel offers no block I/O weight: "
        f"{' and '.join(candidates)} are all missing (the I/O scheduler or cgroup policy "
        "that provides them is not built in or not loaded)"
    )


def procs_below(top: str) -> set[int]:
    """The processes in a cgroup directory and all its sub-groups."""
    found: set[int] = set()
    for dirpath, _dirnames, files in os.walk(top):
        if "cgroup.procs" in files:
            found.update(read_pids(os.path.join(dirpath, "cgroup.procs")))
    return found


def rmdir_tree(top: str, deadline: float) -> None:
    """Removes a cgroup directory and any sub-groups, leaf first; a missing tree is fine."""
    if not os.path.isdir(top):
        return
    for dirpath, _dirnames, _files in os.walk(top, topdown=False):
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as err:
                # EBUSY: a killed task is still being unlinked from the group.
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise FailedPrecondition(
                        f"cgroup {dirpath} could not be removed: {os.strerror(err.errno or 0)}"
                    ) from err
                time.sleep(0.01)


# The parent of every container group made with the default path (/zviz/<id>).
SHARED_PARENT_NAME = "zviz"


def remove_shared_parent(directory: str) -> None:
    """Removes the shared /zviz parent once its last container is gone.

    A concurrent create() that loses the race sees ENOENT and makes it again.
    """
    parent = os.path.dirname(directory)
    if os.path.basename(parent) != SHARED_PARENT_NAME:
        return
    try:
        os.rmdir(parent)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise


def removed_meanwhile(error: OSError | FailedPrecondition, group_dir: str) -> bool:
    """Whether ERROR, from a freezer file, is the group having been removed under us
    (ENOENT opening, ENODEV writing into an open file): by another delete of the same
    container (a SIGKILLed `zviz run`'s fork-server worker deletes it once its PID 1
    dies, which the user's `delete --force` has just killed). A group is only removed
    once no process is left in it: nothing to freeze or signal there."""
    if isinstance(error, OSError) and error.errno not in (errno.ENOENT, errno.ENODEV):
        return False
    gone = getattr(error, "filename", None)
    return not os.path.isdir(os.path.dirname(gone) if gone else group_dir)


def make_dirs(directory: str, base: str, created: list[str], on_new_level=None) -> None:
    """mkdir every level from below `base` down to `directory`; the leaf must be new.

    Levels made are appended to `created`. A level vanishing under us (another
    container's destroy() removing the shared parent) restarts the walk.
    """
    for _attempt in range(20):
        level = base
        try:
            for part in os.path.relpath(directory, base).split("/"):
                parent, level = level, os.path.join(level, part)
                try:
                    os.mkdir(level, 0o755)
                    created.append(level)
                    # mkdir's mode passes through the caller's umask (0027 would make it
                    # 0750, which the container's root, a mapped uid, cannot search to
                    # mount it): as under 0022, whatever the caller's. Not the umask
                    # itself: the shim's daemon is multi-threaded and umask is per process.
                    os.chmod(level, 0o755)
                except FileExistsError:
                    if level == directory:
                        raise AlreadyExists(f"cgroup {directory} already exists") from None
                except OSError as err:
                    if err.errno in (errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL):
                        raise InvalidArgument(
                            f"config.json: linux.cgroupsPath: cannot make cgroup {level}: "
                            f"{os.strerror(err.errno)}"
                        ) from err
                    raise
                if on_new_level:
                    on_new_level(parent, level)
            return
        except FileNotFoundError:
            continue
        except OSError as err:
            # A write into a level removed after it was opened answers ENODEV: the
            # same race as ENOENT above (the shared parent went with its last container).
            if err.errno != errno.ENODEV:
                raise
    raise FailedPrecondition(f"cgroup {directory}: its parent keeps disappearing")


class Cgroup:
    """A container's cgroup. Subclasses: CgroupV1 (one dir per hierarchy), CgroupV2 (one dir)."""

    version: int = 0
    paths: dict[str, str]
    # Whether join_self() moves a process in without the RCU grace period that a
    # cgroup.procs write may wait for (see cgroups.warm_up_attach). Where it does, the
    # container's PID 1 is forked inside; elsewhere its parent moves it in while PID 1
    # builds its rootfs, the wait started by prepare_join().
    cheap_self_join = False
    # log(level, message), as runtime.log.Log takes it; notes also come back from apply()
    log = None

    def note(self, message: str) -> None:
        if self.log is not None:
            self.log("warning", message)

    # --- provided by the subclasses ---------------------------------------------------------
    def create(self) -> None:
        raise NotImplementedError

    def _planned_writes(self, resources, notes: list[str]) -> list[tuple[Write, str]]:
        """(write, directory) for every file apply() must write, in order (a spec.Resources)."""
        raise NotImplementedError

    def _after_writes(self, resources) -> None:
        """What apply() does beyond file writes (v2: the device program)."""

    def add_pid(self, pid: int) -> None:
        raise NotImplementedError

    def charge_memory(self, pid: int) -> None:
        """Charge what `pid` (a helper of the container, its broker) allocates from now
        on to the container's memory limit, without making it one of the container's
        processes for the other controllers (pids, freezer).

        v1 only: a v2 group holds a process for every controller at once (the freezer
        would stop the broker apart from its warden, and pids.max would bound its
        threads), so on v2 the helper stays where it is.
        """

    def join_self(self) -> None:
        """Move the calling process in; it must be single-threaded (a fresh fork)."""
        self.add_pid(0)  # "0" is the writer itself

    def prepare_join(self) -> None:
        """Right after create(): start whatever the coming join would wait for."""

    def pids(self) -> list[int]:
        raise NotImplementedError

    def freeze(self) -> None:
        raise NotImplementedError

    def thaw(self) -> None:
        raise NotImplementedError

    def frozen(self) -> bool:
        raise NotImplementedError

    def stats(self) -> dict:
        raise NotImplementedError

    def oom_kill_count(self) -> int:
        raise NotImplementedError

    def oom_watcher(self):
        raise NotImplementedError

    def pids_limit_hits(self) -> int:
        """How many forks pids.max has refused (pids.events "max"); 0 without the controller."""
        raise NotImplementedError

    def limit(self, kind: str) -> int:
        """The group's limit of `kind` ("pids" or "memory", bytes); 0 when unlimited."""
        raise NotImplementedError

    def _dirs(self) -> list[str]:
        """Every distinct leaf directory (v1: one per mounted hierarchy)."""
        raise NotImplementedError

    def _procs_dir(self) -> str:
        """The leaf directory whose cgroup.procs lists the container's processes."""
        raise NotImplementedError

    def _freezable(self) -> bool:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    _created: list[str]

    def apply(self, resources) -> list[str]:
        """Writes OCI linux.resources; returns (and logs) notes on settings this host ignores.

        `resources` is a spec.Resources (validated), or a linux.resources dict, which
        spec.parse_resources validates first: the plans trust what they are given.
        A value the kernel refuses is an InvalidArgument naming the field. If this is the
        first apply() on a group this object just created, the group is then removed: a
        config the host cannot honour leaves nothing.
        """
        notes: list[str] = []
        try:
            if resources is None or isinstance(resources, dict):
                from runtime.spec import parse_resources

                resources = parse_resources(resources, "config.json")
            for write, directory in self._planned_writes(resources, notes):
                perform(write, directory)
            self._after_writes(resources)
        except BaseException:
            if self._created and not self.procs_recursive():
                self.destroy()
                self._created.clear()
            raise
        # Configured: a later apply() (an update) that fails leaves the group as it is.
        self._created.clear()
        for message in notes:
            self.note(message)
        return notes

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self._dirs())

    def procs_recursive(self) -> list[int]:
        return sorted(procs_below(self._procs_dir()))

    def kill_all(self, sig: int) -> None:
        """Signals every process in the cgroup and its sub-groups.

        The group is frozen while its members are listed and signalled, so a process
        forking in a loop cannot escape with a child born after the listing.
        """
        freezable = self._freezable() and os.path.isdir(self._procs_dir())
        was_frozen = freezable and self.frozen()
        froze = False
        if freezable and not was_frozen:
            try:
                self.freeze()
                froze = True
            except Unavailable:
                self.note(f"cgroup {self._procs_dir()}: could not freeze before signalling")
            except (OSError, FailedPrecondition) as error:
                if not removed_meanwhile(error, self._procs_dir()):
                    raise
        try:
            for pid in self.procs_recursive():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        finally:
            # A frozen task only acts on SIGKILL once thawed; a paused container that
            # receives another signal stays paused, as with runc.
            if froze or (was_frozen and sig == signal.SIGKILL):
                try:
                    self.thaw()
                except (OSError, FailedPrecondition) as error:
                    if not removed_meanwhile(error, self._procs_dir()):
                        raise

    # Set when create() failed: the directories it found belong to someone else (or
    # were already undone), so destroy() must not touch them.
    _create_failed = False

    def destroy(self) -> None:
        """Kills what is left, waits for it to leave, removes every directory. Idempotent."""
        if self._create_failed:
            return
        deadline = time.monotonic() + DESTROY_TIMEOUT_S
        next_kill = 0.0
        while self.exists() and (survivors := self.procs_recursive()):
            now = time.monotonic()
            if now > deadline:
                raise FailedPrecondition(
                    f"cgroup {self._procs_dir()}: processes survive SIGKILL: {survivors}"
                )
            if now >= next_kill:
                # again now and then: a process may have joined since (an exec racing us)
                self.kill_all(signal.SIGKILL)
                next_kill = now + 0.1
            time.sleep(0.002)
        for directory in self._dirs():
            rmdir_tree(directory, deadline)
            remove_shared_parent(directory)


class OomWatcher:
    """An fd that turns readable on OOM events (select/asyncio); read() counts new kills.

    Subclasses set `_fd` (v1: an eventfd on memory.oom_control, v2: inotify on
    memory.events) and implement read().
    """

    _fd = -1

    def fileno(self) -> int:
        return self._fd

    def read(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
