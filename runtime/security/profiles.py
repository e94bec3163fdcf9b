"""Profiles: the security policy of a container, as data (`runtime/profiles/*.toml`).

A profile file is read and validated once into a `Profile`; every error names the
file and the key ("profiles/x.toml: seccomp.allow[3]: unknown syscall 'opne'").
A profile may `extends` another (a built-in name or a path); in the child, a key
replaces the parent's value, and for lists `KEY_add` / `KEY_remove` edit the
parent's list instead of replacing it.

This module is on the create path: it imports only tomllib, os and a SHA-256.
"""

try:  # CPython's own SHA-256: hashlib would load OpenSSL (~2 ms) on the start path
    from _sha256 import sha256
except ImportError:  # pragma: no cover - other Pythons
    from hashlib import sha256
import os
import tomllib
from dataclasses import dataclass, field, replace

from runtime.errors import InvalidArgument
from runtime.security import kernel_gaps

# The built-in profiles are package data (runtime/profiles/*.toml): they travel inside the
# wheel, beside the code that reads them, wherever the package is installed.
PROFILES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profiles")
DEFAULT_PROFILE = "ci-runner"
ANNOTATION = "io.zviz.profile"

# Capabilities as named in config.json; index = number (linux/capability.h).
from runtime.spec import CAPABILITIES  # noqa: E402

NETWORK_MODES = ("none", "namespace")
# How a profile's seccomp filter and broker answer what they would refuse (docs/denials.md):
# "enforce" refuses; "audit" records and allows, except the ESCAPE_CLASS calls. An
# unknown mode, wherever it is named (profile, shim config, annotation), is refused.
MODES = ("enforce", "audit")
MODE_ANNOTATION = "io.zviz.mode"
# The calls audit mode never lets through: each one reaches past the container (mounts
# and namespaces, another process's memory, the kernel's module, BPF, keyring, io_uring,
# perf and hardware interfaces, the node's clock, swap, accounting and reboot). Every
# built-in profile not marked unsafe denies them all (tests/test_audit_mode.py); in
# audit mode they stay denied (and recorded) unless the profile itself allows one.
# clone with a namespace flag and ioctl(TIOCSTI) stay denied too (seccomp.py).
ESCAPE_CLASS = (
    "mount", "umount2", "mount_setattr", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "pivot_root", "chroot", "unshare", "setns",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "open_by_handle_at", "name_to_handle_at",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "iopl", "ioperm", "modify_ldt", "uselib", "lookup_dcookie", "memfd_secret",
    "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl", "quotactl_fd",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname", "fanotify_init", "vhangup",
)  # fmt: skip
DEFAULT_ACTIONS = ("EPERM", "ENOSYS", "kill")
SOCKET_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}
# Netlink protocols a profile may grant (linux/netlink.h).
NETLINK_PROTOCOLS = {"NETLINK_ROUTE": 0, "NETLINK_AUDIT": 9, "NETLINK_KOBJECT_UEVENT": 15}
MEDIATED_SYSCALLS = ("connect", "bind", "sendto", "sendmsg", "sendmmsg")
# What the broker decides for a mode "none" profile in a network namespace it shares
# (a pod's, or the host's): every way out. bind/listen/accept stay the kernel's: a
# listener only answers who reaches it (kubelet probes, Services), it sends nowhere.
NO_NETWORK_MEDIATED = ("connect", "sendto", "sendmsg", "sendmmsg")

# What a container may read in /dev (Landlock): the OCI default devices and the
# directories the runtime mounts there. Anything else in /dev needs the profile.
DEFAULT_DEVICES = (
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/console",
    "/dev/ptmx",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
)

_SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True, slots=True)
class PortRule:
    """A network destination (or bind address): a CIDR and a set of ports (empty: any)."""

    network: object  # ipaddress.IPv4Network | IPv6Network (imported only when a profile has rules)
    ports: frozenset[int]

    def matches(self, address: str, port: int) -> bool:
        import ipaddress

        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version != self.network.version:
            # An IPv4-mapped IPv6 address is decided as the IPv4 address it carries.
            mapped = getattr(ip, "ipv4_mapped", None)
            if mapped is None or self.network.version != 4:
                return False
            ip = mapped
        return ip in self.network and (not self.ports or port in self.ports)


@dataclass(slots=True)
class Profile:
    name: str
    source: str  # the file it was read from
    digest: str  # sha256 of the effective profile (the seccomp cache key uses it)
    description: str = ""
    unsafe: bool = False
    mode: str = "enforce"  # MODES; the operator or an allowed annotation may override it
    # User namespace: container root is mapped onto host ids [host_id, host_id + id_count).
    user_namespace: bool = True
    host_uid: int = 100000
    host_gid: int = 100000
    id_count: int = 65536
    allow_host_root_mapping: bool = False
    # Capability ceiling: config.json may ask for less, never more.
    capabilities: frozenset[str] = frozenset()
    # config.json's `noNewPrivileges: false` honoured (setuid/file-capability gains on
    # execve, up to the ceiling above); otherwise no_new_privs is always set.
    allow_new_privileges: bool = False
    # Resource defaults and ceilings (None: the profile sets none).
    pids_max: int | None = None
    memory_max: int | None = None
    # Landlock.
    landlock_required: bool = True
    writable: tuple[str, ...] = ()
    writable_volumes: bool = True
    device_ioctl: tuple[str, ...] = ("/dev",)
    devices: tuple[str, ...] = DEFAULT_DEVICES
    landlock_scope: bool = True
    # Landlock rights this profile runs without where the kernel's ABI lacks them
    # (kernel_gaps.py); any other missing right refuses the container.
    landlock_may_lack: tuple[str, ...] = ()
    # Network.
    network: str = "none"
    tcp_bind: tuple[int, ...] | None = None  # Landlock ABI >= 4; None: not restricted
    tcp_connect: tuple[int, ...] | None = None
    egress: tuple[PortRule, ...] = ()
    egress_deny: tuple = ()  # CIDRs refused before `egress` is consulted
    bind: tuple[PortRule, ...] = ()
    mediate: tuple[str, ...] = ()
    # Set by harden_spec: the container joined a network namespace by path (a pod's) that
    # is not the host's. The broker then lets loopback and that namespace's own addresses
    # through before any egress rule: they reach only the pod.
    network_joined: bool = False
    # Name-based egress: ((host name, port), ...) reachable at the addresses the name
    # resolves to, resolved by the broker (broker/egress_hosts.py; docs/security.md).
    egress_hosts: tuple[tuple[str, int], ...] = ()
    # Set by harden_spec from the operator's config (cluster.ClusterNetwork): cluster DNS,
    # service and pod CIDRs; and the nameservers egress_hosts are resolved through.
    cluster_network: object = None
    egress_nameservers: tuple[tuple[str, int], ...] = ()
    # Seconds a mediated call may wait for the broker before it fails (broker/core.py).
    broker_timeout: float = 10.0
    # Broker kernel features this profile runs without (kernel_gaps.BROKER_FEATURES).
    broker_may_lack: tuple[str, ...] = ()
    # seccomp.
    default_action: str = "EPERM"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    socket_families: tuple[str, ...] = ("AF_UNIX",)
    netlink_protocols: tuple[str, ...] = ()
    hot: tuple[str, ...] = ()
    raw: dict = field(default_factory=dict)
    # Compiled BPF programs, filled by harden_spec in the parent so PID 1 (after
    # pivot_root, without the host's cache directory) only has to load bytes.
    programs: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def ref(self) -> str:
        """What resolve_profile needs to load this profile again (e.g. for `zviz exec`)."""
        if os.path.dirname(self.source) == PROFILES_DIR and self.name == os.path.basename(
            self.source
        ).removesuffix(".toml"):
            return self.name
        return self.source

    def needs_broker(self, verbose: bool) -> bool:
        return bool(self.mediate) or verbose

    def egress_allows(self, address: str, port: int) -> bool:
        if any(rule.matches(address, port) for rule in self.egress_deny):
            return False
        return any(rule.matches(address, port) for rule in self.egress)

    def bind_allows(self, address: str, port: int) -> bool:
        return any(rule.matches(address, port) for rule in self.bind)


def list_profiles() -> list[str]:
    """Names of the built-in profiles."""
    return sorted(
        name[: -len(".toml")]
        for name in os.listdir(PROFILES_DIR)
        if name.endswith(".toml") and not name.startswith("_")
    )


def _is_path(name: str) -> bool:
    return "/" in name or name.endswith(".toml")


def profile_path(name: str) -> str:
    if _is_path(name):
        path = os.path.abspath(name)
        if not os.path.isfile(path):
            raise InvalidArgument(f"profile: no such file {name!r}")
        return path
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise InvalidArgument(f"profile: invalid profile name {name!r}")
    path = os.path.join(PROFILES_DIR, name + ".toml")
    if not os.path.isfile(path):
        raise InvalidArgument(
            f"profile: unknown profile {name!r} (built-in: {', '.join(list_profiles())}; "
            "or give a path to a .toml file)"
        )
    return path


# Parsed profiles by path, valid while every file read for one (itself and what it
# extends) keeps its inode, size and mtime. The fork server (runtime/forkserver.py)
# warms it, so each `zviz run` it forks skips the TOML parse and checks (~2 ms).
_CACHE: dict[str, tuple[tuple, Profile]] = {}


def _stamp(path: str, st: os.stat_result) -> tuple:
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _unchanged(stamps: tuple) -> bool:
    for stamp in stamps:
        try:
            if _stamp(stamp[0], os.stat(stamp[0])) != stamp:
                return False
        except OSError:
            return False
    return True


def with_mode(profile: Profile, mode: str | None, source: str = "mode") -> Profile:
    """`profile` run in `mode` (None: its own). An unknown mode is refused, never ignored."""
    if mode is None or mode == profile.mode:
        return profile
    if mode not in MODES:
        raise InvalidArgument(f"{source}: {mode!r} is not one of {', '.join(MODES)}")
    return replace(profile, mode=mode, programs={})


def load_profile(name: str) -> Profile:
    """A built-in profile by name, or a profile file by path; InvalidArgument if unknown or bad."""
    path = profile_path(name)
    cached = _CACHE.get(path)
    if cached is not None and _unchanged(cached[0]):
        # A copy: callers fill `programs` per container (an OCI filter among them).
        return replace(cached[1], programs={})
    files: list[tuple] = []
    merged = _load_merged(path, (), files)
    profile = _build(merged, path)
    _CACHE[path] = (tuple(files), replace(profile, programs={}))
    return profile


def warm_cache() -> None:
    """Load every built-in profile now (the fork server does, before any client)."""
    for name in list_profiles():
        try:
            load_profile(name)
        except InvalidArgument:
            pass  # a broken built-in fails each run that names it, as without a cache


def load_root_owned_file(path: str) -> Profile:
    """A profile file the operator named (shim config: `profile`, `profile_dirs`).

    The file, every file it extends (built-ins aside) and every directory on their
    paths must be root's and writable by root alone, with no symlink on the way:
    otherwise a non-root user (a pod writing an emptyDir, an image's files under a
    bundle) could put a policy of its choice there. Not cached: the checks are the point.
    """
    files: list[tuple] = []
    return _build(_load_merged(path, (), files, root_owned_only=True), path)


def open_root_owned(path: str) -> int:
    """An fd of the regular file PATH, walked from / component by component (O_NOFOLLOW)
    and checked on the opened inodes (fstat), so no rename or symlink can slip between
    the check and the read. InvalidArgument naming the offending component otherwise."""
    rule = "profile files load only from root-owned directories no other user can write"
    if not os.path.isabs(path):
        raise InvalidArgument(f"profile file {path!r}: must be an absolute path ({rule})")
    names = [name for name in path.split("/") if name]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check_root_owned(fd, "/", path, rule, directory=True)
        for i, name in enumerate(names):
            here = "/" + "/".join(names[: i + 1])
            last = i == len(names) - 1
            if name in (".", ".."):
                raise InvalidArgument(f"profile file {path!r}: {here}: no . or .. ({rule})")
            # O_NONBLOCK: a FIFO planted as the file must not hang the caller.
            flags = os.O_RDONLY | os.O_NONBLOCK if last else os.O_PATH | os.O_DIRECTORY
            try:
                child = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                raise InvalidArgument(
                    f"profile file {path!r}: {here}: {e.strerror} (symlinks are not followed; "
                    f"{rule})"
                ) from None
            os.close(fd)
            fd = child
            _check_root_owned(fd, here, path, rule, directory=not last)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check_root_owned(fd: int, here: str, path: str, rule: str, *, directory: bool) -> None:
    import stat

    st = os.fstat(fd)
    problem = None
    if directory and not stat.S_ISDIR(st.st_mode):
        problem = "not a directory"
    elif not directory and not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_uid != 0:
        problem = f"owned by uid {st.st_uid}, not root"
    elif st.st_mode & 0o022:
        problem = f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        raise InvalidArgument(f"profile file {path!r} refused: {here} is {problem} ({rule})")


def _read_toml(path: str, files: list[tuple], root_owned_only: bool = False) -> dict:
    try:
        if root_owned_only:
            f = os.fdopen(open_root_owned(path), "rb")
        else:
            f = open(path, "rb")
        with f:
            # The stamp of what is read, taken before reading: a later change shows.
            files.append(_stamp(path, os.fstat(f.fileno())))
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read: {e.strerror}") from None


def _load_merged(
    path: str, seen: tuple[str, ...], files: list[tuple], root_owned_only: bool = False
) -> dict:
    if path in seen:
        raise InvalidArgument(f"{path}: extends itself through {' -> '.join(seen)}")
    # Built-ins are installed with zviz's own code: trusted as it is.
    data = _read_toml(path, files, root_owned_only and os.path.dirname(path) != PROFILES_DIR)
    parent_name = data.get("profile", {}).get("extends")
    if parent_name is None:
        return data
    if not isinstance(parent_name, str):
        raise InvalidArgument(f"{path}: profile.extends: must be a profile name or path")
    if _is_path(parent_name) and not os.path.isabs(parent_name):
        parent_name = os.path.join(os.path.dirname(path), parent_name)
    try:
        parent_path = profile_path(parent_name)
    except InvalidArgument as e:
        raise InvalidArgument(f"{path}: profile.extends: {e}") from None
    parent = _load_merged(parent_path, seen + (path,), files, root_owned_only)
    merged = _merge(parent, data, path)
    # The child's name never comes from the parent.
    own_name = data.get("profile", {}).get("name") or os.path.basename(path).removesuffix(".toml")
    merged.setdefault("profile", {})["name"] = own_name
    merged["profile"].pop("extends", None)
    return merged


def _merge(base: dict, child: dict, path: str, where: str = "") -> dict:
    out = dict(base)
    for key, value in child.items():
        here = f"{where}{key}"
        if isinstance(value, dict):
            out[key] = _merge(
                base.get(key, {}) if isinstance(base.get(key), dict) else {},
                value,
                path,
                here + ".",
            )
            continue
        for suffix in ("_add", "_remove"):
            if key.endswith(suffix):
                target = key[: -len(suffix)]
                if not isinstance(value, list):
                    raise InvalidArgument(f"{path}: {here}: must be a list")
                current = list(out.get(target, child.get(target, [])))
                if suffix == "_add":
                    current += [v for v in value if v not in current]
                else:
                    current = [v for v in current if v not in value]
                out[target] = current
                break
        else:
            out[key] = value
    return out


class _Reader:
    """Typed access to one TOML table, naming the file and key in every error."""

    def __init__(self, path: str, table: dict, prefix: str):
        self.path, self.table, self.prefix = path, table, prefix
        self.used: set[str] = set()

    def error(self, key: str, problem: str) -> InvalidArgument:
        return InvalidArgument(f"{self.path}: {self.prefix}{key}: {problem}")

    def get(self, key: str, kind, default):
        self.used.add(key)
        value = self.table.get(key, default)
        if value is None:
            return None
        if kind is int and (type(value) is not int or value < 0):
            raise self.error(key, f"must be a non-negative integer, got {value!r}")
        if kind is bool and type(value) is not bool:
            raise self.error(key, f"must be true or false, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise self.error(key, f"must be a string, got {value!r}")
        if kind is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.error(key, "must be a list of strings")
        return value

    def ports(self, key: str) -> tuple[int, ...] | None:
        self.used.add(key)
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(type(p) is int and 0 < p < 65536 for p in value):
            raise self.error(key, "must be a list of port numbers 1..65535")
        return tuple(sorted(set(value)))

    def size(self, key: str) -> int | None:
        self.used.add(key)
        value = self.table.get(key)
        if value is None:
            return None
        if type(value) is int and value > 0:
            return value
        if isinstance(value, str) and value[:-1].isdigit() and value[-1:].upper() in _SIZE_SUFFIXES:
            return int(value[:-1]) * _SIZE_SUFFIXES[value[-1].upper()]
        raise self.error(key, f'must be bytes or a size like "512M" or "8G", got {value!r}')

    def port_rules(self, key: str) -> tuple[PortRule, ...]:
        import ipaddress

        self.used.add(key)
        value = self.table.get(key, [])
        if not isinstance(value, list):
            raise self.error(key, 'must be a list of tables {cidr = "10.0.0.0/8", ports = [443]}')
        rules = []
        for i, item in enumerate(value):
            if not isinstance(item, dict) or "cidr" not in item:
                raise self.error(f"{key}[{i}]", 'must be a table with a "cidr" key')
            unknown = set(item) - {"cidr", "ports"}
            if unknown:
                raise self.error(f"{key}[{i}]", f"unknown keys {sorted(unknown)}")
            try:
                network = ipaddress.ip_network(item["cidr"], strict=False)
            except (ValueError, TypeError):
                raise self.error(f"{key}[{i}].cidr", f"not a CIDR: {item['cidr']!r}") from None
            ports = item.get("ports", [])
            if not isinstance(ports, list) or not all(
                type(p) is int and 0 < p < 65536 for p in ports
            ):
                raise self.error(f"{key}[{i}].ports", "must be a list of port numbers 1..65535")
            rules.append(PortRule(network, frozenset(ports)))
        return tuple(rules)

    def finish(self) -> None:
        unknown = sorted(
            k
            for k in set(self.table) - self.used
            if not (k.endswith("_add") or k.endswith("_remove"))
        )
        if unknown:
            raise self.error(unknown[0], "unknown key")


_TABLES = (
    "profile",
    "user_namespace",
    "capabilities",
    "resources",
    "landlock",
    "network",
    "broker",
    "seccomp",
)


def _build(data: dict, path: str) -> Profile:
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise InvalidArgument(f"{path}: unknown table [{unknown[0]}] (known: {', '.join(_TABLES)})")
    for table in _TABLES:
        if not isinstance(data.get(table, {}), dict):
            raise InvalidArgument(f"{path}: {table}: must be a table")
    digest = sha256(repr(sorted(_flatten(data))).encode()).hexdigest()

    meta = _Reader(path, data.get("profile", {}), "profile.")
    name = meta.get("name", str, None) or os.path.basename(path)[: -len(".toml")]
    p = Profile(name=name, source=path, digest=digest, raw=data)
    p.description = meta.get("description", str, "")
    p.unsafe = meta.get("unsafe", bool, False)
    p.mode = meta.get("mode", str, "enforce")
    if p.mode not in MODES:
        raise meta.error("mode", f"must be one of {', '.join(MODES)}, got {p.mode!r}")
    meta.get("extends", str, None)
    meta.finish()

    userns = _Reader(path, data.get("user_namespace", {}), "user_namespace.")
    p.user_namespace = userns.get("required", bool, True)
    p.host_uid = userns.get("host_uid", int, 100000)
    p.host_gid = userns.get("host_gid", int, p.host_uid)
    p.id_count = userns.get("id_count", int, 65536)
    p.allow_host_root_mapping = userns.get("allow_host_root_mapping", bool, False)
    userns.finish()
    if p.user_namespace and (p.host_uid == 0 or p.host_gid == 0) and not p.allow_host_root_mapping:
        raise InvalidArgument(
            f"{path}: user_namespace.host_uid: container root must map to an unprivileged host id, not 0"
        )
    if p.id_count < 1 or p.host_uid + p.id_count > 1 << 32:
        raise InvalidArgument(f"{path}: user_namespace.id_count: must be 1..2^32-host_uid")

    caps = _Reader(path, data.get("capabilities", {}), "capabilities.")
    allowed = caps.get("allow", list, [])
    for i, cap in enumerate(allowed):
        if cap not in CAPABILITIES:
            raise caps.error(f"allow[{i}]", f"unknown capability {cap!r}")
    p.capabilities = frozenset(allowed)
    p.allow_new_privileges = caps.get("allow_new_privileges", bool, False)
    caps.finish()

    res = _Reader(path, data.get("resources", {}), "resources.")
    p.pids_max = res.get("pids_max", int, None)
    p.memory_max = res.size("memory_max")
    res.finish()

    ll = _Reader(path, data.get("landlock", {}), "landlock.")
    p.landlock_required = ll.get("required", bool, True)
    p.writable = tuple(ll.get("writable", list, []))
    p.writable_volumes = ll.get("writable_volumes", bool, True)
    p.device_ioctl = tuple(ll.get("device_ioctl", list, ["/dev"]))
    p.devices = tuple(ll.get("devices", list, list(DEFAULT_DEVICES)))
    p.landlock_scope = ll.get("scope", bool, True)
    p.landlock_may_lack = _may_lack(ll, kernel_gaps.LANDLOCK_FEATURES)
    for key, paths in (
        ("writable", p.writable),
        ("device_ioctl", p.device_ioctl),
        ("devices", p.devices),
    ):
        for i, item in enumerate(paths):
            if not item.startswith("/"):
                raise ll.error(f"{key}[{i}]", f"must be an absolute path, got {item!r}")
    ll.finish()

    net = _Reader(path, data.get("network", {}), "network.")
    p.network = net.get("mode", str, "none")
    if p.network not in NETWORK_MODES:
        raise net.error("mode", f"must be one of {', '.join(NETWORK_MODES)}, got {p.network!r}")
    p.tcp_bind = net.ports("tcp_bind")
    p.tcp_connect = net.ports("tcp_connect")
    p.egress = net.port_rules("egress")
    p.egress_deny = tuple(
        PortRule(rule.network, frozenset()) for rule in _cidr_rules(net, "egress_deny")
    )
    p.bind = net.port_rules("bind")
    p.egress_hosts = _egress_hosts(net)
    p.mediate = tuple(net.get("mediate", list, []))
    for i, call in enumerate(p.mediate):
        if call not in MEDIATED_SYSCALLS:
            raise net.error(
                f"mediate[{i}]",
                f"{call!r} cannot be mediated (known: {', '.join(MEDIATED_SYSCALLS)})",
            )
    net.finish()
    if p.network == "none" and (p.mediate or p.egress or p.egress_hosts):
        raise InvalidArgument(
            f'{path}: network: mode is "none" but egress/egress_hosts/mediate are set; '
            'use mode = "namespace"'
        )
    if p.egress_hosts and not {"connect", "sendto", "sendmsg"} <= set(p.mediate):
        raise InvalidArgument(
            f"{path}: network.egress_hosts: the broker decides them: mediate must list "
            "connect, sendto and sendmsg"
        )

    brk = _Reader(path, data.get("broker", {}), "broker.")
    timeout = brk.get("timeout", object, 10.0)
    if type(timeout) not in (int, float) or not 0 < timeout <= 3600:
        raise brk.error("timeout", f"must be a number of seconds in (0, 3600], got {timeout!r}")
    p.broker_timeout = float(timeout)
    p.broker_may_lack = _may_lack(brk, kernel_gaps.BROKER_FEATURES)
    brk.finish()

    sc = _Reader(path, data.get("seccomp", {}), "seccomp.")
    p.default_action = sc.get("default_action", str, "EPERM")
    if p.default_action not in DEFAULT_ACTIONS:
        raise sc.error(
            "default_action",
            f"must be one of {', '.join(DEFAULT_ACTIONS)}, got {p.default_action!r}",
        )
    p.allow = tuple(dict.fromkeys(sc.get("allow", list, [])))
    p.deny = tuple(dict.fromkeys(sc.get("deny", list, [])))
    p.hot = tuple(sc.get("hot", list, []))
    p.socket_families = tuple(sc.get("socket_families", list, ["AF_UNIX"]))
    for i, fam in enumerate(p.socket_families):
        if fam not in SOCKET_FAMILIES:
            raise sc.error(
                f"socket_families[{i}]",
                f"unknown family {fam!r} (known: {', '.join(SOCKET_FAMILIES)})",
            )
    p.netlink_protocols = tuple(sc.get("netlink_protocols", list, []))
    for i, proto in enumerate(p.netlink_protocols):
        if proto not in NETLINK_PROTOCOLS:
            raise sc.error(
                f"netlink_protocols[{i}]",
                f"unknown protocol {proto!r} (known: {', '.join(NETLINK_PROTOCOLS)})",
            )
    sc.finish()
    both = sorted(set(p.allow) & set(p.deny))
    if both:
        raise sc.error("deny", f"syscalls both allowed and denied: {', '.join(both)}")
    if "AF_NETLINK" in p.socket_families and not p.netlink_protocols:
        raise sc.error("netlink_protocols", "AF_NETLINK needs the protocols it grants")
    _check_syscall_names(p, path)
    return p


def _may_lack(reader: "_Reader", known: dict) -> tuple[str, ...]:
    names = reader.get("may_lack", list, [])
    for i, name in enumerate(names):
        if name not in known:
            raise reader.error(
                f"may_lack[{i}]", f"unknown feature {name!r} (known: {', '.join(known)})"
            )
    return tuple(dict.fromkeys(names))


def _cidr_rules(reader: "_Reader", key: str) -> tuple[PortRule, ...]:
    import ipaddress

    values = reader.get(key, list, [])
    rules = []
    for i, value in enumerate(values):
        try:
            rules.append(PortRule(ipaddress.ip_network(value, strict=False), frozenset()))
        except ValueError:
            raise reader.error(f"{key}[{i}]", f"not a CIDR: {value!r}") from None
    return tuple(rules)


def _egress_hosts(reader: "_Reader") -> tuple[tuple[str, int], ...]:
    values = reader.get("egress_hosts", list, [])
    if not values:
        return ()  # the common case: no DNS module (socket, select) on the create path
    from runtime.security import dns

    hosts = []
    for i, value in enumerate(values):
        name, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
        if not sep or not dns.valid_name(name) or not port.isdigit() or not 0 < int(port) < 65536:
            raise reader.error(f"egress_hosts[{i}]", f'must be "host.name:port", got {value!r}')
        hosts.append((name.lower(), int(port)))
    return tuple(dict.fromkeys(hosts))


def _check_syscall_names(p: Profile, path: str) -> None:
    from runtime.security import syscalls

    for key, names in (("allow", p.allow), ("deny", p.deny), ("hot", p.hot)):
        for name in names:
            if not syscalls.known(name):
                # The index would point into the merged list (parents included): name only.
                raise InvalidArgument(f"{path}: seccomp.{key}: unknown syscall {name!r}")


def _flatten(data, prefix=""):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield (prefix, repr(data))
