"""Network namespaces the tests make: a named one (`ip netns add`) and processes in it."""

import os
import socket
import subprocess
import threading
import uuid

from runtime import linux

NETNS_DIR = "/run/netns"


def entering(netns_path: str):
    """A `preexec_fn` that moves the child into the network namespace at NETNS_PATH.

    setns alone, not `ip netns exec`: that also gives the child a private mount
    namespace, and containerd's snapshot and rootfs mounts must stay where the tests
    (and the leak check) see them.
    """

    def enter() -> None:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, linux.NAMESPACE_FLAGS["network"])
        finally:
            os.close(fd)

    return enter


def socket_in(netns_path: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """An IPv4 socket of KIND in the netns at NETNS_PATH (a socket keeps the netns it was
    made in).

    Made by a short-lived thread that enters the netns: setns moves only the calling
    thread, so the test process itself stays where it is.
    """
    made: list = []

    def make() -> None:
        try:
            entering(netns_path)()
            made.append(socket.socket(socket.AF_INET, kind))
        except BaseException as error:  # re-raised in the caller's thread
            made.append(error)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class NamedNetns:
    """`ip netns add NAME` with loopback up; `delete()` removes it (and every link in it)."""

    def __init__(self, prefix: str):
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.path = os.path.join(NETNS_DIR, self.name)
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def ip(self, *args: str) -> str:
        """`ip -n NAME ARGS`, its output."""
        result = subprocess.run(
            ["ip", "-n", self.name, *args], check=True, capture_output=True, text=True
        )
        return result.stdout

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(args, preexec_fn=entering(self.path), **kwargs)

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, preexec_fn=entering(self.path), **kwargs)

    def inode(self) -> int:
        """The namespace's inode: what /proc/<pid>/ns/net shows as net:[inode] inside it."""
        return os.stat(self.path).st_ino

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)
