"""The broker's warden: kills a broker that stops serving (docs/security.md, "warden").

The warden is the broker's child, forked before the broker holds the listener (it must
never hold it: killing the broker has to close the listener). It exits when the broker
does (end of file on the heartbeat pipe); without a heartbeat for the profile's
broker.timeout it SIGKILLs the broker (held by pidfd: no pid reuse), so calls the
stalled broker never received fail with ENOSYS instead of waiting.

The child execs runtime/broker_warden.c (BINARY_NAME, built at install like the exec
anchor: runtime/static_programs.py), a static program of ~0.1 MiB, rather than staying a
fork of the broker (~1.1 MiB private dirty a container). The broker runs in the host's
mount namespace (it never enters the container's), so the binary is exec'd by its path.
Without it (not built: no C compiler; or built from other source, which refuses
LAYOUT) the broker forks its Python warden, the same loop, instead.
"""

import ctypes
import fcntl
import os
import select
import signal

from runtime import linux, static_programs

BINARY_NAME = "zviz-warden"
# Mirror of broker_warden.c's WARDEN_LAYOUT ("zvw1"): its arguments and fds.
LAYOUT = 0x7A767731
# The fds the compiled warden is given (broker_warden.c's BEATS_FD, BROKER_PIDFD,
# STARTED_FD): fixed numbers, so its argv is only the layout and the timeout.
BEATS_FD, BROKER_PIDFD, STARTED_FD = 3, 4, 5
STARTED = b"ok"


def binary_path() -> str:
    """The one place the broker looks for the compiled warden, and where `make install`
    and `zviz node install` build it (runtime/static_programs.py says where)."""
    return static_programs.binary_path(BINARY_NAME)


def build(bin_dir: str) -> str | None:
    """Compile runtime/broker_warden.c into BIN_DIR; None without a C compiler or a
    static libc (libc6-dev)."""
    return static_programs.build(bin_dir, BINARY_NAME)


def fork_warden(timeout: float, log=None) -> int:
    """Fork the warden (the compiled one, else the Python one); returns the broker's end
    of the heartbeat pipe. TIMEOUT: seconds allowed between beats. LOG(text) is told
    why the Python warden runs, when it does."""
    beats, beat = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    broker_pidfd = linux.pidfd_open(os.getpid())
    # The broker reaps nothing: its only child, the warden, is reaped by the kernel.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        why = _fork_compiled(beats, broker_pidfd, timeout)
        if why is not None:
            if log is not None:
                log(f"warden: the Python warden runs ({why})")
            _fork_python(beats, beat, broker_pidfd, timeout)
    finally:
        os.close(beats)
        os.close(broker_pidfd)
    return beat


def _fork_compiled(beats: int, broker_pidfd: int, timeout: float) -> str | None:
    """Fork a child that execs the compiled warden; None once it said it runs, else why
    not (its child, if any, has exited)."""
    path = binary_path()
    if not os.path.exists(path):
        return f"no compiled warden at {path}"
    started, started_w = os.pipe2(os.O_CLOEXEC)
    try:
        if os.fork() == 0:
            try:
                # Nothing of the broker's but the three fds, at the numbers the program
                # expects (moved high first so none clobbers another on the way).
                high = [
                    fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)
                    for fd in (beats, broker_pidfd, started_w)
                ]
                for number, fd in zip((BEATS_FD, BROKER_PIDFD, STARTED_FD), high, strict=True):
                    os.dup2(fd, number)  # inheritable
                linux.close_range(STARTED_FD + 1)
                # The broker's command line and environment follow, only shown: what
                # finds a container's processes by them (ps, leak checks) finds the
                # compiled warden as it found the forked one.
                with open("/proc/self/cmdline", "rb") as f:
                    shown = [arg.decode(errors="surrogateescape") for arg in f.read().split(b"\0")]
                milliseconds = str(max(1, round(timeout * 1000)))
                argv = [BINARY_NAME, f"{LAYOUT:x}", milliseconds, "--", *shown[:-1]]
                os.execve(path, argv, os.environ)
            finally:
                os._exit(127)
        os.close(started_w)
        started_w = -1
        answer = _read_all(started)
    finally:
        os.close(started)
        if started_w >= 0:
            os.close(started_w)
    if answer == STARTED:
        return None
    return f"{path} did not start (built from other source, or cannot run)"


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 16):
        data += chunk
    return data


def _fork_python(beats: int, beat: int, broker_pidfd: int, timeout: float) -> None:
    """The fallback: a fork of the broker running the same loop as broker_warden.c."""
    if os.fork() != 0:
        return
    status = 0
    try:
        os.close(beat)
        # Nothing of the broker's but the pipe and the pidfd (no channel, no log).
        linux.close_all_except({0, 1, 2, beats, broker_pidfd})
        title = ctypes.create_string_buffer(b"zviz-warden")
        linux.prctl(linux.PR_SET_NAME, ctypes.addressof(title))
        poller = select.poll()
        poller.register(beats, select.POLLIN)
        # No deadline before the first beat: between `create` and `start` the broker
        # waits for the listener, for as long as the container is not started, and
        # no call can be pending before the broker serves.
        limit = -1
        while True:
            if not poller.poll(limit):
                linux.pidfd_send_signal(broker_pidfd, signal.SIGKILL)
                break
            try:
                if not os.read(beats, 4096):
                    break  # the broker exited
            except BlockingIOError:
                pass
            limit = int(timeout * 1000)
    except BaseException:  # noqa: BLE001 - the warden never runs the broker's code
        status = 1
    finally:
        os._exit(status)
