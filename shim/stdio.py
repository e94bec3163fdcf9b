"""A process's stdio, wherever containerd asks for it to go.

containerd names each stream by a string: a fifo path (or `fifo://path`), `file://path`,
`binary://path?arg=value` (a logger process), or "" for none.

Without a terminal the shim copies no output of a container's PID 1: it gets fds on the
stdout and stderr fifos or files themselves, so output costs the shim no CPU and no
memory. An exec's output fifos are copied from pipes (`copy_output`), as runc's shim
copies every process's: an exec forked by the container's exec anchor is in PID 1's
Landlock domain, whose rules name PID 1's fifos only, so `echo > /dev/stdout` (a reopen
of the fd's path) would be refused on an exec's own fifo; a pipe has no path. The
shim keeps a read end of each output fifo, so the process never gets EPIPE when the
reader (ctr) goes away, and holds no write end, so the reader sees EOF exactly when the
process (and its children) are done.
An output fifo is opened only once the client's reader is there (`_open_output_fifo`),
as containerd's runc shim does: a reader whose open comes after the process has already
written and exited would wait for a writer that never comes, and lose the output. And a
process's Delete waits until the client has taken what is left in its fifos
(`hand_over_output`): containerd's client gives up on a reader it has not seen open by
then, even one the kernel has opened already.
stdin is a pipe the loop fills from the stdin fifo: the process sees EOF when the
client closes the fifo or when containerd calls CloseIO, whichever comes first.
With a terminal the process's pty master comes back over a console socket and the loop
copies stdin fifo → master → stdout fifo, never blocking.
"""

import array
import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import struct
import termios
import urllib.parse

from runtime.errors import InvalidArgument, Unavailable
from runtime.private_dir import makedirs_private

log = logging.getLogger("shim.stdio")

LOGGER_READY_TIMEOUT = 10.0
PUMP_CHUNK = 65536
# How long an output fifo's opening waits for the client's reader. containerd's clients
# (ctr, CRI, nerdctl) start opening theirs before they call Create or Exec, so it is
# there at once unless the client is starved of CPU; a client that never opens it gets
# the old behaviour after this long (the output waits in the fifo for a late reader).
CLIENT_READER_TIMEOUT = 10.0
CLIENT_READER_POLL = (0.001, 0.05)  # first and longest wait between two tries
# How long Delete waits for the client to take a process's output left in its fifos
# (runc's shim waits as long for its copy of an exec's output to end).
HAND_OVER_TIMEOUT = 10.0


def parse_uri(value: str) -> tuple[str, str, list[str]]:
    """(scheme, path, args) of a stdio string; scheme is "", "fifo", "file" or "binary"."""
    if not value:
        return "", "", []
    if "://" not in value:
        return "fifo", value, []
    parsed = urllib.parse.urlsplit(value)
    scheme = parsed.scheme
    if scheme not in ("fifo", "file", "binary"):
        raise InvalidArgument(
            f"stdio {value!r}: unsupported scheme {scheme!r} (fifo, file or binary)"
        )
    path = urllib.parse.unquote(parsed.path)
    if not path:
        raise InvalidArgument(f"stdio {value!r}: no path")
    args: list[str] = []
    for key, val in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True):
        args.append(key)
        if val:
            args.append(val)
    return scheme, path, args


class Pump:
    """Copy bytes from fd `src` to fd `dst` in the loop; both nonblocking; never blocks.

    Ends at EOF (or EIO: a pty master whose slave side is closed) on `src`, then calls
    `on_done`. A `dst` whose reader is gone (EPIPE) drops the bytes rather than stop
    the source, as the process must not stall on an absent reader.
    """

    def __init__(self, loop, src: int, dst: int, on_done=None) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self.on_done = on_done
        self.buffer = b""
        self.done = False
        os.set_blocking(src, False)
        os.set_blocking(dst, False)
        loop.add_reader(src, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.src, PUMP_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.stop()
            return
        self.buffer = data
        self._flush()

    def _flush(self) -> None:
        while self.buffer:
            try:
                written = os.write(self.dst, self.buffer)
            except BlockingIOError:
                self.loop.remove_reader(self.src)
                self.loop.add_writer(self.dst, self._writable)
                return
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.EIO):
                    log.warning("stdio copy: write: %s", e)
                self.buffer = b""
                return
            self.buffer = self.buffer[written:]

    def _writable(self) -> None:
        self.loop.remove_writer(self.dst)
        self._flush()
        if not self.buffer and not self.done:
            self.loop.add_reader(self.src, self._readable)

    def stop(self) -> None:
        if self.done:
            return
        self.done = True
        self.loop.remove_reader(self.src)
        self.loop.remove_writer(self.dst)
        if self.on_done is not None:
            self.on_done()


def _unread_bytes(fifo: int) -> int:
    """Bytes in the pipe buffer of FIFO (either end)."""
    return struct.unpack("i", fcntl.ioctl(fifo, termios.FIONREAD, b"\0" * 4))[0]


class Stdio:
    """The fds one process gets, and what the shim holds to serve them until Delete."""

    def __init__(
        self, stdin: str, stdout: str, stderr: str, terminal: bool, copy_output: bool = False
    ) -> None:
        self.stdin = stdin
        self.copy_output = copy_output
        self.stdout = stdout
        self.stderr = stderr
        self.terminal = terminal
        self.child = [-1, -1, -1]  # fds handed to the process, closed once it has them
        # Read ends the shim holds for the process's lifetime, by fifo path.
        self._kept: list[tuple[str, int]] = []
        self._stdin_pump: Pump | None = None
        self._console_listener: socket.socket | None = None
        self.console_socket: str | None = None
        self.master = -1
        self._pumps: list[Pump] = []
        self._terminal_out = -1  # the terminal's output target, until its copy starts
        self.logger_pid = 0

    # ---- opening -------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        stdin: str,
        stdout: str,
        stderr: str,
        *,
        terminal: bool,
        container_id: str,
        namespace: str,
        console_dir: str,
        reaper=None,
        copy_output: bool = False,
    ) -> "Stdio":
        stdio = cls(stdin, stdout, stderr, terminal, copy_output)
        try:
            await stdio._open(container_id, namespace, console_dir, reaper)
        except BaseException:
            stdio.close()
            raise
        return stdio

    async def _open(self, container_id, namespace, console_dir, reaper) -> None:
        if self.terminal:
            self._listen_console(console_dir, container_id)
            # The pty slave becomes the process's stdio; until then it holds nothing of ours.
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self.child = [devnull, devnull, devnull]
            # Opened now, not when the copy starts: the client's reader must be there
            # before the process runs (the same wait as without a terminal).
            scheme, path, _ = parse_uri(self.stdout)
            if scheme == "binary":
                # Not copied to a logger yet: say so rather than lose the output silently.
                log.warning("terminal output to %s is not supported: it is discarded", self.stdout)
                scheme = ""
            self._terminal_out = await self._open_output(
                scheme, path, lambda: os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            )
            return
        devnull = None

        def null() -> int:
            nonlocal devnull
            if devnull is None:
                devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            return devnull

        scheme, path, _ = parse_uri(self.stdin)
        if scheme == "":
            self.child[0] = null()
        elif scheme == "fifo":
            self.child[0] = self._open_stdin_fifo(path)
        else:
            raise InvalidArgument(f"stdin {self.stdin!r}: only a fifo can be stdin")

        out_scheme, out_path, out_args = parse_uri(self.stdout)
        err_scheme, err_path, err_args = parse_uri(self.stderr)
        if out_scheme == "binary" or err_scheme == "binary":
            uri = self.stdout if out_scheme == "binary" else self.stderr
            await self._start_logger(uri, container_id, namespace, reaper)
            # A stream that does not go to the logger: its pipe end must go, or the
            # logger never sees that stream end (and the shim keeps the fd for good).
            for stream, (scheme, path) in (
                (1, (out_scheme, out_path)),
                (2, (err_scheme, err_path)),
            ):
                if scheme != "binary":
                    unused, self.child[stream] = self.child[stream], -1
                    os.close(unused)
                    self.child[stream] = await self._open_output(scheme, path, null)
            return
        self.child[1] = await self._open_output(out_scheme, out_path, null)
        if (err_scheme, err_path) == (out_scheme, out_path) and err_scheme == "file":
            self.child[2] = self.child[1]
        else:
            self.child[2] = await self._open_output(err_scheme, err_path, null)

    def _open_stdin_fifo(self, path: str) -> int:
        """The process's stdin: a pipe the loop fills from the fifo, so that either the
        client closing the fifo or CloseIO ends it (runc's shim behaves the same)."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self._copy_stdin(path, write_end)
        return read_end

    def _copy_stdin(self, path: str, destination: int) -> None:
        # O_NONBLOCK: the open must not wait for a writer. The loop hears of the fifo only
        # when data comes or its writers leave (a fifo no writer has opened yet reports
        # neither), so the copy cannot end before the client has even connected.
        fifo = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

        def done() -> None:
            os.close(fifo)
            os.close(destination)

        self._stdin_pump = Pump(asyncio.get_running_loop(), fifo, destination, done)

    async def _open_output(self, scheme: str, path: str, null) -> int:
        if scheme == "":
            return null()
        if scheme == "fifo":
            fifo = await self._open_output_fifo(path)
            # A terminal's output is copied from the pty master already.
            return self._copied_from_pipe(fifo) if self.copy_output and not self.terminal else fifo
        if scheme == "file":
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        raise InvalidArgument(f"stdio: unsupported scheme {scheme!r}")

    def _copied_from_pipe(self, fifo: int) -> int:
        """The write end of a pipe the loop copies into FIFO (closed at the pipe's EOF:
        the client's EOF comes when every writer of the pipe is gone, as without it)."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)

        def done() -> None:
            os.close(read_end)
            os.close(fifo)

        self._pumps.append(Pump(asyncio.get_running_loop(), read_end, fifo, done))
        os.set_blocking(write_end, True)
        return write_end

    async def _open_output_fifo(self, path: str) -> int:
        """The write end of an output fifo, opened once the client's reader is there.

        containerd's client opens its reader (containerd/fifo: a blocking open in a
        goroutine) before it calls Create or Exec. If that open came only after every
        writer had gone (the process wrote, exited, and the shim's copy was closed), it
        would wait for the next writer, which never comes; the client then cancels it
        and prints nothing, though the exit status is right (issue 16: `ctr task exec
        ... echo up` answered 0 with an empty stdout once in 400 execs, 50 containers
        busy). A non-blocking open for writing fails with ENXIO until some reader is
        there, so it is tried again until the client's is; only then does the shim open
        its own (which would answer that question for good).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLIENT_READER_TIMEOUT
        pause, longest = CLIENT_READER_POLL
        while True:
            try:
                writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                break
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
            if loop.time() >= deadline:
                log.warning(
                    "stdio %s: no reader after %gs: output waits in the fifo for a late one",
                    path,
                    CLIENT_READER_TIMEOUT,
                )
                writer = -1
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)
        keep = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._kept.append((path, keep))
        if writer < 0:
            # A reader (ours) exists now, so this open cannot block.
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        os.set_blocking(writer, True)  # the process's stdout: it must not see EAGAIN
        return writer

    async def _start_logger(self, uri: str, container_id: str, namespace: str, reaper) -> None:
        """A logger process reads the process's stdout on fd 3 and stderr on fd 4, and closes
        fd 5 once it is ready (the contract of containerd's runc shim)."""
        _, path, args = parse_uri(uri)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        self.child[1], self.child[2] = out_w, err_w
        env = dict(os.environ, CONTAINER_ID=container_id, CONTAINER_NAMESPACE=namespace)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.logger_pid = os.posix_spawn(
                path,
                [path, *args],
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, devnull, 1),
                    (os.POSIX_SPAWN_DUP2, devnull, 2),
                    (os.POSIX_SPAWN_DUP2, out_r, 3),
                    (os.POSIX_SPAWN_DUP2, err_r, 4),
                    (os.POSIX_SPAWN_DUP2, ready_w, 5),
                ],
                setsid=True,
                # Python ignores SIGPIPE; a logger must not inherit that.
                setsigdef=(signal.SIGPIPE,),
            )
        except OSError as e:
            raise InvalidArgument(
                f"stdout {uri!r}: cannot start logger {path}: {e.strerror}"
            ) from e
        finally:
            for fd in (devnull, out_r, err_r, ready_w):
                os.close(fd)
        if reaper is not None:
            reaper.register(self.logger_pid, lambda status: None)
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def readable() -> None:
            with contextlib.suppress(BlockingIOError):
                if not os.read(ready_r, 64) and not ready.done():
                    ready.set_result(None)

        os.set_blocking(ready_r, False)
        loop.add_reader(ready_r, readable)
        try:
            async with asyncio.timeout(LOGGER_READY_TIMEOUT):
                await ready
        except TimeoutError:
            raise Unavailable(
                f"stdout {uri!r}: logger {path} did not get ready in {LOGGER_READY_TIMEOUT:g}s"
            ) from None
        finally:
            loop.remove_reader(ready_r)
            os.close(ready_r)

    # ---- terminal ------------------------------------------------------------------

    def _listen_console(self, console_dir: str, container_id: str) -> None:
        path = os.path.join(console_dir, f"{os.getpid()}-{id(self):x}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            for _ in range(3):  # another daemon, exiting, may remove the empty directory
                makedirs_private(console_dir)
                try:
                    listener.bind(path)
                    break
                except FileNotFoundError:
                    continue
            else:
                listener.bind(path)
        except BaseException:
            listener.close()
            raise
        finally:
            os.umask(old)
        listener.listen(1)
        self._console_listener = listener
        self.console_socket = path

    def receive_console(self) -> None:
        """Take the pty master the process sent to the console socket, and start copying."""
        listener = self._console_listener
        if listener is None:
            return
        listener.settimeout(5.0)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            raise Unavailable("terminal: the container never sent its pty master") from None
        with conn:
            conn.settimeout(5.0)
            fds = array.array("i")
            _, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not fds:
            raise Unavailable("terminal: the console socket carried no pty master")
        self.master = fds[0]
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(self.master, False)
        self._close_console_listener()
        self._start_terminal_copies()

    def _start_terminal_copies(self) -> None:
        loop = asyncio.get_running_loop()
        out, self._terminal_out = self._terminal_out, -1
        master_out = os.dup(self.master)
        os.set_inheritable(master_out, False)

        def output_done() -> None:
            os.close(out)  # the reader's EOF: the terminal's output is complete
            os.close(master_out)

        self._pumps.append(Pump(loop, master_out, out, output_done))
        in_scheme, in_path, _ = parse_uri(self.stdin)
        if in_scheme == "fifo":
            self._copy_stdin(in_path, os.dup(self.master))

    def resize(self, width: int, height: int) -> None:
        if self.master < 0:
            raise InvalidArgument("resize: the process has no terminal")
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def _close_console_listener(self) -> None:
        if self._console_listener is not None:
            self._console_listener.close()
            self._console_listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.console_socket)

    # ---- ownership -----------------------------------------------------------------

    def give_to(self, uid: int, gid: int) -> None:
        """Make the process's pipes and fifos belong to host UID/GID, the ids its user has.

        Opening /proc/self/fd/1 (/dev/stdout, or /proc/1/fd/1 from an exec) opens the
        fifo or pipe anew, checked against its owner and mode: made by the shim or
        containerd as host root, it is closed to a container whose users are other host
        ids (a user namespace, runAsUser). runc's shim hands its pipes to the container's
        root and runc's init to the process's user the same way. Files (file://) and
        /dev/null are left alone: they outlive the process, or are open to all already.
        """
        for fd in set(self.child):
            if fd < 0:
                continue
            info = os.fstat(fd)
            if stat.S_ISFIFO(info.st_mode) and (info.st_uid, info.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)

    # ---- lifetime ------------------------------------------------------------------

    async def hand_over_output(self, timeout: float = HAND_OVER_TIMEOUT) -> None:
        """Before a process that has exited is deleted: wait until the client has read
        its output (and a terminal's copy of it has ended), then let the fifos go.

        containerd's client cancels, right after Delete, a reader it has not seen open
        yet (containerd/fifo: the open's goroutine has not run since the kernel opened
        the fifo), and so loses output that was waiting in the fifo. A client that has
        read it all has seen its reader open. The shim's read ends are closed first: a
        write end opened then tells whether any reader is left (ENXIO: none, the output
        has nobody to go to, and a terminal's copy drops it on EPIPE) and, held until
        the fifo is empty, shows what is unread.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        probes: list[tuple[str, int]] = []
        kept, self._kept = self._kept, []
        for path, keep in kept:
            os.close(keep)
            try:
                probe = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # no reader any more (ENXIO), or the client removed the fifo
            if stat.S_ISFIFO(os.fstat(probe).st_mode):
                probes.append((path, probe))
            else:  # the path is something else now: no fifo's reader to wait for
                os.close(probe)

        def pending() -> list[str]:
            copying = [self.stdout for pump in self._pumps if not pump.done]
            return copying + [path for path, fd in probes if _unread_bytes(fd)]

        try:
            pause, longest = CLIENT_READER_POLL
            while waiting := pending():
                if loop.time() >= deadline:
                    log.warning(
                        "stdio %s: output still unread after %gs: deleted all the same",
                        ", ".join(waiting),
                        timeout,
                    )
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, longest)
        finally:
            for _, fd in probes:
                os.close(fd)

    def spawned(self) -> None:
        """The process holds its own copies now: drop the shim's child-side fds."""
        for fd in set(self.child):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.child = [-1, -1, -1]
        self._close_console_listener()

    def close_stdin(self) -> None:
        if self._stdin_pump is not None:
            self._stdin_pump.stop()
            self._stdin_pump = None

    def close(self) -> None:
        self.spawned()
        self.close_stdin()
        for pump in self._pumps:
            pump.stop()
        self._pumps.clear()
        for _, fd in self._kept:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._kept.clear()
        if self._terminal_out >= 0:  # the copy never started
            with contextlib.suppress(OSError):
                os.close(self._terminal_out)
            self._terminal_out = -1
        if self.master >= 0:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = -1
