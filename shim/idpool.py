"""Host id ranges per container, from a pool the operator configures.

With `id_ranges = "container"` in the shim config, each container gets its own
RANGE_SIZE host ids for its user namespace instead of its profile's shared range
(100000.. for every container): containers of different tenants then never share file
ownership on shared storage. Under Kubernetes this is a range per pod, since a pod's
containers join its sandbox's user namespace. `id_ranges = "shared"` (the default)
keeps the profile's range.

A range is held by a file named after its first host id in POOL_DIR, created with
O_EXCL by whichever shim daemon of the machine takes it and removed when the container
is deleted; it names its holder, so only the holder removes it.
"""

import os

from runtime import errors
from runtime.private_dir import makedirs_private
from shim.config import STATE_ROOT

RANGE_SIZE = 65536
POOL_DIR = os.path.join(STATE_ROOT, "ids")


def reserve(first: int, ranges: int, holder: str) -> int:
    """The first host id of a free range of the pool [first, first + ranges * RANGE_SIZE)."""
    makedirs_private(POOL_DIR)
    for index in range(ranges):
        start = first + index * RANGE_SIZE
        try:
            fd = os.open(
                os.path.join(POOL_DIR, str(start)),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o600,
            )
        except FileExistsError:
            continue
        try:
            os.write(fd, holder.encode())
        finally:
            os.close(fd)
        return start
    raise errors.Unavailable(
        f"id pool: all {ranges} ranges from host id {first} are in use (id_pool_ranges in the "
        "shim config)"
    )


def release(start: int, holder: str) -> None:
    path = os.path.join(POOL_DIR, str(start))
    try:
        with open(path, "rb") as f:
            if f.read().decode(errors="replace") != holder:
                return  # another container's now: never free what is not ours
        os.unlink(path)
    except FileNotFoundError:
        pass
