"""The broker process: one per container that needs one, double-forked so it is
nobody's child to reap; it exits when the last task using the filter has gone."""

import ctypes
import fcntl
import gc
import json
import os

from runtime import denials, linux
from runtime.security.broker.core import Broker, fork_warden


def spawn(
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
    """Fork a detached broker for one container; returns its pid."""
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
        broker.heartbeat_fd = fork_warden(profile)
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
