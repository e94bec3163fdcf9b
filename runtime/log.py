"""zviz's own log, as runc writes it: `--log FILE` and `--log-format text|json`.

containerd's runc shim runs the runtime with `--log <file> --log-format json` and,
on failure, reports the `msg` of the last `"level":"error"` line of that file, so an
error must land there as one JSON object per line. Errors also go to stderr (the
CLI's caller sees them either way). No `logging` import: it costs milliseconds on
every `zviz run`.
"""

import json
import os
import sys
import time

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Log:
    def __init__(self, path: str | None = None, fmt: str = "text", debug: bool = False):
        self.path = path
        self.fmt = fmt
        self.threshold = _LEVELS["debug" if debug else "warning"]

    def __call__(self, level: str, message: str) -> None:
        self.write(level, message)

    def write(self, level: str, message: str) -> None:
        if _LEVELS.get(level, 40) < self.threshold:
            return
        if self.path:
            self._append(level, message)
        if level == "error" or not self.path:
            try:
                sys.stderr.write(
                    f"zviz: {level}: {message}\n" if level != "error" else f"zviz: {message}\n"
                )
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def error(self, message: str) -> None:
        self.write("error", message)

    def info(self, message: str) -> None:
        self.write("info", message)

    def warning(self, message: str) -> None:
        self.write("warning", message)

    def debug(self, message: str) -> None:
        self.write("debug", message)

    def _append(self, level: str, message: str) -> None:
        stamp = _now()
        if self.fmt == "json":
            line = json.dumps({"level": level, "msg": message, "time": stamp})
        else:
            line = f"time={json.dumps(stamp)} level={level} msg={json.dumps(message)}"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


NULL = Log(None, "text", False)
