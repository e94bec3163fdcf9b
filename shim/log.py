"""The daemon's log: logrus text lines into a bundle's `log` fifo, which containerd copies
into its own log (the format containerd's Go shims write, so one parser reads both).

A daemon serves several containers, each with its own `log` fifo. Lines go to the
oldest fifo whose reader is still there; when containerd closes one (its container is
gone) the next takes over. A full fifo drops the line rather than stall the daemon.
"""

import contextlib
import datetime
import errno
import logging
import os

RUNTIME = "io.containerd.zviz.v2"


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-._/:@" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogrusFormatter(logging.Formatter):
    _levels = {
        logging.DEBUG: "debug",
        logging.INFO: "info",
        logging.WARNING: "warning",
        logging.ERROR: "error",
        logging.CRITICAL: "fatal",
    }

    def __init__(self, namespace: str) -> None:
        super().__init__()
        self.namespace = namespace

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        fields = [
            f'time="{when.strftime("%Y-%m-%dT%H:%M:%S.%f")}000Z"',
            f"level={self._levels.get(record.levelno, 'info')}",
            f"msg={_quote(message)}",
        ]
        container = getattr(record, "container", None)
        if container:
            fields.append(f"id={_quote(container)}")
        fields.append(f"namespace={_quote(self.namespace)}")
        fields.append(f"pid={os.getpid()}")
        fields.append(f"runtime={RUNTIME}")
        return " ".join(fields) + "\n"


class FifoSink(logging.Handler):
    """Writes each record to the first open log fifo that still has a reader."""

    def __init__(self, namespace: str, first_fd: int | None = None) -> None:
        super().__init__()
        self.setFormatter(LogrusFormatter(namespace))
        self._fds: list[tuple[str, int]] = []
        if first_fd is not None:
            self._fds.append(("", first_fd))

    # Under the handler's lock, which emit() runs under: records also come from the Task
    # service's worker threads, and emit() must never write to an fd closed (and maybe
    # reused) here meanwhile.

    def add_bundle(self, container_id: str, bundle: str) -> None:
        try:
            fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        with self.lock:
            self._fds.append((container_id, fd))

    def remove(self, container_id: str) -> None:
        with self.lock:
            keep = []
            for owner, fd in self._fds:
                if owner == container_id:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                else:
                    keep.append((owner, fd))
            self._fds = keep

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode(errors="replace")
        except Exception:
            return
        while self._fds:
            owner, fd = self._fds[0]
            try:
                os.write(fd, line)
                return
            except BlockingIOError:
                return  # containerd is behind: drop the line, never stall the loop
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.EBADF):
                    return
                self._fds.pop(0)
                with contextlib.suppress(OSError):
                    if owner:
                        os.close(fd)
                    else:
                        # fd 2 stays a valid fd (Python and forked children write there),
                        # just no longer into a fifo nobody reads.
                        devnull = os.open(os.devnull, os.O_WRONLY)
                        os.dup2(devnull, 2)
                        os.close(devnull)


def setup(namespace: str, debug: bool) -> FifoSink:
    sink = FifoSink(namespace, first_fd=2)
    root = logging.getLogger()
    root.handlers[:] = [sink]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return sink


class CoreLog:
    """The runtime core's log interface (runtime/log.py) onto this daemon's log, for one
    container: what the core says of a create (with `-debug`, each step and its time)
    lands in containerd's log with the container's id."""

    path = None  # the broker keeps its --verbose lines on stderr, as without a log

    def __init__(self, container_id: str, logger: logging.Logger | None = None) -> None:
        self.container_id = container_id
        self.logger = logger or logging.getLogger("runtime")

    def __call__(self, level: str, message: str) -> None:
        self.write(level, message)

    def write(self, level: str, message: str) -> None:
        number = logging.getLevelName(level.upper())
        number = number if isinstance(number, int) else logging.ERROR
        self.logger.log(number, message, extra={"container": self.container_id})

    def debug(self, message: str) -> None:
        self.write("debug", message)

    def info(self, message: str) -> None:
        self.write("info", message)

    def warning(self, message: str) -> None:
        self.write("warning", message)

    def error(self, message: str) -> None:
        self.write("error", message)
