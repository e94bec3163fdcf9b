"""The container's terminal: a pty made inside the container, its master sent out.

As runc: the caller (containerd's shim, or a user) listens on a unix socket
(`--console-socket`); zviz connects to it before the container is built, and PID 1
makes a pty on the container's own devpts and sends the master over that
connection with SCM_RIGHTS. The slave becomes PID 1's controlling terminal and stdio.
"""

import array
import fcntl
import os
import termios

from runtime import errors


def connect(path: str) -> int:
    """A connected fd to the console socket at `path` (made before the rootfs is built)."""
    import socket  # only terminals pay for the socket module

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise errors.InvalidArgument(
            f"--console-socket {path}: cannot connect: {exc.strerror}"
        ) from None
    return sock.detach()


def make_pty_and_send(console_fd: int) -> int:
    """Open a pty in the current /dev/pts, send its master to `console_fd`; returns the slave fd."""
    import socket

    master, slave = os.openpty()
    try:
        name = os.ttyname(slave)
    except OSError:
        name = "/dev/pts/?"
    sock = socket.socket(fileno=console_fd)
    try:
        sock.sendmsg(
            [name.encode()],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [master]))],
        )
    finally:
        sock.detach()
    os.close(master)
    os.close(console_fd)
    return slave


def become_session_leader_on(slave: int) -> None:
    """setsid, make `slave` the controlling terminal, and make it stdin/out/err."""
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(slave, target)
    if slave > 2:
        os.close(slave)
