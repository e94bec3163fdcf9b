"""config.json -> a typed, validated `Spec`.

Everything a container needs from its bundle is checked here, before anything is
created: a config that passes `load_spec` is one the rest of the runtime can apply
without meeting a malformed value half-way through building the container.

Every error is an `InvalidArgument` naming the JSON field, e.g.
`config.json: linux.uidMappings[0].size: must be a positive integer`.

Unknown keys are ignored (the OCI spec requires it, for extensibility); known keys
with the wrong JSON type are errors, as Go's decoder makes them for runc. `null`
reads as "absent", again as in Go.

This module is on the container start path: it imports only json, os,
dataclasses and two small pieces of runtime.cgroups (DeviceRule, the one class a
device rule has, and THROTTLE_KEYS), and reads the filesystem only to resolve the bundle and the rootfs.
"""

import json
import os
from dataclasses import dataclass, field

from runtime.cgroups.common import THROTTLE_KEYS
from runtime.cgroups.devices import DeviceRule
from runtime.errors import InvalidArgument, field_error

# --- Names the runtime recognises (runtime/features.py reports the same sets) ---

# Index = capability number (linux/capability.h), CAP_CHOWN (0) .. CAP_CHECKPOINT_RESTORE (40).
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
CAPABILITY_NUMBERS = {name: number for number, name in enumerate(CAPABILITIES)}
CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")

NAMESPACE_TYPES = ("cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts")

RLIMIT_TYPES = (
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_DATA",
    "RLIMIT_FSIZE",
    "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_RSS",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
    "RLIMIT_SIGPENDING",
    "RLIMIT_STACK",
)

HOOK_NAMES = (
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
)

PROPAGATIONS = (
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
)

# Mount options zviz applies as mount(2) flags or propagation (runtime/rootfs.py);
# anything else in a mount's options is passed to the filesystem as data.
MOUNT_FLAG_OPTIONS = (
    "async",
    "atime",
    "bind",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "lazytime",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "nolazytime",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "nosymfollow",
    "rbind",
    "relatime",
    "remount",
    "ro",
    "rw",
    "strictatime",
    "suid",
    "symfollow",
    "sync",
) + PROPAGATIONS
_MOUNT_FLAG_OPTION_SET = frozenset(MOUNT_FLAG_OPTIONS)

# Options the OCI spec names that zviz does not apply. Passed on as filesystem data
# they would be dropped by a bind mount ("rro" would leave the mount writable), so
# they are refused. Recursive mount_setattr(2) attributes, id-mapping and crun's
# tmpcopyup are never filesystem data, on any mount.
UNSUPPORTED_MOUNT_OPTIONS = frozenset(
    (
        "ratime",
        "rdev",
        "rdiratime",
        "rexec",
        "rnoatime",
        "rnodev",
        "rnodiratime",
        "rnoexec",
        "rnorelatime",
        "rnostrictatime",
        "rnosuid",
        "rnosymfollow",
        "rro",
        "rrelatime",
        "rrw",
        "rstrictatime",
        "rsuid",
        "rsymfollow",
        "idmap",
        "ridmap",
        "tmpcopyup",
    )
)
# Accepted on a bind mount and meaning nothing there: the flags already start at the defaults.
_BIND_NOOP_OPTIONS = frozenset(("defaults",))

SECCOMP_ACTIONS = (
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_LOG",
    "SCMP_ACT_NOTIFY",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_TRAP",
)
SECCOMP_OPERATORS = (
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_LE",
    "SCMP_CMP_LT",
    "SCMP_CMP_MASKED_EQ",
    "SCMP_CMP_NE",
)
SECCOMP_ARCHS = (
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_ARM",
    "SCMP_ARCH_MIPS",
    "SCMP_ARCH_MIPS64",
    "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32",
    "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE",
    "SCMP_ARCH_RISCV64",
    "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X",
    "SCMP_ARCH_X32",
    "SCMP_ARCH_X86",
    "SCMP_ARCH_X86_64",
)
SECCOMP_FLAGS = (
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
)
# A syscall argument index is 0..5 (struct seccomp_data.args[6]).
SECCOMP_MAX_ARGS = 6

IO_PRIORITY_CLASSES = ("IOPRIO_CLASS_RT", "IOPRIO_CLASS_BE", "IOPRIO_CLASS_IDLE")
SCHEDULER_POLICIES = (
    "SCHED_OTHER",
    "SCHED_FIFO",
    "SCHED_RR",
    "SCHED_BATCH",
    "SCHED_ISO",
    "SCHED_IDLE",
    "SCHED_DEADLINE",
)
SCHEDULER_FLAGS = (
    "SCHED_FLAG_RESET_ON_FORK",
    "SCHED_FLAG_RECLAIM",
    "SCHED_FLAG_DL_OVERRUN",
    "SCHED_FLAG_KEEP_POLICY",
    "SCHED_FLAG_KEEP_PARAMS",
    "SCHED_FLAG_UTIL_CLAMP_MIN",
    "SCHED_FLAG_UTIL_CLAMP_MAX",
)
PERSONALITY_DOMAINS = ("LINUX", "LINUX32")
TIME_OFFSET_CLOCKS = ("boottime", "monotonic")

# Sysctls the kernel scopes to the IPC namespace (runc's list; fs.mqueue.* too).
IPC_SYSCTLS = frozenset(
    (
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    )
)

# cgroup v2 controllers whose files linux.resources.unified may write.
UNIFIED_CONTROLLERS = ("cpu", "cpuset", "hugetlb", "io", "memory", "misc", "pids", "rdma")

# The kernel accepts at most this many lines in /proc/<pid>/{u,g}id_map (since 4.15).
MAX_ID_MAPPINGS = 340
# HOST_NAME_MAX, and the same bound for the NIS domain name.
MAX_HOSTNAME = 64

_UINT16 = (1 << 16) - 1
_UINT32 = (1 << 32) - 1
_INT32 = ((-1 << 31), (1 << 31) - 1)
_UINT64 = (1 << 64) - 1
_INT64 = ((-1 << 63), (1 << 63) - 1)


# --- The typed spec ---


@dataclass(slots=True)
class IdMapping:
    container_id: int
    host_id: int
    size: int


@dataclass(slots=True)
class Root:
    path: str  # absolute, symlinks resolved
    readonly: bool = False


@dataclass(slots=True)
class User:
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Capabilities:
    """Capability sets of the process; a set config.json leaves out is empty (nothing granted)."""

    bounding: list[str] = field(default_factory=list)
    effective: list[str] = field(default_factory=list)
    inheritable: list[str] = field(default_factory=list)
    permitted: list[str] = field(default_factory=list)
    ambient: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Rlimit:
    type: str
    soft: int
    hard: int


@dataclass(slots=True)
class Process:
    args: list[str]
    cwd: str
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # (height, width)
    user: User = field(default_factory=User)
    env: list[str] = field(default_factory=list)
    # None: config.json has no `capabilities` object (the profile decides).
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] = field(default_factory=list)
    no_new_privileges: bool = False
    oom_score_adj: int | None = None
    apparmor_profile: str = ""
    selinux_label: str = ""
    io_priority: dict | None = None
    scheduler: dict | None = None


@dataclass(slots=True)
class Mount:
    destination: str  # absolute, normalised, never "/" and never with ".."
    type: str = ""
    # For bind mounts: absolute, resolved against the bundle. Otherwise as given.
    source: str = ""
    options: list[str] = field(default_factory=list)
    uid_mappings: list[IdMapping] = field(default_factory=list)
    gid_mappings: list[IdMapping] = field(default_factory=list)
    # Not config.json's: a bind's source as a detached clone made by host root
    # (rootfs.open_bind_sources), carried to PID 1 and closed once attached.
    source_fd: int | None = field(default=None, compare=False, repr=False)

    @property
    def is_bind(self) -> bool:
        # rootfs decides it for the mounts it makes; it is loaded wherever a spec is
        # (container -> process -> rootfs), so this import costs nothing there.
        from runtime.rootfs import is_bind

        return is_bind(self)


@dataclass(slots=True)
class Namespace:
    type: str
    path: str | None = None  # join this namespace instead of creating one


@dataclass(slots=True)
class Device:
    path: str
    type: str  # "c", "b", "u" or "p"
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(slots=True)
class Memory:
    limit: int | None = None
    reservation: int | None = None
    swap: int | None = None  # memory + swap, as in cgroup v1's memsw
    kernel: int | None = None
    kernel_tcp: int | None = None
    swappiness: int | None = None
    disable_oom_killer: bool | None = None
    use_hierarchy: bool | None = None
    check_before_update: bool | None = None


@dataclass(slots=True)
class Cpu:
    shares: int | None = None
    quota: int | None = None
    burst: int | None = None
    period: int | None = None
    realtime_runtime: int | None = None
    realtime_period: int | None = None
    cpus: str | None = None
    mems: str | None = None
    idle: int | None = None


@dataclass(slots=True)
class Pids:
    limit: int | None = None


@dataclass(slots=True)
class WeightDevice:
    major: int
    minor: int
    weight: int | None = None
    leaf_weight: int | None = None


@dataclass(slots=True)
class ThrottleDevice:
    major: int
    minor: int
    rate: int


@dataclass(slots=True)
class BlockIO:
    weight: int | None = None
    leaf_weight: int | None = None
    weight_device: list[WeightDevice] = field(default_factory=list)
    throttle_read_bps_device: list[ThrottleDevice] = field(default_factory=list)
    throttle_write_bps_device: list[ThrottleDevice] = field(default_factory=list)
    throttle_read_iops_device: list[ThrottleDevice] = field(default_factory=list)
    throttle_write_iops_device: list[ThrottleDevice] = field(default_factory=list)


@dataclass(slots=True)
class HugepageLimit:
    page_size: str  # "2MB", "1GB": as the kernel names its hugetlb.<size>.* files
    limit: int


@dataclass(slots=True)
class InterfacePriority:
    name: str
    priority: int


@dataclass(slots=True)
class Network:
    class_id: int | None = None
    priorities: list[InterfacePriority] = field(default_factory=list)


@dataclass(slots=True)
class Resources:
    """linux.resources, validated: the one input of the cgroup plans (runtime/cgroups)."""

    memory: Memory | None = None
    cpu: Cpu | None = None
    pids: Pids | None = None
    block_io: BlockIO | None = None
    hugepage_limits: list[HugepageLimit] = field(default_factory=list)
    network: Network | None = None
    # None: config.json has no `devices` list (an update leaves the rules alone).
    devices: list[DeviceRule] | None = None
    unified: dict[str, str] = field(default_factory=dict)
    rdma: bool = False  # asked for rdma limits, which zviz does not apply (a note says so)


@dataclass(slots=True)
class Linux:
    namespaces: list[Namespace] = field(default_factory=list)
    uid_mappings: list[IdMapping] = field(default_factory=list)
    gid_mappings: list[IdMapping] = field(default_factory=list)
    sysctl: dict[str, str] = field(default_factory=dict)
    resources: Resources | None = None
    cgroups_path: str | None = None
    rootfs_propagation: str | None = None
    masked_paths: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    seccomp: dict | None = None
    mount_label: str = ""
    personality: dict | None = None
    time_offsets: dict | None = None

    def namespace(self, ns_type: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.type == ns_type:
                return ns
        return None

    def creates_namespace(self, ns_type: str) -> bool:
        ns = self.namespace(ns_type)
        return ns is not None and ns.path is None


@dataclass(slots=True)
class Spec:
    oci_version: str
    root: Root
    process: Process | None = None
    hostname: str = ""
    domainname: str = ""
    mounts: list[Mount] = field(default_factory=list)
    linux: Linux = field(default_factory=Linux)
    annotations: dict[str, str] = field(default_factory=dict)
    hooks: dict | None = None
    bundle: str = ""  # absolute path of the bundle directory


# --- Entry points ---


def load_spec(bundle_dir: str) -> Spec:
    """Read and validate `<bundle_dir>/config.json`."""
    path = os.path.join(bundle_dir, "config.json")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InvalidArgument(f"config.json: not found in bundle {bundle_dir}") from None
    except OSError as e:
        raise InvalidArgument(f"config.json: cannot read {path}: {e.strerror}") from None
    return parse_spec(decode_json(data, "config.json"), bundle_dir)


def decode_json(data: bytes | str, source: str = "config.json"):
    """JSON text -> Python value; a malformed document is an InvalidArgument with line and column."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise InvalidArgument(
            f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{source}: not valid UTF-8 at byte {e.start}") from None
    except RecursionError:
        raise InvalidArgument(f"{source}: not valid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer too long to convert
        raise InvalidArgument(f"{source}: not valid JSON: {e}") from None


def parse_spec(config: dict, bundle_dir: str) -> Spec:
    """Validate a decoded config.json into a Spec; relative paths resolve against bundle_dir."""
    if type(config) is not dict:
        raise InvalidArgument(f"config.json: must be a JSON object, got {_what(config)}")
    try:
        return _parse_spec(config, bundle_dir)
    except _Bad as bad:
        raise field_error(_printable(bad.path), _printable(bad.problem)) from None


def parse_process(process: dict, source: str = "process.json") -> Process:
    """Validate a process object on its own (e.g. `zviz exec --process`).

    The rules that need the rest of the config (ids mapped into the user
    namespace) are the caller's to apply with `check_process_in_spec`.
    """
    try:
        return _parse_process(process, "")
    except _Bad as bad:
        raise InvalidArgument(
            f"{source}: {_printable(bad.path or 'process')}: {_printable(bad.problem)}"
        ) from None


def check_process_in_spec(process: Process, spec: Spec, source: str = "process.json") -> None:
    """The process rules that depend on the container's config (user-namespace mappings)."""
    try:
        _check_process_ids_mapped(process, spec.linux, "")
    except _Bad as bad:
        raise InvalidArgument(
            f"{source}: {_printable(bad.path)}: {_printable(bad.problem)}"
        ) from None


def parse_resources(resources, source: str = "update") -> Resources:
    """Validate a linux.resources object given on its own (`zviz update`, the shim's Update)
    by the rules config.json's is held to: the one validation the cgroup plans rely on.

    It is an update: the rules relating two fields apply when both are given.
    """
    if resources is None:
        return Resources()
    if type(resources) is not dict:
        raise InvalidArgument(
            f"{source}: linux.resources: must be a JSON object, got {_what(resources)}"
        )
    try:
        return _parse_resources(resources, "linux.resources", update=True)
    except _Bad as bad:
        raise InvalidArgument(
            f"{source}: {_printable(bad.path)}: {_printable(bad.problem)}"
        ) from None


# --- Field readers ---
# Each reader takes the containing object, the key and the containing object's
# path; the field's path is only built when there is an error to report.


def _printable(text: str) -> str:
    """Messages quote what config.json said; keep them one printable line whatever it said."""
    if text.isascii() and text.isprintable():
        return text
    return (
        "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        .encode("utf-8", "backslashreplace")
        .decode()
    )


class _Bad(Exception):
    def __init__(self, parent: str, key, problem: str):
        super().__init__(problem)
        self.parent = parent
        self.key = key
        self.problem = problem

    @property
    def path(self) -> str:
        return _join(self.parent, self.key)


def _entry(parent: str, key: str) -> str:
    """A member of a JSON object: `hooks.prestart`, or `hooks["pre start"]` when not a plain name."""
    if key.isidentifier():
        return f"{parent}.{key}"
    return _map_entry(parent, key)


def _map_entry(parent: str, key: str) -> str:
    """An entry of a free-form map: `linux.sysctl["net.ipv4.ip_forward"]`."""
    return f"{parent}[{json.dumps(key, ensure_ascii=False)}]"


def _join(parent: str, key) -> str:
    if key is None:
        return parent
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if not parent:
        return key
    return f"{parent}.{key}"


_JSON_TYPE_NAMES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number with a fraction",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _what(value) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _obj(value, parent: str, key=None) -> dict:
    if type(value) is not dict:
        raise _Bad(parent, key, f"must be an object, got {_what(value)}")
    return value


def _opt_obj(d: dict, key: str, parent: str) -> dict | None:
    value = d.get(key)
    if value is None:
        return None
    if type(value) is not dict:
        raise _Bad(parent, key, f"must be an object, got {_what(value)}")
    return value


def _opt_list(d: dict, key: str, parent: str) -> list:
    value = d.get(key)
    if value is None:
        return []
    if type(value) is not list:
        raise _Bad(parent, key, f"must be a list, got {_what(value)}")
    return value


def _string(value, parent: str, key) -> str:
    if type(value) is not str:
        raise _Bad(parent, key, f"must be a string, got {_what(value)}")
    if "\0" in value:
        raise _Bad(parent, key, "must not contain a NUL byte")
    if not value.isascii():
        _check_encodable(value, parent, key)
    return value


def _check_encodable(value: str, parent: str, key) -> None:
    # JSON can spell a lone surrogate ("\ud800"); no file name or argv can hold one.
    try:
        value.encode()
    except UnicodeEncodeError:
        raise _Bad(parent, key, "must be valid Unicode (it holds a lone surrogate)") from None


def _opt_str(d: dict, key: str, parent: str, default: str | None = "") -> str | None:
    value = d.get(key)
    if value is None:
        return default
    return _string(value, parent, key)


def _opt_bool(d: dict, key: str, parent: str, default: bool | None = False) -> bool | None:
    value = d.get(key)
    if value is None:
        return default
    if type(value) is not bool:
        raise _Bad(parent, key, f"must be true or false, got {_what(value)}")
    return value


def _integer(value, parent: str, key, lo: int, hi: int) -> int:
    # bool is an int subclass in Python, not in JSON: `type() is int` keeps true out.
    if type(value) is not int:
        raise _Bad(parent, key, f"must be an integer, got {_what(value)}")
    if value < lo or value > hi:
        raise _Bad(parent, key, f"must be an integer from {lo} to {hi}, got {value}")
    return value


def _opt_int(d: dict, key: str, parent: str, lo: int, hi: int, default=None) -> int | None:
    value = d.get(key)
    if value is None:
        return default
    return _integer(value, parent, key, lo, hi)


def _string_list(d: dict, key: str, parent: str) -> list[str]:
    items = _opt_list(d, key, parent)
    path = None
    for i, item in enumerate(items):
        if type(item) is not str or "\0" in item:
            path = path or _join(parent, key)
            _string(item, path, i)
    return list(items)


def _string_map(d: dict, key: str, parent: str) -> dict[str, str]:
    value = _opt_obj(d, key, parent)
    if not value:
        return {}
    path = _join(parent, key)
    for k, v in value.items():
        if not k:
            raise _Bad(path, None, "keys must be non-empty strings")
        if type(v) is not str:
            raise _Bad(_map_entry(path, k), None, f"must be a string, got {_what(v)}")
        if "\0" in k or "\0" in v:
            raise _Bad(_map_entry(path, k), None, "must not contain a NUL byte")
        if not (k.isascii() and v.isascii()):
            _check_encodable(k + v, _map_entry(path, k), None)
    return dict(value)


def _check_absolute(value: str, parent: str, key) -> str:
    if not value.startswith("/"):
        raise _Bad(parent, key, f"must be an absolute path, got {value!r}")
    return value


def _container_path(value, parent: str, key) -> str:
    """A path inside the container: absolute, without '..', normalised."""
    _check_absolute(_string(value, parent, key), parent, key)
    parts = value.split("/")
    if ".." in parts:
        raise _Bad(parent, key, f"must not contain '..', got {value!r}")
    # Not os.path.normpath: it keeps a leading "//", which would make "//" differ from "/".
    return "/" + "/".join(part for part in parts if part and part != ".")


def _host_path(value, parent: str, key) -> str:
    return _check_absolute(_string(value, parent, key), parent, key)


# --- The top level ---


def _parse_spec(config, bundle_dir: str) -> Spec:
    bundle = os.path.abspath(bundle_dir)
    oci_version = _parse_oci_version(config)
    root = _parse_root(config, bundle)

    linux_obj = _opt_obj(config, "linux", "")
    linux = _parse_linux(linux_obj, "linux") if linux_obj is not None else Linux()
    if linux.namespace("mount") is None:
        # Without one, the container's mounts and pivot_root would act on the host's tree
        # (runc then mounts into the host's tree and chroots): refused under every profile,
        # as sharing the host's user, pid and network namespaces is (the OCI suite's
        # linux_ns_itype asks for all of them).
        raise _Bad(
            "linux",
            "namespaces",
            "a mount namespace is required: zviz never runs a container in the host's mount"
            " namespace, under any profile (its mounts would land in the host's tree)",
        )

    process_obj = _opt_obj(config, "process", "")
    process = None
    if process_obj is not None:
        process = _parse_process(process_obj, "process")
        _check_process_ids_mapped(process, linux, "process")

    hostname = _opt_str(config, "hostname", "")
    domainname = _opt_str(config, "domainname", "")
    for key, name in (("hostname", hostname), ("domainname", domainname)):
        if not name:
            continue
        if len(name.encode()) > MAX_HOSTNAME:
            raise _Bad("", key, f"must be at most {MAX_HOSTNAME} bytes")
        if linux.namespace("uts") is None:
            raise _Bad("", key, "cannot be set without a uts namespace in linux.namespaces")

    mounts = [
        _parse_mount(m, "mounts", i, bundle) for i, m in enumerate(_opt_list(config, "mounts", ""))
    ]
    hooks = _parse_hooks(config)
    annotations = _string_map(config, "annotations", "")

    _check_sysctls(linux, "linux")

    return Spec(
        oci_version=oci_version,
        root=root,
        process=process,
        hostname=hostname,
        domainname=domainname,
        mounts=mounts,
        linux=linux,
        annotations=annotations,
        hooks=hooks,
        bundle=bundle,
    )


def _parse_oci_version(config: dict) -> str:
    value = config.get("ociVersion")
    if value is None:
        raise _Bad("", "ociVersion", 'is required (e.g. "1.2.0")')
    version = _string(value, "", "ociVersion")
    core = version.split("+", 1)[0].split("-", 1)[0]
    parts = core.split(".")
    if len(parts) != 3 or not all(p.isdigit() and p.isascii() for p in parts):
        raise _Bad("", "ociVersion", f'must be a semantic version like "1.2.0", got {version!r}')
    if parts[0] != "1":
        raise _Bad("", "ociVersion", f"version {version} is not supported (zviz supports 1.x)")
    return version


def _parse_root(config: dict, bundle: str) -> Root:
    root = config.get("root")
    if root is None:
        raise _Bad("", "root", "is required (the container's root filesystem)")
    _obj(root, "", "root")
    path = root.get("path")
    if path is None or path == "":
        raise _Bad(
            "root", "path", "is required (the rootfs directory, absolute or relative to the bundle)"
        )
    path = _string(path, "root", "path")
    resolved = os.path.realpath(os.path.join(bundle, path))
    try:
        is_dir = os.path.isdir(resolved)
        exists = is_dir or os.path.lexists(resolved)
    except (OSError, ValueError):
        is_dir = exists = False
    if not exists:
        raise _Bad("root", "path", f"{resolved} does not exist")
    if not is_dir:
        raise _Bad("root", "path", f"{resolved} is not a directory")
    return Root(path=resolved, readonly=_opt_bool(root, "readonly", "root"))


# --- process ---


def _parse_process(p, path: str) -> Process:
    _obj(p, path)
    args_value = p.get("args")
    if type(args_value) is not list or not args_value:
        raise _Bad(path, "args", "must be a non-empty list of strings")
    args = _string_list(p, "args", path)
    if not args[0]:
        raise _Bad(_join(path, "args"), 0, "must name the program to run")

    cwd = p.get("cwd")
    if cwd is None:
        raise _Bad(path, "cwd", "is required (an absolute path)")
    cwd = _container_path(cwd, path, "cwd")

    console_size = None
    cs = _opt_obj(p, "consoleSize", path)
    if cs is not None:
        cs_path = _join(path, "consoleSize")
        console_size = (
            _opt_int(cs, "height", cs_path, 0, _UINT32, 0),
            _opt_int(cs, "width", cs_path, 0, _UINT32, 0),
        )

    user = User()
    u = _opt_obj(p, "user", path)
    if u is not None:
        u_path = _join(path, "user")
        user.uid = _opt_int(u, "uid", u_path, 0, _UINT32, 0)
        user.gid = _opt_int(u, "gid", u_path, 0, _UINT32, 0)
        user.umask = _opt_int(u, "umask", u_path, 0, 0o777)
        gids = _opt_list(u, "additionalGids", u_path)
        if gids:
            gids_path = _join(u_path, "additionalGids")
            user.additional_gids = [
                _integer(g, gids_path, i, 0, _UINT32) for i, g in enumerate(gids)
            ]

    env = _check_env(_string_list(p, "env", path), _join(path, "env"))

    capabilities = None
    caps = _opt_obj(p, "capabilities", path)
    if caps is not None:
        caps_path = _join(path, "capabilities")
        capabilities = Capabilities()
        for set_name in CAPABILITY_SETS:
            names = _string_list(caps, set_name, caps_path)
            for i, name in enumerate(names):
                if name not in CAPABILITY_NUMBERS:
                    raise _Bad(
                        _join(caps_path, set_name),
                        i,
                        f"unknown capability {name!r} (names look like CAP_CHOWN)",
                    )
            setattr(capabilities, set_name, names)
        permitted = set(capabilities.permitted)
        for i, name in enumerate(capabilities.effective):
            if name not in permitted:
                # capset(2) refuses an effective capability that is not permitted.
                raise _Bad(_join(caps_path, "effective"), i, f"{name} must also be in permitted")

    rlimits = []
    seen_rlimits = set()
    for i, r in enumerate(_opt_list(p, "rlimits", path)):
        r_path = f"{_join(path, 'rlimits')}[{i}]"
        _obj(r, r_path)
        rtype = r.get("type")
        if rtype is None:
            raise _Bad(r_path, "type", "is required (e.g. RLIMIT_NOFILE)")
        rtype = _string(rtype, r_path, "type")
        if rtype not in RLIMIT_TYPES:
            raise _Bad(r_path, "type", f"unknown rlimit {rtype!r}")
        if rtype in seen_rlimits:
            raise _Bad(r_path, "type", f"{rtype} is given twice")
        seen_rlimits.add(rtype)
        for key in ("soft", "hard"):
            # A missing limit read as 0 would quietly forbid the resource outright.
            if r.get(key) is None:
                raise _Bad(r_path, key, "is required (18446744073709551615 is unlimited)")
        soft = _integer(r["soft"], r_path, "soft", 0, _UINT64)
        hard = _integer(r["hard"], r_path, "hard", 0, _UINT64)
        if soft > hard:
            raise _Bad(r_path, "soft", f"must not exceed hard ({soft} > {hard})")
        rlimits.append(Rlimit(type=rtype, soft=soft, hard=hard))

    return Process(
        args=args,
        cwd=cwd,
        terminal=_opt_bool(p, "terminal", path),
        console_size=console_size,
        user=user,
        env=env,
        capabilities=capabilities,
        rlimits=rlimits,
        no_new_privileges=_opt_bool(p, "noNewPrivileges", path),
        oom_score_adj=_opt_int(p, "oomScoreAdj", path, -1000, 1000),
        apparmor_profile=_opt_str(p, "apparmorProfile", path),
        selinux_label=_no_selinux_label(p, path),
        io_priority=_parse_io_priority(p, path),
        scheduler=_parse_scheduler(p, path),
    )


# runc refuses an SELinux label on a host without SELinux; zviz has no SELinux support
# at all, and a label it cannot apply must not read as confinement that is there.
_NO_SELINUX = "SELinux labels are not supported by zviz (the label would not be applied)"


def _no_selinux_label(p: dict, path: str) -> str:
    label = _opt_str(p, "selinuxLabel", path)
    if label:
        raise _Bad(path, "selinuxLabel", _NO_SELINUX)
    return label


def _check_env(env: list[str], path: str) -> list[str]:
    for i, entry in enumerate(env):
        name, sep, _ = entry.partition("=")
        if not sep or not name:
            raise _Bad(path, i, f"must be NAME=VALUE, got {entry!r}")
    return env


def _parse_io_priority(p: dict, parent: str) -> dict | None:
    io = _opt_obj(p, "ioPriority", parent)
    if io is None:
        return None
    path = _join(parent, "ioPriority")
    cls = io.get("class")
    if cls is None:
        raise _Bad(path, "class", f"is required (one of {', '.join(IO_PRIORITY_CLASSES)})")
    if _string(cls, path, "class") not in IO_PRIORITY_CLASSES:
        raise _Bad(path, "class", f"must be one of {', '.join(IO_PRIORITY_CLASSES)}, got {cls!r}")
    _opt_int(io, "priority", path, 0, 7)
    return io


def _parse_scheduler(p: dict, parent: str) -> dict | None:
    sched = _opt_obj(p, "scheduler", parent)
    if sched is None:
        return None
    path = _join(parent, "scheduler")
    policy = sched.get("policy")
    if policy is None:
        raise _Bad(path, "policy", f"is required (one of {', '.join(SCHEDULER_POLICIES)})")
    if _string(policy, path, "policy") not in SCHEDULER_POLICIES:
        raise _Bad(
            path, "policy", f"must be one of {', '.join(SCHEDULER_POLICIES)}, got {policy!r}"
        )
    _opt_int(sched, "nice", path, -20, 19)
    _opt_int(sched, "priority", path, *_INT32)
    for key in ("runtime", "deadline", "period"):
        _opt_int(sched, key, path, 0, _UINT64)
    for i, flag in enumerate(_string_list(sched, "flags", path)):
        if flag not in SCHEDULER_FLAGS:
            raise _Bad(_join(path, "flags"), i, f"unknown scheduler flag {flag!r}")
    return sched


def _check_process_ids_mapped(process: Process, linux: Linux, path: str) -> None:
    """In a new user namespace, an unmapped uid or gid makes setuid/setgid fail late: say so now."""
    if not linux.creates_namespace("user"):
        return
    user_path = _join(path, "user")
    if not _is_mapped(process.user.uid, linux.uid_mappings):
        raise _Bad(user_path, "uid", f"{process.user.uid} is not mapped by linux.uidMappings")
    if not _is_mapped(process.user.gid, linux.gid_mappings):
        raise _Bad(user_path, "gid", f"{process.user.gid} is not mapped by linux.gidMappings")
    for i, gid in enumerate(process.user.additional_gids):
        if not _is_mapped(gid, linux.gid_mappings):
            raise _Bad(
                _join(user_path, "additionalGids"), i, f"{gid} is not mapped by linux.gidMappings"
            )


def _is_mapped(container_id: int, mappings: list[IdMapping]) -> bool:
    return any(m.container_id <= container_id < m.container_id + m.size for m in mappings)


# --- mounts ---


# Files under /proc a mount may cover: the ones lxcfs emulates (runc's list).
# Anything else could cover a masked path or a /proc/sys knob with something writable.
PROC_MOUNT_EXCEPTIONS = frozenset(
    (
        "/proc/cpuinfo",
        "/proc/diskstats",
        "/proc/meminfo",
        "/proc/stat",
        "/proc/swaps",
        "/proc/uptime",
        "/proc/loadavg",
        "/proc/slabinfo",
        "/proc/net/dev",
        "/proc/sys/kernel/ns_last_pid",
        "/proc/sys/crypto/fips_enabled",
    )
)


def _check_proc_mount(mount: Mount, path: str) -> None:
    if mount.destination == "/proc":
        if mount.type != "proc" or mount.is_bind:
            # A bind of some other procfs would show the container another pid namespace.
            raise _Bad(
                path, "type", "a mount on /proc must be a new proc mount (type proc, no bind)"
            )
    elif mount.destination not in PROC_MOUNT_EXCEPTIONS:
        raise _Bad(
            path,
            "destination",
            f"{mount.destination} is inside /proc: only {', '.join(sorted(PROC_MOUNT_EXCEPTIONS))} may be covered",
        )


def _unknown_mount_option(option: str) -> str:
    if option in UNSUPPORTED_MOUNT_OPTIONS:
        return f"mount option {option!r} is not supported by zviz"
    return f"unknown mount option {option!r} (a bind mount takes only mount flags)"


def _parse_mount(m, parent: str, index: int, bundle: str) -> Mount:
    path = f"{parent}[{index}]"
    _obj(m, path)
    dest = m.get("destination")
    if dest is None or dest == "":
        raise _Bad(path, "destination", "is required (an absolute path in the container)")
    dest = _container_path(dest, path, "destination")
    if dest == "/":
        raise _Bad(path, "destination", "must not be / (the root is linux.root, not a mount)")
    mtype = _opt_str(m, "type", path)
    source = _opt_str(m, "source", path)
    options = _string_list(m, "options", path)
    for i, opt in enumerate(options):
        if not opt:
            raise _Bad(_join(path, "options"), i, "must be a non-empty string")
        if opt in UNSUPPORTED_MOUNT_OPTIONS:
            raise _Bad(_join(path, "options"), i, _unknown_mount_option(opt))
    mount = Mount(destination=dest, type=mtype, source=source, options=options)
    if mount.is_bind:
        if not source:
            raise _Bad(path, "source", "is required for a bind mount")
        for i, opt in enumerate(options):
            if opt in _MOUNT_FLAG_OPTION_SET or opt in _BIND_NOOP_OPTIONS:
                continue
            if "=" in opt:
                # A filesystem's key=value data (mode=755, size=1k: a tmpfs mount's options
                # reused on a bind, as the OCI suite does) means nothing to a bind mount:
                # the kernel ignores it and so does runc. Left out here, never applied.
                continue
            # A bare unknown word is a typo of a flag (like "readonly"), which the kernel
            # would drop without a word: refused.
            raise _Bad(_join(path, "options"), i, _unknown_mount_option(opt))
        mount.options = [opt for opt in options if "=" not in opt]
        if not source.startswith("/"):
            # The OCI spec: a relative bind source is relative to the bundle.
            mount.source = os.path.normpath(os.path.join(bundle, source))
    elif not mtype:
        raise _Bad(path, "type", "is required unless options contain bind or rbind")
    if dest == "/proc" or dest.startswith("/proc/"):
        _check_proc_mount(mount, path)

    uid_maps = _opt_list(m, "uidMappings", path)
    gid_maps = _opt_list(m, "gidMappings", path)
    if uid_maps or gid_maps:
        if not (uid_maps and gid_maps):
            missing = "gidMappings" if uid_maps else "uidMappings"
            raise _Bad(
                path,
                missing,
                "is required with an id-mapped mount (both uidMappings and gidMappings)",
            )
        if not mount.is_bind:
            raise _Bad(path, "uidMappings", "id-mapped mounts must be bind mounts")
        mount.uid_mappings = _parse_id_mappings(uid_maps, _join(path, "uidMappings"))
        mount.gid_mappings = _parse_id_mappings(gid_maps, _join(path, "gidMappings"))
    return mount


# --- hooks ---


def _parse_hooks(config: dict) -> dict | None:
    hooks = _opt_obj(config, "hooks", "")
    if hooks is None:
        return None
    for name, entries in hooks.items():
        if name not in HOOK_NAMES:
            raise _Bad(
                _entry("hooks", name), None, f"unknown hook (known: {', '.join(HOOK_NAMES)})"
            )
        if entries is None:
            continue
        if type(entries) is not list:
            raise _Bad("hooks", name, f"must be a list, got {_what(entries)}")
        for i, hook in enumerate(entries):
            h_path = f"hooks.{name}[{i}]"
            _obj(hook, h_path)
            hpath = hook.get("path")
            if hpath is None or hpath == "":
                raise _Bad(h_path, "path", "is required (an absolute path on the host)")
            _host_path(hpath, h_path, "path")
            _string_list(hook, "args", h_path)
            _check_env(_string_list(hook, "env", h_path), _join(h_path, "env"))
            _opt_int(hook, "timeout", h_path, 1, _INT64[1])
    return hooks


# --- linux ---


def _parse_linux(lx: dict, path: str) -> Linux:
    linux = Linux()

    seen = set()
    for i, ns in enumerate(_opt_list(lx, "namespaces", path)):
        ns_path = f"{path}.namespaces[{i}]"
        _obj(ns, ns_path)
        ns_type = ns.get("type")
        if ns_type is None:
            raise _Bad(ns_path, "type", f"is required (one of {', '.join(NAMESPACE_TYPES)})")
        if _string(ns_type, ns_path, "type") not in NAMESPACE_TYPES:
            raise _Bad(
                ns_path,
                "type",
                f"unknown namespace {ns_type!r} (known: {', '.join(NAMESPACE_TYPES)})",
            )
        if ns_type in seen:
            raise _Bad(ns_path, "type", f"namespace {ns_type!r} is listed twice")
        seen.add(ns_type)
        ns_file = ns.get("path")
        if ns_file == "":
            ns_file = None
        if ns_file is not None:
            _host_path(ns_file, ns_path, "path")
            _check_exists(ns_file, ns_path, "path")
        linux.namespaces.append(Namespace(type=ns_type, path=ns_file))

    _parse_user_mappings(lx, path, linux)

    linux.sysctl = _string_map(lx, "sysctl", path)

    resources = _opt_obj(lx, "resources", path)
    if resources is not None:
        linux.resources = _parse_resources(resources, _join(path, "resources"))

    cgroups_path = _opt_str(lx, "cgroupsPath", path, None)
    if cgroups_path:
        from runtime.cgroups import container_path

        container_path(cgroups_path, "")  # checked where it is interpreted, before anything exists
    linux.cgroups_path = cgroups_path or None

    propagation = _opt_str(lx, "rootfsPropagation", path, None)
    if propagation:
        if propagation not in PROPAGATIONS:
            raise _Bad(
                path,
                "rootfsPropagation",
                f"must be one of {', '.join(PROPAGATIONS)}, got {propagation!r}",
            )
        linux.rootfs_propagation = propagation

    for key in ("maskedPaths", "readonlyPaths"):
        paths = _opt_list(lx, key, path)
        if paths:
            key_path = _join(path, key)
            paths = [_container_path(p, key_path, i) for i, p in enumerate(paths)]
        setattr(linux, "masked_paths" if key == "maskedPaths" else "readonly_paths", paths)

    linux.devices = [
        _parse_device(d, f"{path}.devices[{i}]")
        for i, d in enumerate(_opt_list(lx, "devices", path))
    ]

    seccomp = _opt_obj(lx, "seccomp", path)
    if seccomp is not None:
        linux.seccomp = _check_seccomp(seccomp, _join(path, "seccomp"))

    linux.mount_label = _opt_str(lx, "mountLabel", path)
    if linux.mount_label:
        raise _Bad(path, "mountLabel", _NO_SELINUX)

    personality = _opt_obj(lx, "personality", path)
    if personality is not None:
        p_path = _join(path, "personality")
        domain = personality.get("domain")
        if domain is None:
            raise _Bad(p_path, "domain", f"is required (one of {', '.join(PERSONALITY_DOMAINS)})")
        if _string(domain, p_path, "domain") not in PERSONALITY_DOMAINS:
            raise _Bad(
                p_path, "domain", f"must be one of {', '.join(PERSONALITY_DOMAINS)}, got {domain!r}"
            )
        _string_list(personality, "flags", p_path)
        linux.personality = personality

    offsets = _opt_obj(lx, "timeOffsets", path)
    if offsets:
        o_path = _join(path, "timeOffsets")
        for clock, offset in offsets.items():
            if clock not in TIME_OFFSET_CLOCKS:
                raise _Bad(
                    _entry(o_path, clock),
                    None,
                    f"unknown clock (known: {', '.join(TIME_OFFSET_CLOCKS)})",
                )
            _obj(offset, o_path, clock)
            c_path = _join(o_path, clock)
            _opt_int(offset, "secs", c_path, *_INT64)
            _opt_int(offset, "nanosecs", c_path, 0, 999_999_999)
        if not linux.creates_namespace("time"):
            raise _Bad(
                path,
                "timeOffsets",
                "needs a new time namespace in linux.namespaces (without a path)",
            )
        linux.time_offsets = offsets
    return linux


def _check_exists(host_path: str, parent: str, key) -> None:
    try:
        os.stat(host_path)
    except FileNotFoundError:
        raise _Bad(parent, key, f"{host_path} does not exist") from None
    except (OSError, ValueError):
        pass  # unreadable here is not proof of absence: the step that uses it reports its own error


def _parse_id_mappings(items: list, path: str) -> list[IdMapping]:
    if len(items) > MAX_ID_MAPPINGS:
        raise _Bad(path, None, f"at most {MAX_ID_MAPPINGS} mappings are allowed, got {len(items)}")
    mappings = []
    for i, m in enumerate(items):
        m_path = f"{path}[{i}]"
        _obj(m, m_path)
        for key in ("containerID", "hostID", "size"):
            if m.get(key) is None:
                raise _Bad(m_path, key, "is required")
        container_id = _integer(m["containerID"], m_path, "containerID", 0, _UINT32)
        host_id = _integer(m["hostID"], m_path, "hostID", 0, _UINT32)
        size = m["size"]
        if type(size) is not int or size < 1:
            raise _Bad(m_path, "size", "must be a positive integer")
        if container_id + size - 1 > _UINT32:
            raise _Bad(
                m_path,
                "size",
                f"containerID + size overflows the 32-bit id space ({container_id} + {size})",
            )
        if host_id + size - 1 > _UINT32:
            raise _Bad(
                m_path, "size", f"hostID + size overflows the 32-bit id space ({host_id} + {size})"
            )
        mappings.append(IdMapping(container_id=container_id, host_id=host_id, size=size))
    # The kernel refuses a map whose ranges overlap on either side.
    for side in ("container_id", "host_id"):
        ordered = sorted(range(len(mappings)), key=lambda i: getattr(mappings[i], side))
        for a, b in zip(ordered, ordered[1:], strict=False):
            if getattr(mappings[a], side) + mappings[a].size > getattr(mappings[b], side):
                label = "containerID" if side == "container_id" else "hostID"
                raise _Bad(path, max(a, b), f"{label} range overlaps {path}[{min(a, b)}]")
    return mappings


def _parse_user_mappings(lx: dict, path: str, linux: Linux) -> None:
    uid_items = _opt_list(lx, "uidMappings", path)
    gid_items = _opt_list(lx, "gidMappings", path)
    linux.uid_mappings = _parse_id_mappings(uid_items, _join(path, "uidMappings"))
    linux.gid_mappings = _parse_id_mappings(gid_items, _join(path, "gidMappings"))
    user_ns = linux.namespace("user")
    if user_ns is None:
        if uid_items or gid_items:
            key = "uidMappings" if uid_items else "gidMappings"
            raise _Bad(path, key, "needs a user namespace in linux.namespaces")
        return
    if user_ns.path is not None:
        # Given with a path they say what the joined namespace maps (containerd 2.x sends
        # both for a hostUsers: false pod: its pinned namespace and the kubelet's ranges);
        # the runtime checks them against it once joined (idmap.check_joined_user_namespace).
        if bool(uid_items) != bool(gid_items):
            key = "gidMappings" if uid_items else "uidMappings"
            other = "uidMappings" if uid_items else "gidMappings"
            raise _Bad(path, key, f"is required with {other} when joining a user namespace")
        return
    if not uid_items:
        raise _Bad(path, "uidMappings", "is required with a new user namespace")
    if not gid_items:
        raise _Bad(path, "gidMappings", "is required with a new user namespace")


def _parse_device(d, path: str) -> Device:
    _obj(d, path)
    dev_path = d.get("path")
    if dev_path is None or dev_path == "":
        raise _Bad(path, "path", "is required (an absolute path in the container)")
    dev_path = _container_path(dev_path, path, "path")
    dtype = d.get("type")
    if dtype is None:
        raise _Bad(path, "type", "is required (c, b, u or p)")
    if _string(dtype, path, "type") not in ("c", "b", "u", "p"):
        raise _Bad(path, "type", f"must be c, b, u or p, got {dtype!r}")
    if dtype != "p":
        for key in ("major", "minor"):
            if d.get(key) is None:
                raise _Bad(path, key, f"is required for a device of type {dtype!r}")
    return Device(
        path=dev_path,
        type=dtype,
        # The spec's int64, cut to what mknod's dev_t takes (os.makedev: two uint32s);
        # beyond it `zviz create` would fail with a traceback at mknod.
        major=_opt_int(d, "major", path, 0, _UINT32, 0),
        minor=_opt_int(d, "minor", path, 0, _UINT32, 0),
        file_mode=_opt_int(d, "fileMode", path, 0, 0o7777),
        uid=_opt_int(d, "uid", path, 0, _UINT32),
        gid=_opt_int(d, "gid", path, 0, _UINT32),
    )


def _check_sysctls(linux: Linux, path: str) -> None:
    """runc's rule: only sysctls the kernel scopes to a namespace the container has its own of."""
    if not linux.sysctl:
        return
    s_path = _join(path, "sysctl")
    for key in linux.sysctl:
        field_path = _map_entry(s_path, key)
        # Keys become paths under /proc/sys: nothing may climb out of it.
        parts = key.split("/") if "/" in key else key.split(".")
        if any(part in ("", ".", "..") for part in parts):
            raise _Bad(field_path, None, "is not a valid sysctl name")
        name = key.replace("/", ".") if "/" in key else key
        if name in IPC_SYSCTLS or name.startswith("fs.mqueue."):
            if linux.namespace("ipc") is None:
                raise _Bad(field_path, None, "needs an ipc namespace in linux.namespaces")
            continue
        if name.startswith("net."):
            net = linux.namespace("network")
            if net is None:
                raise _Bad(field_path, None, "needs a network namespace in linux.namespaces")
            if net.path is not None and is_own_netns(net.path):
                raise _Bad(field_path, None, "cannot be set in the host's network namespace")
            continue
        if name == "kernel.domainname" and linux.namespace("uts") is not None:
            continue
        if name == "kernel.hostname":
            raise _Bad(field_path, None, "is not allowed: set the top-level hostname field instead")
        raise _Bad(
            field_path, None, "is not namespaced: a container may not change it for the whole host"
        )


def is_own_netns(ns_path: str) -> bool:
    try:
        theirs = os.stat(ns_path)
        ours = os.stat("/proc/self/ns/net")
    except OSError:
        return False  # joining will fail with its own error
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


# --- linux.resources ---


def _parse_resources(r: dict, path: str, update: bool = False) -> Resources:
    """linux.resources -> Resources. update: the object only names what changes, so the
    rules relating two fields apply only when both are given (the kernel holds the rest)."""
    res = Resources()

    mem = _opt_obj(r, "memory", path)
    if mem is not None:
        m_path = _join(path, "memory")
        res.memory = Memory(
            limit=_memory_bytes(mem, "limit", m_path),
            reservation=_memory_bytes(mem, "reservation", m_path),
            swap=_memory_bytes(mem, "swap", m_path),
            kernel=_memory_bytes(mem, "kernel", m_path),
            kernel_tcp=_memory_bytes(mem, "kernelTCP", m_path),
            swappiness=_opt_int(mem, "swappiness", m_path, 0, 100),
            disable_oom_killer=_opt_bool(mem, "disableOOMKiller", m_path, None),
            use_hierarchy=_opt_bool(mem, "useHierarchy", m_path, None),
            check_before_update=_opt_bool(mem, "checkBeforeUpdate", m_path, None),
        )
        _check_memory(res.memory, m_path, update)

    cpu = _opt_obj(r, "cpu", path)
    if cpu is not None:
        c_path = _join(path, "cpu")
        res.cpu = Cpu(
            shares=_opt_int(cpu, "shares", c_path, 0, _UINT64),
            quota=_opt_int(cpu, "quota", c_path, *_INT64),
            burst=_opt_int(cpu, "burst", c_path, 0, _UINT64),
            period=_opt_int(cpu, "period", c_path, 0, _UINT64),
            realtime_runtime=_opt_int(cpu, "realtimeRuntime", c_path, *_INT64),
            realtime_period=_opt_int(cpu, "realtimePeriod", c_path, 0, _UINT64),
            cpus=_cpu_list(cpu, "cpus", c_path),
            mems=_cpu_list(cpu, "mems", c_path),
            idle=_opt_int(cpu, "idle", c_path, 0, 1),
        )
        _check_cpu(res.cpu, c_path)

    pids = _opt_obj(r, "pids", path)
    if pids is not None:
        p_path = _join(path, "pids")
        limit = _opt_int(pids, "limit", p_path, *_INT64)
        if limit is not None and limit < -1:
            raise _Bad(p_path, "limit", f"must be -1 (unlimited) or a count, got {limit}")
        res.pids = Pids(limit=limit)

    if r.get("devices") is not None:
        res.devices = [
            _parse_device_rule(rule, f"{path}.devices[{i}]")
            for i, rule in enumerate(_opt_list(r, "devices", path))
        ]

    res.unified = _string_map(r, "unified", path)
    for key in res.unified:
        # Keys are file names in the cgroup directory: nothing may leave it, and only
        # controller files: cgroup.procs or cgroup.subtree_control would let a config
        # move processes or reshape the tree rather than set a limit.
        if (
            "/" in key
            or key.partition(".")[0] not in UNIFIED_CONTROLLERS
            or not key.partition(".")[2]
        ):
            raise _Bad(
                _map_entry(_join(path, "unified"), key),
                None,
                "must be a controller file such as memory.max "
                f"(controllers: {', '.join(UNIFIED_CONTROLLERS)})",
            )

    block_io = _opt_obj(r, "blockIO", path)
    if block_io is not None:
        res.block_io = _parse_block_io(block_io, _join(path, "blockIO"))

    h_path = _join(path, "hugepageLimits")
    for i, h in enumerate(_opt_list(r, "hugepageLimits", path)):
        _obj(h, h_path, i)
        item = f"{h_path}[{i}]"
        res.hugepage_limits.append(
            HugepageLimit(
                page_size=_page_size(h, item), limit=_required_int(h, "limit", item, 0, _UINT64)
            )
        )

    network = _opt_obj(r, "network", path)
    if network is not None:
        n_path = _join(path, "network")
        res.network = Network(class_id=_opt_int(network, "classID", n_path, 0, _UINT32))
        for i, prio in enumerate(_opt_list(network, "priorities", n_path)):
            item = f"{n_path}.priorities[{i}]"
            _obj(prio, item)
            name = _opt_str(prio, "name", item)
            # One "name priority" line of net_prio.ifpriomap: a space would start another.
            if not name or not name.isprintable() or any(c.isspace() for c in name):
                raise _Bad(item, "name", f"must be an interface name, got {name!r}")
            res.network.priorities.append(
                InterfacePriority(name, _required_int(prio, "priority", item, 0, _UINT32))
            )

    res.rdma = bool(r.get("rdma"))
    return res


# The units the kernel names hugetlb page sizes with (hugetlb.2MB.*, hugetlb.1GB.*): its
# mem_fmt() never writes TB, so "1TB" could only name a file that does not exist.
HUGEPAGE_UNITS = ("KB", "MB", "GB")


def _page_size(h: dict, item: str) -> str:
    size = h.get("pageSize")
    if size is None or size == "":
        raise _Bad(item, "pageSize", 'is required (e.g. "2MB")')
    _string(size, item, "pageSize")
    # It becomes part of a file name: digits and a unit, nothing else.
    if not (size[:-2].isdigit() and size.isascii() and size[-2:] in HUGEPAGE_UNITS):
        raise _Bad(
            item,
            "pageSize",
            f'must look like "2MB" or "1GB" (a number and {", ".join(HUGEPAGE_UNITS)}), got {size!r}',
        )
    return size


def _required_int(d: dict, key: str, path: str, lo: int, hi: int) -> int:
    value = _opt_int(d, key, path, lo, hi)
    if value is None:
        raise _Bad(path, key, "is required")
    return value


def _memory_bytes(mem: dict, key: str, path: str) -> int | None:
    value = _opt_int(mem, key, path, *_INT64)
    if value is not None and value < -1:
        raise _Bad(path, key, f"must be -1 (unlimited) or a number of bytes, got {value}")
    return value


def _check_memory(mem: Memory, path: str, update: bool = False) -> None:
    limit = mem.limit if mem.limit and mem.limit > 0 else None
    if mem.reservation and mem.reservation > 0 and limit is not None and mem.reservation > limit:
        raise _Bad(path, "reservation", f"must not exceed limit ({mem.reservation} > {limit})")
    if mem.swap and mem.swap > 0:
        # `swap` is memory+swap (cgroup v1 memsw): below the memory limit, or
        # without one, the kernel refuses it. An update without a limit keeps the
        # container's current one, which only the kernel knows here.
        if limit is None and update and mem.limit is None:
            return
        if limit is None:
            raise _Bad(path, "swap", "needs memory.limit (swap is the memory+swap limit)")
        if mem.swap < limit:
            raise _Bad(
                path,
                "swap",
                f"must be at least memory.limit: swap counts memory+swap ({mem.swap} < {limit})",
            )


def _check_cpu(cpu: Cpu, path: str) -> None:
    if cpu.period is not None and cpu.period != 0 and not 1000 <= cpu.period <= 1_000_000:
        raise _Bad(path, "period", f"must be from 1000 to 1000000 microseconds, got {cpu.period}")
    if cpu.quota is not None:
        if cpu.quota < -1:
            raise _Bad(path, "quota", f"must be -1 (unlimited) or microseconds, got {cpu.quota}")
        if 0 < cpu.quota < 1000:
            raise _Bad(path, "quota", f"must be at least 1000 microseconds, got {cpu.quota}")
        if cpu.quota > 0 and cpu.period == 0:
            raise _Bad(path, "period", "must be set (not 0) with a cpu quota")


def _cpu_list(cpu: dict, key: str, path: str) -> str | None:
    """A kernel cpu/node list such as "0-3,5"."""
    value = _opt_str(cpu, key, path, None)
    if not value:
        return value
    for part in value.split(","):
        lo, dash, hi = part.partition("-")
        if not (
            _is_small_number(lo) and (not dash or (_is_small_number(hi) and int(lo) <= int(hi)))
        ):
            raise _Bad(path, key, f'must be a list like "0-3,5", got {value!r}')
    return value


def _is_small_number(text: str) -> bool:
    # Bounded so int() never meets a number too long to convert; no kernel has 10^6 CPUs.
    return 0 < len(text) <= 6 and text.isdigit() and text.isascii()


def _parse_device_rule(rule, path: str) -> DeviceRule:
    _obj(rule, path)
    allow = rule.get("allow")
    if type(allow) is not bool:
        what = "is required" if allow is None else f"must be true or false, got {_what(allow)}"
        raise _Bad(path, "allow", what)
    dtype = _opt_str(rule, "type", path, "a") or "a"
    if dtype not in ("a", "b", "c"):
        raise _Bad(path, "type", f"must be a, b or c, got {dtype!r}")
    access = _opt_str(rule, "access", path, "rwm") or "rwm"
    if not set(access) <= {"r", "w", "m"} or len(set(access)) != len(access):
        raise _Bad(path, "access", f"must combine r, w and m, got {access!r}")
    # -1: any. The v2 device program compares them as 32-bit signed immediates.
    major = _opt_int(rule, "major", path, -1, _INT32[1])
    minor = _opt_int(rule, "minor", path, -1, _INT32[1])
    return DeviceRule(
        allow=allow,
        type=dtype,
        major=None if major == -1 else major,
        minor=None if minor == -1 else minor,
        access=access,
    )


def _parse_block_io(bio: dict, path: str) -> BlockIO:
    block_io = BlockIO(
        weight=_opt_int(bio, "weight", path, 0, _UINT16),
        leaf_weight=_opt_int(bio, "leafWeight", path, 0, _UINT16),
    )
    for i, dev in enumerate(_opt_list(bio, "weightDevice", path)):
        item = f"{path}.weightDevice[{i}]"
        _obj(dev, item)
        block_io.weight_device.append(
            WeightDevice(
                *_device_numbers(dev, item),
                weight=_opt_int(dev, "weight", item, 0, _UINT16),
                leaf_weight=_opt_int(dev, "leafWeight", item, 0, _UINT16),
            )
        )
    for key, attribute in THROTTLE_KEYS:
        for i, dev in enumerate(_opt_list(bio, key, path)):
            item = f"{path}.{key}[{i}]"
            _obj(dev, item)
            getattr(block_io, attribute).append(
                ThrottleDevice(
                    *_device_numbers(dev, item), rate=_required_int(dev, "rate", item, 0, _UINT64)
                )
            )
    return block_io


def _device_numbers(dev: dict, item: str) -> tuple[int, int]:
    """A block device's major and minor, as the kernel's "major:minor" lines take them."""
    return (
        _required_int(dev, "major", item, 0, _UINT32),
        _required_int(dev, "minor", item, 0, _UINT32),
    )


# --- linux.seccomp (kept as a dict for the seccomp layer, checked for shape here) ---


def _check_seccomp(sc: dict, path: str) -> dict:
    action = sc.get("defaultAction")
    if action is None:
        raise _Bad(path, "defaultAction", "is required (e.g. SCMP_ACT_ERRNO)")
    _seccomp_action(action, path, "defaultAction")
    _opt_int(sc, "defaultErrnoRet", path, 0, _UINT32)
    for i, arch in enumerate(_string_list(sc, "architectures", path)):
        if arch not in SECCOMP_ARCHS:
            raise _Bad(_join(path, "architectures"), i, f"unknown architecture {arch!r}")
    for i, flag in enumerate(_string_list(sc, "flags", path)):
        if flag not in SECCOMP_FLAGS:
            raise _Bad(_join(path, "flags"), i, f"unknown seccomp flag {flag!r}")
    listener = _opt_str(sc, "listenerPath", path)
    if listener:
        _check_absolute(listener, path, "listenerPath")
    _opt_str(sc, "listenerMetadata", path)
    uses_notify = action == "SCMP_ACT_NOTIFY"
    for i, rule in enumerate(_opt_list(sc, "syscalls", path)):
        item = f"{path}.syscalls[{i}]"
        _obj(rule, item)
        names = rule.get("names")
        if type(names) is not list or not names:
            raise _Bad(item, "names", "must be a non-empty list of syscall names")
        for j, name in enumerate(_string_list(rule, "names", item)):
            if not name:
                raise _Bad(_join(item, "names"), j, "must be a syscall name, got an empty string")
        rule_action = rule.get("action")
        if rule_action is None:
            raise _Bad(item, "action", "is required (e.g. SCMP_ACT_ALLOW)")
        _seccomp_action(rule_action, item, "action")
        uses_notify = uses_notify or rule_action == "SCMP_ACT_NOTIFY"
        if rule.get("errnoRet") is not None:
            _opt_int(rule, "errnoRet", item, 0, _UINT32)
            if rule_action not in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
                raise _Bad(
                    item, "errnoRet", "is only meaningful with SCMP_ACT_ERRNO or SCMP_ACT_TRACE"
                )
        args = _opt_list(rule, "args", item)
        if len(args) > SECCOMP_MAX_ARGS:
            raise _Bad(
                item, "args", f"at most {SECCOMP_MAX_ARGS} argument conditions, got {len(args)}"
            )
        for k, arg in enumerate(args):
            a_path = f"{item}.args[{k}]"
            _obj(arg, a_path)
            if arg.get("index") is None:
                raise _Bad(a_path, "index", "is required (0 to 5)")
            _integer(arg["index"], a_path, "index", 0, SECCOMP_MAX_ARGS - 1)
            _opt_int(arg, "value", a_path, 0, _UINT64)
            _opt_int(arg, "valueTwo", a_path, 0, _UINT64)
            op = arg.get("op")
            if op is None:
                raise _Bad(a_path, "op", "is required (e.g. SCMP_CMP_EQ)")
            if _string(op, a_path, "op") not in SECCOMP_OPERATORS:
                raise _Bad(
                    a_path, "op", f"unknown operator {op!r} (known: {', '.join(SECCOMP_OPERATORS)})"
                )
    if uses_notify and not listener:
        raise _Bad(path, "listenerPath", "is required when an action is SCMP_ACT_NOTIFY")
    return sc


def _seccomp_action(value, parent: str, key: str) -> None:
    if _string(value, parent, key) not in SECCOMP_ACTIONS:
        raise _Bad(
            parent, key, f"unknown seccomp action {value!r} (known: {', '.join(SECCOMP_ACTIONS)})"
        )
