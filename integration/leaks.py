"""What a test session left on the machine: every mount, cgroup and process carrying its tag.

Only names containing the session's tag (integration/ids.py) count, plus processes that
inherited the tag in their environment: other programs' zviz containers running at the
same time (a benchmark, another test run) are not this session's and are not reported.
"""

import os

from integration.ids import TAG_VARIABLE

CGROUP_ROOT = "/sys/fs/cgroup"
# Deep enough for /sys/fs/cgroup/<hierarchy>/<namespace or slices...>/<id>/<sub-group>;
# the kubelet-style slices the CRI tests make are the deepest.
MAX_CGROUP_DEPTH = 8


def tagged_mounts(tag: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    with open(mountinfo) as f:
        return [f"mount {line.split()[4]}" for line in f if tag in line.split()[4]]


def tagged_cgroups(tag: str, root: str = CGROUP_ROOT) -> list[str]:
    found = []
    base_depth = root.rstrip("/").count("/")
    for dirpath, dirnames, _files in os.walk(root):
        found += [f"cgroup {os.path.join(dirpath, d)}" for d in dirnames if tag in d]
        # a tagged group's sub-groups go with it; below the depth limit nothing of ours lives
        dirnames[:] = [
            d
            for d in dirnames
            if tag not in d and dirpath.count("/") - base_depth < MAX_CGROUP_DEPTH
        ]
    return found


def processes_named(comm: str, container_id: str) -> list[int]:
    """Processes called COMM (a broker, a warden) whose argv names CONTAINER_ID: forked
    from `zviz run ... ID`, so this container's and no other's (or, given a containerd's
    address, forked from the shim daemon serving that containerd)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != comm:
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if container_id.encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _outlives_sessions_by_design(cmdline: bytes) -> bool:
    """The `zviz run` fork server: it serves any run on the machine and exits by itself
    after runtime.forkserver.IDLE_S without clients (its workers are retitled as runs)."""
    return cmdline.split(b"\0")[1:3] == [b"-m", b"runtime.forkserver"]


def tagged_processes(tag: str, exclude: set[int] = frozenset()) -> list[str]:
    """Processes whose command line names the tag or whose environment carries it."""
    marker = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in exclude:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if _outlives_sessions_by_design(cmdline):
            continue
        if tag.encode() in cmdline or marker in environ:
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            found.append(f"process {pid} {shown}")
    return found


def leftovers(tag: str, exclude_pids: set[int] = frozenset()) -> list[str]:
    """Everything of the session tagged `tag` still on the machine."""
    return tagged_mounts(tag) + tagged_cgroups(tag) + tagged_processes(tag, exclude_pids)
