"""The shim binary's lifecycle actions: `start` (find or launch the serving daemon) and
`delete` (clean up after a daemon that died).

`start` runs once per container while containerd waits, so it stays small: standard
library only, no protobuf. It creates the listening socket itself and hands it to the
daemon as fd 3, so the address it prints answers at once, even while the daemon is
still importing.

A group directory `<STATE_ROOT>/g/<sha256(containerd address, namespace, group)>/` holds:
  sock     the daemon's ttrpc socket (mode 0600)
  lock     flock'ed by `start` and by a daemon about to exit, so a start never hands
           out the address of a daemon that is going away
  tasks/   one reservation file per container id `start` promised to this daemon; an
           idle daemon does not exit while a fresh reservation waits for its Create
"""

import errno
import fcntl
import os
import sys
import time

# The C socket module alone: `socket` imports enum and friends, a cost on every start.
from _socket import AF_UNIX, SOCK_CLOEXEC, SOCK_STREAM, SOMAXCONN
from _socket import socket as _raw_socket

from runtime.private_dir import makedirs_private
from shim import config as shim_config

RESERVATION_TTL_SECONDS = 60.0
DAEMON_FD = 3


class GroupLock:
    """An exclusive flock on the group's lock file, robust against the directory being removed."""

    def __init__(self, gdir: str) -> None:
        self.gdir = gdir
        self.fd = -1

    def __enter__(self) -> "GroupLock":
        path = os.path.join(self.gdir, "lock")
        while True:
            try:
                makedirs_private(os.path.join(self.gdir, "tasks"))
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue  # an exiting daemon removed a directory under us: make it again
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)  # locked a file an exiting daemon already unlinked: take the new one

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
        self.fd = -1


def reserve(gdir: str, container_id: str) -> None:
    with open(os.path.join(gdir, "tasks", container_id), "w"):
        pass


def release(gdir: str, container_id: str) -> None:
    try:
        os.unlink(os.path.join(gdir, "tasks", container_id))
    except OSError:
        # Gone already, or a read-only state filesystem: a reservation left behind expires
        # (RESERVATION_TTL_SECONDS), and raising here would hide the error being cleaned up
        # after (a Create that failed on that same filesystem).
        pass


def pending_reservations(gdir: str, known_ids, now: float | None = None) -> list[str]:
    """Reservations for containers the daemon has not seen yet and that are still fresh."""
    now = time.time() if now is None else now
    tasks = os.path.join(gdir, "tasks")
    pending = []
    try:
        names = os.listdir(tasks)
    except FileNotFoundError:
        return []
    for name in names:
        if name in known_ids:
            continue
        try:
            age = now - os.stat(os.path.join(tasks, name)).st_mtime
        except FileNotFoundError:
            continue
        if age < RESERVATION_TTL_SECONDS:
            pending.append(name)
    return pending


def remove_if_dead(gdir: str) -> None:
    """Remove a group directory whose daemon is gone and that no container waits for."""
    if not os.path.isdir(gdir):
        return
    with GroupLock(gdir):
        if can_connect(socket_path_of(gdir)):
            return
        try:
            if os.listdir(os.path.join(gdir, "tasks")):
                return
        except FileNotFoundError:
            pass
        import shutil

        shutil.rmtree(gdir, ignore_errors=True)


def socket_path_of(gdir: str) -> str:
    return shim_config.socket_path(gdir)


def tidy_state_root(*paths: str) -> None:
    """Remove each of `paths` and its parents up to and including STATE_ROOT while empty.

    Safe against a concurrent `start`: rmdir only removes empty directories, and
    GroupLock recreates whatever it needs (retrying if a directory vanishes under it).
    """
    top = os.path.dirname(shim_config.STATE_ROOT.rstrip("/"))
    for path in paths:
        while path.startswith(shim_config.STATE_ROOT) and path != top:
            try:
                os.rmdir(path)
            except OSError:
                break
            path = os.path.dirname(path)


def can_connect(path: str) -> bool:
    probe = _raw_socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def read_stdin() -> bytes:
    """What containerd writes to `start`'s stdin (see shim_config.decode_start_input), or b""."""
    try:
        if os.isatty(0):
            return b""
        chunks = []
        while chunk := os.read(0, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return b""


def _listen(path: str) -> _raw_socket:
    listener = _raw_socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # the socket is born 0600: only our uid may drive containers
    try:
        listener.bind(path)
    except BaseException:
        listener.close()
        raise
    finally:
        os.umask(old_umask)
    # Connections made before the daemon serves wait here: as many as the kernel allows
    # (the daemon listens again with the same backlog, api/ttrpc/server.py).
    listener.listen(SOMAXCONN)
    return listener


def _daemon_program() -> list[str]:
    """The daemon runs the Python entry this `start` runs as: the shim's script, else
    `python -m shim.main`. A start the fork server serves for the compiled client
    (runtime/forkserver_client.c, not Python) runs the script that client falls back to,
    so a served and an unserved start leave the same daemon behind."""
    script = os.path.abspath(sys.argv[0])
    try:
        with open(script, "rb") as f:
            compiled = f.read(4) == b"\x7fELF"
    except OSError:
        compiled = False
    if compiled:
        from runtime import forkserver

        script = forkserver.python_entry(forkserver.scripts_dir(), forkserver.SHIM_ENTRY)
    if os.path.isfile(script) and os.path.basename(script).startswith("containerd-shim-zviz-v2"):
        return [sys.executable, script]
    return [sys.executable, "-m", "shim.main"]


def _spawn_daemon(flags, listener: _raw_socket, config_path: str | None) -> int:
    """Launch the serving daemon detached: own session, stdio not holding containerd's pipes
    (containerd waits for EOF on start's output), the listening socket as fd 3."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        # containerd holds the bundle's log fifo open for reading, so this never blocks.
        log_fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        log_fd = os.dup(devnull)
    # dup2 onto the same number would keep FD_CLOEXEC set: move the socket out of the way.
    sock_fd = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
    env = dict(os.environ)
    if config_path:
        env[shim_config.CONFIG_ENV] = config_path
    argv = [*_daemon_program(), *flags.to_args()]
    try:
        return os.posix_spawn(
            sys.executable,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
                (os.POSIX_SPAWN_DUP2, sock_fd, DAEMON_FD),
            ],
            setsid=True,
        )
    finally:
        os.close(devnull)
        os.close(log_fd)
        os.close(sock_fd)


def start(flags) -> bytes:
    """What `start` answers containerd: the address of the daemon serving this container's
    group (launched if needed), in the form the containerd asking reads."""
    if not flags.id:
        raise ValueError("start: -id is required")
    config_path, bootstrap = shim_config.decode_start_input(read_stdin(), flags.id, flags.namespace)
    address = _start_daemon(flags, config_path or os.environ.get(shim_config.CONFIG_ENV))
    return shim_config.start_reply(address, bootstrap)


def _start_daemon(flags, config_path: str | None) -> str:
    bundle = os.getcwd()
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            annotations = shim_config.grouping_annotations(f.read())
    except (OSError, ValueError) as e:
        raise ValueError(f"start: reading {bundle}/config.json: {e}") from e
    config = shim_config.load_config(config_path)
    group = shim_config.group_id(flags.id, annotations, config)
    gdir = shim_config.group_dir(flags.address, flags.namespace, group)
    path = shim_config.socket_path(gdir)
    if len(path) > shim_config.SOCKET_PATH_LIMIT:
        raise ValueError(
            f"start: socket path {path} is longer than {shim_config.SOCKET_PATH_LIMIT} bytes"
        )
    address = "unix://" + path
    # What `delete` needs after a daemon died, and what the daemon needs to find its group.
    shim_config.write_bundle_state(
        os.path.join(bundle, shim_config.BUNDLE_STATE_FILE),
        {
            "group_dir": gdir,
            "root": shim_config.runtime_root(flags.address, flags.namespace),
            "config_path": config.path or "",
        },
    )
    with GroupLock(gdir):
        try:
            listener = _listen(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            if can_connect(path):
                reserve(gdir, flags.id)
                shim_config.write_atomic(os.path.join(bundle, "address"), address)
                return address
            os.unlink(path)  # a dead daemon's socket: we hold the lock, nobody else serves it
            listener = _listen(path)
        try:
            reserve(gdir, flags.id)
            shim_config.write_atomic(os.path.join(bundle, "address"), address)
            flags.socket = address
            _spawn_daemon(flags, listener, config.path)
        except BaseException:
            os.unlink(path)
            release(gdir, flags.id)
            raise
        finally:
            listener.close()
    return address


def delete(flags) -> bytes:
    """Clean up a container whose daemon is gone; return a serialized DeleteResponse."""
    bundle = flags.bundle or os.getcwd()
    if not flags.id:
        raise ValueError("delete: -id is required")
    from shim.cleanup import cleanup_dead_container

    return cleanup_dead_container(flags, bundle)
