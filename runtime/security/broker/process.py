"""The broker process: one per container that needs one, double-forked so it is
nobody's child to reap; it exits when the last task using the filter has gone.

Under the shim, brokers are forked by the daemon's forker (`Forker`), a still copy of
the daemon, so that they share its pages instead of each keeping the daemon's old ones.
"""

import ctypes
import fcntl
import gc
import json
import os
import pickle
import signal
import socket
import threading

from runtime import denials, linux
from runtime.security.broker import warden
from runtime.security.broker.core import Broker

# Set once by a long-lived process that forks many brokers (the shim daemon).
_forker: "Forker | None" = None


def fork_brokers_from_a_forker() -> None:
    """From now on, brokers are forked by a forker process (below), not by this one.

    For a long-lived caller that goes on working while its brokers run (the shim
    daemon): a broker forked straight from it shares its pages only until it writes
    them, and it writes its busy heap all the time, so each broker (and its warden)
    kept its own copy of every page the daemon wrote after its fork (4.4 MiB PSS a
    container, measured with 10). The forker is forked once, at the first broker, and
    then does nothing but fork: its pages stay the ones every broker shares.
    """
    global _forker
    if _forker is None:
        _forker = Forker()


def spawn(channel, init_pid: int, profile, **options) -> int:
    """Fork a detached broker for one container; returns its pid. OPTIONS: _spawn_here's
    keywords (verbose, container_id, log_path, records_path, record_context)."""
    if _forker is not None:
        return _forker.spawn(channel, init_pid, profile, options)
    return _spawn_here(channel, init_pid, profile, **options)


class Forker:
    """A fork of the process that made it, that forks brokers on request and exits when
    that process closes its end of the socket (it has gone).

    One request at a time: the pickled arguments with the channel's supervisor end
    (SCM_RIGHTS); the answer is the broker's pid, or what went wrong. The broker is
    the forker's grandchild as it is the caller's today: double-forked, reparented to
    the caller when that is a subreaper (the shim daemon reaps it), and the caller
    charges it to the container's memory cgroup as before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def spawn(self, channel, init_pid: int, profile, options: dict) -> int:
        request = pickle.dumps((init_pid, profile, options))
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = _start_forker()
                try:
                    socket.send_fds(self._sock, [request], [channel.supervisor_fd])
                    answer = self._sock.recv(_ANSWER_MAX)
                except OSError:
                    answer = b""
                if not answer:  # the forker died: the next broker starts another
                    self._sock.close()
                    self._sock = None
        finally:
            channel.close_supervisor_end()
        if answer.isdigit():
            return int(answer)
        from runtime.errors import SecurityLayerError

        reason = f": {answer.decode(errors='replace')}" if answer else ""
        raise SecurityLayerError(f"broker: could not start the broker process{reason}")

    def close(self) -> None:
        """The forker exits (end of file); the brokers it forked go on."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


_REQUEST_MAX = 1 << 20
_ANSWER_MAX = 512


class _ReceivedChannel:
    """The supervisor end of a notify channel, received by the forker."""

    def __init__(self, fd: int) -> None:
        self.supervisor_fd = fd

    def close_supervisor_end(self) -> None:
        if self.supervisor_fd >= 0:
            os.close(self.supervisor_fd)
            self.supervisor_fd = -1


def _start_forker() -> socket.socket:
    ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    if os.fork() != 0:
        its.close()
        return ours
    status = 0
    try:
        ours.close()
        _serve_forks(its)
    except BaseException:  # noqa: BLE001 - the forker never runs its parent's code
        status = 1
    finally:
        os._exit(status)


def _serve_forks(sock: socket.socket) -> None:
    gc.freeze()  # what the forker inherited is never collected here: its pages stay shared
    # The caller's signal handlers (an event loop's) are not the forker's.
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)
    # Nothing of the caller's but stderr (the brokers' log when they have none).
    linux.close_all_except({0, 1, 2, sock.fileno()})
    title = ctypes.create_string_buffer(b"zviz-forker")
    linux.prctl(linux.PR_SET_NAME, ctypes.addressof(title))
    while True:
        request, fds, _, _ = socket.recv_fds(sock, _REQUEST_MAX, 1)
        if not request:
            return  # the caller has gone
        channels = [_ReceivedChannel(fd) for fd in fds]
        try:
            if len(channels) != 1:
                raise ValueError("a request without its channel")
            init_pid, profile, options = pickle.loads(request)
            answer = str(_spawn_here(channels[0], init_pid, profile, **options))
        except Exception as e:  # noqa: BLE001 - the caller raises it
            answer = f"{type(e).__name__}: {e}"
        finally:
            for channel in channels:
                channel.close_supervisor_end()
        sock.send(answer.encode(errors="replace")[:_ANSWER_MAX])


def _spawn_here(
    channel,
    init_pid: int,
    profile,
    *,
    verbose=False,
    container_id="",
    log_path=None,
    records_path=None,
    record_context=None,
) -> int:
    """Fork a detached broker for one container from this process; returns its pid."""
    r, w = os.pipe()
    log_fd = -1
    if log_path is not None:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    middle = os.fork()
    if middle == 0:
        # Every object inherited from the forking process goes to the collector's
        # permanent generation (an O(1) list splice): a full collection in the broker,
        # which lives as long as its container, would otherwise write the header of
        # each of them and copy the pages they are on (one forced full collection:
        # +0.5 MiB PSS a container, broker and warden). What the broker allocates
        # itself is still collected.
        gc.freeze()
        status = 1
        try:
            os.close(r)
            os.setsid()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _run(
                    channel.supervisor_fd,
                    init_pid,
                    profile,
                    verbose,
                    container_id,
                    log_fd,
                    (records_path, record_context),
                )
                os._exit(0)
            os.write(w, str(pid).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    if log_fd >= 0:
        os.close(log_fd)
    os.waitpid(middle, 0)
    data = os.read(r, 32)
    os.close(r)
    channel.close_supervisor_end()
    if not data:
        from runtime.errors import SecurityLayerError

        raise SecurityLayerError("broker: could not start the broker process")
    return int(data)


def _run(
    channel_fd: int,
    init_pid: int,
    profile,
    verbose: bool,
    container_id: str,
    log_fd: int,
    records_to: tuple = (None, None),
) -> None:
    try:
        # Keep only the channel and the log: the broker must not hold the container's
        # stdio, the sync socket or anything else of the process that forked it.
        # (Both go high first, so moving one to 3 or 4 cannot clobber the other.)
        channel_high = fcntl.fcntl(channel_fd, fcntl.F_DUPFD_CLOEXEC, 100)
        log_high = fcntl.fcntl(log_fd, fcntl.F_DUPFD_CLOEXEC, 100) if log_fd >= 0 else -1
        os.dup2(channel_high, 3)
        log = 2
        if log_high >= 0:
            os.dup2(log_high, 4)
            log = 4
        linux.close_range(5 if log == 4 else 4)
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        if null > 2:
            os.close(null)
        title = ctypes.create_string_buffer(b"zviz-broker")  # must outlive the prctl call
        linux.prctl(linux.PR_SET_NAME, ctypes.addressof(title))
        records_path, record_context = records_to
        # Built before the warden is forked: a page written after the fork is copied
        # twice (the broker's new copy, the warden's old one), before it only once.
        broker = Broker(
            -1,
            profile,
            verbose=verbose,
            container_id=container_id,
            log_fd=log,
            # Opened here, after close_range: the file is the broker's only other fd.
            records=denials.RecordFile(records_path) if records_path else None,
            record_context=record_context,
        )
        broker.heartbeat_fd = warden.fork_warden(broker.timeout, broker.debug)
        message = os.read(3, 256)
        if not message:
            return  # the container went away before starting
        listener_number = json.loads(message)["listener_fd"]
        pidfd = linux.pidfd_open(init_pid)
        # The warden never holds the listener: killing the broker must close it.
        broker.fd = linux.pidfd_getfd(pidfd, listener_number)
        os.close(pidfd)
        # The warden's clock starts before the container can make a call.
        os.write(broker.heartbeat_fd, b".")
        os.write(3, b"ok")
        os.close(3)
        broker.serve()
    except Exception as e:  # noqa: BLE001
        try:
            os.write(2, f"zviz-broker: {type(e).__name__}: {e}\n".encode())
        except OSError:
            pass
