"""The node's audit reader: one multicast reader for every shim daemon (docs/denials.md).

Without it each shim daemon with a container joins the kernel's audit log group, and
the kernel copies every record of the node to each of them, which each then sorts out:
with 100 pods, 100 readers of one container's flood. With it, one process per node
reads the group and hands each daemon the records of the audit sessions it watches
(`Router`); a record of a session nobody watches (an exec whose session its daemon has
not learnt yet, a record without a session, a Landlock event without its SYSCALL
record) goes to every daemon, which decides as before (runtime/denials.py).

Who runs it: the first daemon that needs it and cannot reach it starts it
(`python -m shim.audit_reader`) and reads the kernel itself meanwhile; the reader holds
an flock on DIR/lock for its whole life, so a second one started in a race exits at
once. It exits when its last daemon disconnects (nothing is left running between
containers). A daemon whose reader dies (EOF) reads the kernel itself at once, starts a
new reader and moves to it when it answers (records read by both in the overlap are
skipped by serial). What the reader could not hand a daemon (its socket full) is counted
and told to that daemon in its next datagram, as are the kernel's overruns of the
reader's own socket: lost records are counted, never silent. Only the records the
kernel multicast in the moment between a reader's death and its daemons' own readers
opening are lost uncounted (nobody was listening).

Protocol (SOCK_SEQPACKET, root peers only): a daemon sends `S <session> <session>...`
(the full set it watches, again at each change); the reader sends datagrams of lines
`<type> <record text>`, and `0 lost=<n>` for what was lost since the last one.
"""

import argparse
import errno
import os
import selectors
import socket
import struct
import subprocess
import sys
import time

from runtime import denials
from runtime.private_dir import makedirs_private

DIR_VARIABLE = "ZVIZ_AUDIT_READER_DIR"
DEFAULT_DIR = "/run/zviz/audit-reader"
# "0": every daemon reads the kernel's records itself (the way before the node reader).
SWITCH = "ZVIZ_NODE_AUDIT_READER"
LOCK_NAME = "lock"
SOCKET_NAME = "sock"
LOG_NAME = "reader.log"
MAX_DATAGRAM = 60 << 10
CLIENT_BUFFER = 4 << 20  # per daemon: the same room a daemon's own audit socket had
READ_BATCH = 1024
# A daemon's subscription datagram at most (~90 000 sessions); a longer one is cut by
# the socket and the sessions past the cut get their records as everyone's.
SUBSCRIPTION_MAX = 1 << 20
# A reader nobody connects to (its starter went away) does not stay.
FIRST_CLIENT_SECONDS = 10.0


def directory() -> str:
    return os.environ.get(DIR_VARIABLE, DEFAULT_DIR)


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") not in ("0", "off", "false", "no")


class ReaderGone(Exception):
    """The node's reader closed the connection (it died or exited)."""


# --- The reader ---


class Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sessions: set[int] = set()
        self.outbox: list[bytes] = []
        self.unreported_lost = 0
        self.lost = 0  # everything this daemon missed, for the reader's log


class Router:
    """Which daemon gets which record: by the audit session it carries (seccomp) or its
    event's SYSCALL record carries (Landlock), else every daemon."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.clients: list[Client] = []
        self._by_session: dict[int, Client] = {}
        self._open: dict[int, list] = {}  # Landlock serial -> [arrived, records]
        self.routed = 0
        self.broadcast = 0

    def add(self, client: Client) -> None:
        self.clients.append(client)

    def remove(self, client: Client) -> None:
        self.clients.remove(client)
        self.subscribe(client, set())

    def subscribe(self, client: Client, sessions: set[int]) -> None:
        for session in client.sessions - sessions:
            if self._by_session.get(session) is client:
                del self._by_session[session]
        for session in sessions:
            self._by_session[session] = client
        client.sessions = sessions

    def route(self, kind: int, text: str) -> None:
        if kind == denials.AUDIT_SECCOMP:
            self._to(self._by_session.get(denials._number_after(text, " ses=")), [(kind, text)])
        elif kind == denials.AUDIT_LANDLOCK_ACCESS:
            if len(self._open) >= denials.LANDLOCK_OPEN_MAX:
                self.expire(everything=True)
            self._open[denials.serial_of(text)] = [self.clock(), [(kind, text)]]
        elif kind == denials.AUDIT_LANDLOCK_DOMAIN:
            event = self._open.get(denials.serial_of(text))
            if event is None:
                self._to(None, [(kind, text)])  # a domain's end: every daemon forgets it
            else:
                event[1].append((kind, text))
        elif kind in (denials.AUDIT_SYSCALL, denials.AUDIT_EOE) and self._open:
            event = self._open.pop(denials.serial_of(text), None)
            if event is None:
                return  # another audited event of the node: nobody's
            if kind == denials.AUDIT_SYSCALL:
                event[1].append((kind, text))
                self._to(self._by_session.get(denials._number_after(text, " ses=")), event[1])
            else:
                self._to(None, event[1])  # no SYSCALL record: its domain decides
        # Any other type: no daemon reads it.

    def expire(self, everything: bool = False) -> None:
        """Landlock events that waited long enough for a SYSCALL record go to every daemon."""
        now = self.clock()
        for serial, event in list(self._open.items()):
            if everything or now - event[0] >= denials.LANDLOCK_EVENT_SECONDS:
                del self._open[serial]
                self._to(None, event[1])

    def lost(self, count: int) -> None:
        """The kernel overran the reader's socket: any daemon may have lost records."""
        for client in self.clients:
            client.unreported_lost += count
            client.lost += count

    def _to(self, client: Client | None, records: list[tuple[int, str]]) -> None:
        lines = [b"%d %s\n" % (kind, text.encode()) for kind, text in records]
        if client is not None:
            self.routed += len(records)
            client.outbox += lines
            return
        self.broadcast += len(records)
        for each in self.clients:
            each.outbox += lines

    def flush(self) -> list[Client]:
        """Send each daemon its records; the daemons whose connection failed."""
        failed = []
        for client in self.clients:
            if not client.outbox and not client.unreported_lost:
                continue
            lines, client.outbox = client.outbox, []
            for chunk in _chunks(lines):
                if client.unreported_lost:
                    chunk.insert(0, b"0 lost=%d\n" % client.unreported_lost)
                try:
                    client.sock.send(b"".join(chunk))
                except BlockingIOError:
                    # The daemon is behind (its socket full): these records are lost to
                    # it, and it is told how many with the next datagram that fits.
                    dropped = sum(1 for line in chunk if not line.startswith(b"0 "))
                    client.unreported_lost += dropped
                    client.lost += dropped
                    continue
                except OSError:
                    failed.append(client)
                    break
                client.unreported_lost = 0
        return failed


def _chunks(lines: list[bytes]) -> list[list[bytes]]:
    chunks, current, size = [], [], 0
    for line in lines:
        if current and size + len(line) > MAX_DATAGRAM - 64:
            chunks.append(current)
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append(current)
    return chunks or [[]]


def _peer_is_root(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == 0


LOG_MAX_BYTES = 1 << 20  # then the log moves to reader.log.1 (one old one kept)


def _log(path: str, message: str) -> None:
    try:
        if os.path.getsize(path) > LOG_MAX_BYTES:
            os.replace(path, path + ".1")
    except OSError:
        pass
    try:
        with open(path, "a") as f:
            f.write(f"{denials.rfc3339(time.time())} pid {os.getpid()}: {message}\n")
    except OSError:
        pass


def serve(where: str) -> int:
    """Run the node's reader in `where` until its last daemon leaves (0), or return 0 at
    once when another holds the lock; 1 when the kernel's records cannot be read."""
    import fcntl

    makedirs_private(where)
    log_path = os.path.join(where, LOG_NAME)
    lock = os.open(os.path.join(where, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another reader runs (or is starting): its daemons reach it
    try:
        kernel = denials.KernelRecords()
    except denials.KernelRecordsUnavailable as e:
        _log(log_path, f"cannot read the kernel's records: {e}")
        return 1
    path = os.path.join(where, SOCKET_NAME)
    try:
        os.unlink(path)  # a dead reader's: the lock says nobody serves it
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(256)
    listener.setblocking(False)
    os.ftruncate(lock, 0)
    os.write(lock, b"%d\n" % os.getpid())  # who holds it, for an operator (and the tests)
    _log(log_path, "reading the node's audit records")
    router = Router()
    selector = selectors.DefaultSelector()
    selector.register(kernel.fileno(), selectors.EVENT_READ, "kernel")
    selector.register(listener, selectors.EVENT_READ, "listener")
    started, served, kernel_lost = time.monotonic(), False, 0
    while True:
        timeout = denials.LANDLOCK_EVENT_SECONDS if router._open else 1.0
        for key, _ in selector.select(timeout):
            if key.data == "kernel":
                for kind, text in kernel.read(READ_BATCH):
                    router.route(kind, text)
                if kernel.lost > kernel_lost:
                    router.lost(kernel.lost - kernel_lost)
                    kernel_lost = kernel.lost
            elif key.data == "listener":
                _accept(listener, router, selector)
                served = True
            else:
                _from_client(key.data, router, selector)
        router.expire()
        for client in router.flush():
            _drop(client, router, selector)
        if (served and not router.clients) or (
            not served and time.monotonic() - started > FIRST_CLIENT_SECONDS
        ):
            break
    # Unlink first (ours: the lock kept any other reader from binding it): a daemon
    # connecting from now on starts the next reader.
    os.unlink(path)
    listener.close()
    _log(log_path, f"no daemon left: exiting ({router.routed} records routed, "
         f"{router.broadcast} to every daemon, {kernel_lost} overruns)")  # fmt: skip
    return 0


def _accept(listener, router: Router, selector) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        if not _peer_is_root(sock):
            sock.close()
            continue
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, 32, CLIENT_BUFFER)  # SO_SNDBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_BUFFER)
        client = Client(sock)
        router.add(client)
        selector.register(sock, selectors.EVENT_READ, client)


def _from_client(client: Client, router: Router, selector) -> None:
    try:
        data = client.sock.recv(SUBSCRIPTION_MAX)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        _drop(client, router, selector)
        return
    if data.startswith(b"S"):
        router.subscribe(client, {int(s) for s in data[1:].split() if s.isdigit()})


def _drop(client: Client, router: Router, selector) -> None:
    if client in router.clients:
        router.remove(client)
        selector.unregister(client.sock)
        client.sock.close()


# --- A daemon's end ---


class NodeReaderClient:
    """A daemon's connection to the node's reader; reads like denials.KernelRecords."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lost = 0

    @classmethod
    def connect(cls, where: str) -> "NodeReaderClient | None":
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        try:
            sock.connect(os.path.join(where, SOCKET_NAME))
        except OSError:
            sock.close()
            return None
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, CLIENT_BUFFER)  # SO_RCVBUFFORCE
        except OSError:
            pass
        return cls(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def subscribe(self, sessions) -> None:
        message = b"S " + b" ".join(b"%d" % s for s in sorted(sessions))
        try:
            self.sock.send(message)
        except BlockingIOError:
            pass  # the reader reads its daemons' few messages at once: never seen full
        except OSError as e:
            raise ReaderGone(str(e)) from None

    def read(self, limit: int = 1 << 30) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        while len(out) < limit:
            try:
                data = self.sock.recv(MAX_DATAGRAM + 4096)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.EPIPE):
                    data = b""
                else:
                    raise
            if not data:
                if out:
                    return out  # the records first; the next read reports the end
                raise ReaderGone("the node's audit reader closed the connection")
            # "\n" only: the kernel hex-encodes any string with control characters.
            for line in data.decode(errors="replace").split("\n"):
                kind, _, text = line.partition(" ")
                if kind == "0":
                    self.lost += int(text.partition("=")[2] or 0)
                elif kind.isdigit() and text:
                    out.append((int(kind), text))
        return out

    def close(self) -> None:
        self.sock.close()


def start(where: str) -> None:
    """Start a reader in `where`, detached (its own session; it exits with its last
    daemon). Its environment is only what it needs: it outlives the daemon that
    started it and serves every daemon of the node."""
    import shim

    source = os.path.dirname(os.path.dirname(os.path.abspath(shim.__file__)))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": source,
        DIR_VARIABLE: where,
    }
    subprocess.Popen(
        [sys.executable, "-m", "shim.audit_reader"],
        cwd="/",
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the node's audit reader (shim daemons start it)")
    parser.parse_args(argv)
    return serve(directory())


if __name__ == "__main__":
    sys.exit(main())
