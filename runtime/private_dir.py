"""Private directories: every component this process creates is 0700, not only the last.

`os.makedirs(path, mode=0o700)` applies the mode to the leaf alone; the parents it makes
get 0777 & ~umask (0755). So `/run/zviz` made on the way to `/run/zviz/seccomp-cache`
was world-listable, and with it the names of the containers' state directories, and
`/run/zviz-shim/g` and `/r` the same (runc's MkdirAll makes every level 0700). Standard
library only: the shim's `start` imports this.
"""

import os


def makedirs_private(path: str) -> None:
    """Make PATH and any missing parent, each 0700; existing directories are left as they are."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made by a concurrent caller: theirs is as private as ours
        # mkdir's mode passes through the umask: 0700 & ~umask can only be narrower, never wider.
