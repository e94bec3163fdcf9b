"""The sync channel between the zviz parent and the processes that become a container.

One SOCK_SEQPACKET socketpair: every message is one JSON object in one packet, so
several processes (the namespace child and PID 1) can share the child end without
framing. A failure in any child stage travels back as
{"type": "error", "stage", "message", "errno", "kind"} and the parent raises it as
the matching ZvizError: the user reads "mount(/proc): ... Operation not permitted",
never a traceback from a forked child.

Which messages exist, in which direction and with which fields is declared once, in
runtime/spawn/messages.py; send() and expect() refuse anything else.

`_socket` instead of `socket`: the high-level module costs ~1.5 ms of import on the
`zviz run` path and nothing here needs it.
"""

import _socket
import array
import errno as _errno
import json
import os
import select

from runtime import errors
from runtime.spawn.messages import TO_CHILD, TO_PARENT, MessageError, declared

_MAX_PACKET = 65536


class Sync:
    """One end of the channel. Owns its fd; close() it (the child end dies with exec)."""

    def __init__(self, fd: int, sends: str):
        self.fd = fd
        # The direction of what this end sends (runtime/spawn/messages.py); it receives
        # the other.
        self.sends = sends
        self.receives = TO_PARENT if sends == TO_CHILD else TO_CHILD

    @staticmethod
    def pair() -> tuple["Sync", "Sync"]:
        """(the parent's end, the children's end)."""
        parent, child = _socket.socketpair(
            _socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC
        )
        return Sync(parent.detach(), TO_CHILD), Sync(child.detach(), TO_PARENT)

    def send(self, kind: str, /, **fields) -> None:
        declared(kind).check(fields, self.sends, with_fds=False)
        fields["type"] = kind
        os.write(self.fd, json.dumps(fields).encode())

    def recv(self, timeout: float | None = None) -> dict | None:
        """The next message, or None when every peer has closed its end (EOF).

        timeout: seconds to wait for it (None: forever); past it, FailedPrecondition.
        """
        if timeout is not None:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            if not poller.poll(max(0, int(timeout * 1000))):
                raise errors.FailedPrecondition(
                    f"container setup: no word from the container's processes in {timeout:g} s"
                    " (a child is stuck): gave up"
                )
        data = _read_past_reset(lambda: os.read(self.fd, _MAX_PACKET))
        if not data:
            return None
        return self._received(json.loads(data))

    def _received(self, message: dict) -> dict:
        if declared(message["type"]).direction != self.receives:
            raise MessageError(f"sync: {message['type']!r} arrived at the wrong end")
        return message

    def expect(self, kind: str) -> dict:
        """Receive one message that must be `kind`; a child error or EOF raises."""
        if declared(kind).direction != self.receives:
            raise MessageError(f"sync: {kind!r} is not sent to this end ({self.receives})")
        message = self.recv()
        if message is None:
            raise errors.FailedPrecondition(f"container setup: peer exited before sending {kind!r}")
        if message["type"] == "error":
            raise error_from_message(message)
        if message["type"] != kind:
            raise errors.FailedPrecondition(
                f"container setup: expected {kind!r}, got {message['type']!r}"
            )
        return message

    def send_error(self, stage: str, exc: BaseException) -> bool:
        """Report `exc` raised during `stage`; False when nobody listens. Never raises."""
        kind = type(exc).__name__ if isinstance(exc, errors.ZvizError) else None
        if isinstance(exc, OSError):
            message = exc.strerror if exc.strerror else str(exc)
            if exc.filename and exc.filename not in message:
                message = f"{message}: {exc.filename}"
            errno_value = exc.errno
        else:
            message, errno_value = str(exc) or type(exc).__name__, None
        try:
            self.send("error", stage=stage, message=message, errno=errno_value, kind=kind)
        except OSError:
            return False
        return True

    def send_fds(self, kind: str, fds: list[int], /, **fields) -> None:
        """A message carrying open file descriptors (SCM_RIGHTS)."""
        declared(kind).check(fields, self.sends, with_fds=True)
        fields["type"] = kind
        sock = _socket.socket(fileno=self.fd)
        try:
            payload = json.dumps(fields).encode()
            sock.sendmsg(
                [payload], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))]
            )
        finally:
            sock.detach()

    def recv_fds(self, max_fds: int = 4) -> tuple[dict | None, list[int]]:
        sock = _socket.socket(fileno=self.fd)
        try:
            cmsg_space = _socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
            data, ancillary, _, _ = _read_past_reset(lambda: sock.recvmsg(_MAX_PACKET, cmsg_space))
        finally:
            sock.detach()
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        return (self._received(json.loads(data)) if data else None), list(fds)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_past_reset(read):
    """read(), once more after ECONNRESET.

    A peer that closes its end with packets we sent still unread (a child failing before
    it reads its next instruction) leaves ECONNRESET on our socket, and a SEQPACKET
    receive reports that pending error *before* the packets already queued: the child's
    own error message would be lost to "Connection reset by peer". The kernel clears the
    error as it reports it, so the next read returns what was queued, or EOF.
    """
    try:
        return read()
    except ConnectionResetError:
        return read()


def error_from_message(message: dict) -> errors.ZvizError:
    """Turn a child's structured error into the ZvizError the parent raises."""
    kind = getattr(errors, message.get("kind") or "", None)
    if not (isinstance(kind, type) and issubclass(kind, errors.ZvizError)):
        kind = errors.FailedPrecondition
        if message.get("errno") in (_errno.ENOENT,):
            kind = errors.NotFound
        elif message.get("errno") in (_errno.EINVAL,):
            kind = errors.InvalidArgument
    stage = message.get("stage") or "setup"
    return kind(f"{stage}: {message.get('message')}")
