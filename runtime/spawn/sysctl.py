"""linux.sysctl: written by PID 1, or by the parent for a network namespace joined by path."""

import errno
import os

from runtime import errors, linux


def joined_netns_sysctls(spec) -> dict[str, str]:
    """The net.* sysctls of a container that joins its network namespace by path.

    Such a namespace (a pod sandbox's, made by the CRI plugin) belongs to the host's user
    namespace, not to the container's: PID 1, root only in its own user namespace, may
    not write its sysctls (containerd 2.x asks net.ipv4.ip_unprivileged_port_start and
    ping_group_range for every pod). spec.py has already refused net.* sysctls for the
    host's own namespace, so what is left here changes only the joined one.
    """
    net = spec.linux.namespace("network")
    if net is None or net.path is None:
        return {}
    return {
        key: value
        for key, value in (spec.linux.sysctl or {}).items()
        if key.replace("/", ".").startswith("net.")
    }


def write_joined_netns_sysctls(spec) -> None:
    """Write joined_netns_sysctls as the runtime (host root), inside that namespace, as runc
    does for a pod: a thread of ours enters it, so /proc/sys/net is that namespace's."""
    sysctls = joined_netns_sysctls(spec)
    if not sysctls:
        return
    import threading

    path = spec.linux.namespace("network").path
    failure: list[BaseException] = []

    def write_inside() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.setns(fd, linux.CLONE_NEWNET)  # this thread only; it ends below
            finally:
                os.close(fd)
            for key, value in sysctls.items():
                write_sysctl(key, value)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    writer = threading.Thread(target=write_inside, name="zviz-netns-sysctl")
    writer.start()
    writer.join()
    if failure:
        error = failure[0]
        if isinstance(error, OSError):
            raise errors.FailedPrecondition(
                f"sysctl in the joined network namespace {path}: {error.strerror}: "
                f"{error.filename or ''}".rstrip(": ")
            ) from error
        raise error


def write_sysctl(key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.field_error(f"linux.sysctl.{key}", "no such sysctl in the container") from None
    try:
        try:
            os.write(fd, str(value).encode())
        except OSError as e:
            if e.errno != errno.EINVAL or key != PING_GROUP_RANGE:
                raise
            # The kernel refuses a range with a group the container's user namespace does
            # not map; containerd 2.x's CRI asks "0 2147483647" (every group may ping) for
            # every pod. Every group the container has is the same request, narrowed.
            with open("/proc/self/gid_map") as f:
                narrowed = ping_group_range_within(str(value), f.read())
            if narrowed is None:
                raise
            os.write(fd, narrowed.encode())
    finally:
        os.close(fd)


PING_GROUP_RANGE = "net.ipv4.ping_group_range"


def ping_group_range_within(value: str, gid_map: str) -> str | None:
    """The part of the ping_group_range VALUE ("LOW HIGH") inside one mapped range of
    GID_MAP (/proc/self/gid_map: inside, outside, count per line), the widest such part;
    None when the value is malformed or no mapped group is in it."""
    try:
        low, high = (int(word) for word in value.split())
    except ValueError:
        return None
    best = None
    for line in gid_map.splitlines():
        inside, _, count = (int(word) for word in line.split())
        first, last = max(low, inside), min(high, inside + count - 1)
        if first <= last and (best is None or last - first > best[1] - best[0]):
            best = (first, last)
    return None if best is None else f"{best[0]} {best[1]}"
