"""Learn mode under the shim (docs/profiles.md, "Learning a profile"): a container the
operator's config puts in mode "learn" (or whose annotation io.zviz.mode=learn the
operator allows: runtime/security/selection.py) runs as `zviz profile learn` runs a
bundle (runtime/security/learn_run.py), and once its init has exited (at its Delete if
it never ran) the profile it needed is written to the config's `learn_dir`.

- Create: the base is the profile the operator's policy picks for it; the container
  runs under a file of its own in the bundle (containerd's, root's, removed with the
  bundle): the base merged whole, in audit mode, the rootfs opened up. Once created
  (not started), the rootfs and its overlay's upper layer (from containerd's rootfs
  mount options) are snapshotted.
- seccomp and broker records: those the daemon's denial feed (shim/denials.py) already
  writes to the container's denials.jsonl, read after the feed's last read for the
  container: no second reader of the kernel's records.
- After the exit (shim/service.py, under the task's lock, so a Delete waits for it):
  the learned profile goes to `<learn_dir>/<pod namespace>_<pod name>_<container
  name>.toml` under CRI, `<containerd namespace>_<container id>.toml` otherwise: each part
  reduced to [A-Za-z0-9.-], so no name a pod chooses can reach outside the directory,
  which is made root's and 0700 before each write; the file is 0600, replaced whole.

A pod's sandbox (pause) container is not learnt: it runs in audit mode.
"""

import contextlib
import json
import logging
import os
import re
import time

from runtime import denials
from runtime.errors import InvalidArgument
from runtime.private_dir import makedirs_private
from runtime.security import is_pod_sandbox, learn, learn_run, selection

log = logging.getLogger("shim.learn")

LEARNING_PROFILE = "zviz-learning.toml"
CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"
# A container's last calls reach the audit multicast a moment after its exit: the
# writing waits this long before the feed's last read (learn_run.DRAIN_QUIET_SECONDS).
DRAIN_SECONDS = learn_run.DRAIN_QUIET_SECONDS
NAME_PART_LIMIT = 80


def learned_file_name(namespace: str, container_id: str, annotations: dict) -> str:
    """The learned profile's file name in learn_dir (module docstring)."""
    pod_namespace = annotations.get(denials.POD_ANNOTATIONS["pod_namespace"])
    pod_name = annotations.get(denials.POD_ANNOTATIONS["pod_name"])
    if pod_namespace or pod_name:
        container = annotations.get(CONTAINER_NAME_ANNOTATION) or container_id
        parts = (pod_namespace, pod_name, container)
    else:
        parts = (namespace, container_id)
    return "_".join(_name_part(part) for part in parts) + ".toml"


def _name_part(text) -> str:
    part = re.sub(r"[^A-Za-z0-9.-]", "-", str(text or ""))[:NAME_PART_LIMIT].lstrip(".")
    return part or "-"


class Learning:
    """One learnt container: what its learning run needs from Create to its exit."""

    def __init__(self, base, profile_file, rootfs, upper, skip, learn_dir, file_name, container_id):
        self.base = base
        self.profile_file = profile_file  # the learning run's profile (the container's)
        self.rootfs = rootfs
        self.upper = upper  # the overlay's upper layer, or None
        self.skip = skip
        self.learn_dir = learn_dir
        self.file_name = file_name
        self.container_id = container_id
        self.before = None
        self.upper_before = None

    def created(self) -> None:
        """The rootfs before the workload runs (the container is created, not started)."""
        self.before = learn.snapshot(self.rootfs, self.skip)
        if self.upper:
            self.upper_before = learn.snapshot(self.upper, self.skip)

    def finish(self, state_dir: str, kernel_unavailable: str = "") -> str:
        """Write the learned profile (the container's records are all in its state dir's
        denials.jsonl by now); its path."""
        if self.before is None:
            raise InvalidArgument("learn mode: the rootfs was never snapshotted")
        records, _ = denials.read_lines(denials.path_in(state_dir))
        learned = learn.from_records(records, self.base)
        learned.writable = learn_run.written_paths(
            self.rootfs, self.upper, self.skip, self.before, self.upper_before
        )
        name = self.file_name.removesuffix(".toml")
        header = [
            f"Learned by the zviz shim's learn mode on {denials.rfc3339(time.time())}",
            f"from container {self.container_id}, base {self.base.name}",
            "It grants what that run did beyond the base: review it before use. A workload",
            "teaches its own needs: learn only from one you trust (docs/profiles.md).",
        ]
        if kernel_unavailable:
            header.append(f"No syscalls learned: the shim cannot read seccomp records "
                          f"({kernel_unavailable}).")  # fmt: skip
        text = learn_run.learned_text(learned, self.base, self.base.ref, name, header)
        return write_learned(self.learn_dir, self.file_name, text)


def prepare(container_id, namespace, bundle, rootfs_mounts, policy, learn_dir):
    """A Learning when the container is learnt (module docstring), else None. Called after
    the rootfs is mounted, before the core creates: it writes the learning profile,
    which the caller passes as the container's profile (`Learning.profile_file`)."""
    config = _read_config(bundle)
    annotations = config.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise InvalidArgument("config.json: annotations: must be an object")
    if is_pod_sandbox(annotations):
        return None
    if not selection.learning(annotations, policy):
        return None
    if not learn_dir:
        raise InvalidArgument(
            "learn mode: the shim config names no learn_dir (where learned profiles go)"
        )
    if not denials.enabled():
        raise InvalidArgument(f"learn mode: denial records are off ({denials.RECORDS_SWITCH})")
    base = selection.base_profile(annotations, policy)
    root = config.get("root") or {}
    rootfs = os.path.normpath(os.path.join(bundle, root.get("path") or "rootfs"))
    skip = tuple(dict.fromkeys(learn_run.NOT_ROOTFS + learn_run.mount_destinations(config, rootfs)))
    text = learn_run.learning_profile(base.ref, rootfs, skip, name=base.name)
    path = os.path.join(bundle, LEARNING_PROFILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Learning(
        base,
        path,
        rootfs,
        _upper_dir(rootfs_mounts),
        skip,
        learn_dir,
        learned_file_name(namespace, container_id, annotations),
        container_id,
    )


def _upper_dir(rootfs_mounts) -> str | None:
    """The upper layer of containerd's overlay rootfs (its writes land there: the runtime
    mounts an overlay of its own over the same layers, whose writes the shim's mount at
    the bundle's rootfs would miss)."""
    for mount in rootfs_mounts:
        if mount.type == "overlay":
            for option in mount.options:
                if option.startswith("upperdir="):
                    return option.removeprefix("upperdir=")
    return None


def _read_config(bundle: str) -> dict:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{bundle}/config.json: {e}") from e
    if not isinstance(config, dict):
        raise InvalidArgument(f"{bundle}/config.json: not an object")
    return config


def write_learned(learn_dir: str, file_name: str, text: str) -> str:
    """TEXT as FILE_NAME in LEARN_DIR (made if missing; root's and 0700 before the write;
    the file replaced whole, 0600). FILE_NAME is learned_file_name's: one component."""
    if "/" in file_name or file_name.startswith("."):
        raise InvalidArgument(f"learn mode: {file_name!r} is not a file name")
    makedirs_private(learn_dir)
    fd = os.open(learn_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_uid != 0:
            raise InvalidArgument(f"learn mode: learn_dir {learn_dir} is not root's")
        os.fchmod(fd, 0o700)
        partial = f".{file_name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial, dir_fd=fd)  # a write a crash left behind
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(partial, flags, 0o600, dir_fd=fd)
        try:
            os.write(out, text.encode())
        finally:
            os.close(out)
        os.rename(partial, file_name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
    return os.path.join(learn_dir, file_name)


def may_learn(config) -> bool:
    """Whether a container under the shim config CONFIG can be learnt at all (the others'
    config.json is not read here)."""
    return config.mode == selection.LEARN_MODE or selection.LEARN_MODE in (
        config.allowed_annotation_modes or ()
    )
