"""Unix socket addresses as containerd writes them, and the listening socket."""

from __future__ import annotations

import contextlib
import os
import socket
import stat

# sun_path is 108 bytes; a path needs its terminating NUL, an abstract name does not.
_SUN_PATH_MAX = 108


def socket_address(address: str) -> str | bytes:
    """The sockaddr for `address`: a filesystem path (str) or an abstract name (bytes).

    Accepted forms: `/path`, `unix:///path`, and abstract names `\\0name` or `@name`
    (with or without `unix://`), which is how containerd and Go spell them.
    """
    if not isinstance(address, str) or not address:
        raise ValueError(f"ttrpc address {address!r}: expected a unix socket path or name")
    rest = address.removeprefix("unix://")
    if "://" in rest:
        scheme = rest.split("://", 1)[0]
        raise ValueError(f"ttrpc address {address!r}: scheme {scheme!r} is not unix")
    if rest.startswith(("\0", "@")):
        name = b"\0" + rest[1:].encode()
        if len(name) > _SUN_PATH_MAX:
            raise ValueError(
                f"ttrpc address {address!r}: abstract name longer than {_SUN_PATH_MAX - 1} bytes"
            )
        return name
    if not rest:
        raise ValueError(f"ttrpc address {address!r}: empty socket path")
    if len(os.fsencode(rest)) >= _SUN_PATH_MAX:
        raise ValueError(
            f"ttrpc address {address!r}: socket path longer than {_SUN_PATH_MAX - 1} bytes"
        )
    return rest


def listen(address: str, *, mode: int = 0o600, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """A listening unix socket bound to `address`.

    A stale socket file (nothing accepts on it) is replaced; a live one raises
    `FileExistsError`, as does any other kind of file at that path. A path socket gets
    `mode` (owner-only by default: the server trusts its peers' calls). The backlog is the
    kernel's maximum: Go's ttrpc clients connect without blocking, so a connect that finds
    the backlog full fails with EAGAIN instead of waiting for the server to accept.
    """
    sockaddr = socket_address(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if isinstance(sockaddr, str):
            _remove_stale_socket(sockaddr)
            # The socket file is created by bind with the umask: create it owner-only, then
            # widen to `mode`, so there is no moment when others may connect.
            old_umask = os.umask(0o177)
            try:
                sock.bind(sockaddr)
            finally:
                os.umask(old_umask)
            os.chmod(sockaddr, mode)
        else:
            sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"ttrpc address {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise FileExistsError(f"ttrpc address {path}: a server is already listening there")
