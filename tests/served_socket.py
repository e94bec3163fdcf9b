"""A socket served on a thread: the tests' stand-in servers (DNS, HTTP, listeners)."""

import contextlib
import socket
import threading
from collections.abc import Callable


class ServedSocket:
    """Calls SERVE_ONE(sock) on a thread, again and again, until close().

    close() wakes the thread (shutdown makes a waiting accept fail and a waiting recvfrom
    return b""), waits for it to return, and only then closes the socket. Closing first
    is a race: a thread about to call recvfrom or accept on the fd number may find the
    number given to another socket by then, and read from that. Seen in a `make test`
    run: test_egress's DNS thread took a datagram off a unix socket test_exec_anchor had
    just made, and died trying to answer it.

    SERVE_ONE handles its own errors; an OSError it raises once close() began ends the
    thread, any other error is the test's failure (pytest reports a thread's exception).
    """

    def __init__(self, sock: socket.socket, serve_one: Callable[[socket.socket], None]):
        self.sock = sock
        self._serve_one = serve_one
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                self._serve_one(self.sock)
            except OSError:
                if self._closing.is_set():
                    return
                raise

    def close(self) -> None:
        self._closing.set()
        # An unconnected datagram socket answers ENOTCONN, and is shut down all the same.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            # Left open on purpose: closing under the thread is the race this class avoids.
            raise RuntimeError(f"the thread serving {self.sock} did not stop within 30 s")
        self.sock.close()

    def __enter__(self) -> "ServedSocket":
        return self

    def __exit__(self, *_) -> None:
        self.close()
