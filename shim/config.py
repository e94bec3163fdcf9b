"""Where the shim keeps its files, and the shim's own configuration.

Imported by `start`, which runs once per container: standard library only, and
the TOML reader only when a config file exists.

The configuration comes from a TOML file named by the runtime options containerd
passes (`runtimeoptions.v1.Options.config_path`: CRI's `options.ConfigPath`, or
`ctr run --runtime-config-path`), else from /etc/zviz/shim.toml when present:

    profile = "ci-runner"          # profile when the spec has no io.zviz.profile annotation
    allowed_annotation_profiles = ["ci-runner", "web-server"]  # names the annotation may choose
    profile_dirs = ["/etc/zviz/profiles"]  # NAME.toml there is profile NAME (root-owned only)
    mode = "audit"                 # enforce | audit | learn: every container's mode (unset: the
                                   # profile's); learn: audit mode, and the profile the
                                   # container needed written to learn_dir (shim/learn.py)
    allowed_annotation_modes = ["audit"]  # io.zviz.mode may choose these (enforce: always)
    learn_dir = "/var/lib/zviz/learned"   # where learn mode writes profiles (root-only, 0700)
    id_ranges = "shared"           # shared (the profile's host ids) | container (shim/idpool.py)
    id_pool_first = 1000000        # with id_ranges = "container": the pool's first host id ...
    id_pool_ranges = 1000          # ... and how many 65536-id ranges it has
    grouping = "pod"               # namespace | pod | container: which containers share a daemon
                                   # (unset: pod under CRI, namespace otherwise)
    idle_exit_seconds = 30         # how long an idle daemon waits for the next container
    allow_host_network = false     # a spec without a network namespace (hostNetwork) may share
                                   # the node's; refused at Create otherwise
    cluster_service_cidrs = ["10.96.0.0/12"]  # Services: taken out of a profile's egress_deny
    cluster_pod_cidrs = ["10.244.0.0/16"]     # pods: likewise (the profile's ports still hold)
    cluster_dns = ["10.96.0.10:53"]           # TCP/UDP there under every profile, "none" too;
                                              # egress_hosts are resolved there
                                              # (runtime/security/cluster.py)
    stall_timeout_seconds = 30     # how long a ttrpc client may stall mid-frame (or not read)
"""

import os

try:
    from _sha256 import sha256  # the C module alone: hashlib would load OpenSSL for one hash
except ImportError:  # pragma: no cover - other Python builds
    from hashlib import sha256


def state_root() -> str:
    return os.environ.get("ZVIZ_SHIM_ROOT", "/run/zviz-shim")


# Read at import; again by a start the fork server serves (shim.main), whose environment
# is its client's, not the server's that imported this module.
STATE_ROOT = state_root()
DEFAULT_CONFIG_PATH = "/etc/zviz/shim.toml"
CONFIG_ENV = "ZVIZ_SHIM_CONFIG"

GROUPINGS = ("namespace", "pod", "container")
ID_RANGES = ("shared", "container")
# The default pool for id_ranges = "container": above the profiles' shared ranges.
DEFAULT_ID_POOL_FIRST = 1000000
DEFAULT_ID_POOL_RANGES = 1000
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
GROUP_ANNOTATION = "io.zviz.shim.group"
PROFILE_ANNOTATION = "io.zviz.profile"
# How the operator lets a spec without a network namespace share the node's (named in
# the refusal, runtime/security/__init__.py).
HOST_NETWORK_SWITCH = "allow_host_network = true in the shim config"

# The file in the bundle that tells `delete` (run after the daemon died) where things are.
BUNDLE_STATE_FILE = "zviz-shim.state"
# Unix socket paths are limited to 108 bytes; containerd's own limit is 106.
SOCKET_PATH_LIMIT = 106


class ConfigError(ValueError):
    pass


class ShimConfig:
    # A plain class, not a dataclass: `dataclasses` imports `inspect`, too slow for `start`.
    # The profile keys stay None when unset: a container's runtime-options config then
    # falls back to the machine-wide file's value (`over`).
    PROFILE_KEYS = (
        "profile",
        "allowed_annotation_profiles",
        "profile_dirs",
        "mode",
        "allowed_annotation_modes",
        "learn_dir",
        "id_ranges",
        "id_pool_first",
        "id_pool_ranges",
        "allow_host_network",
        "cluster_service_cidrs",
        "cluster_pod_cidrs",
        "cluster_dns",
    )
    # The daemon's own keys and their defaults: never taken from another file (`over`).
    DAEMON_KEYS = {"grouping": None, "idle_exit_seconds": 30.0, "stall_timeout_seconds": 30.0}
    # The keys that describe the cluster's network (cluster_network()).
    CLUSTER_KEYS = ("cluster_service_cidrs", "cluster_pod_cidrs", "cluster_dns")
    __slots__ = (*PROFILE_KEYS, *DAEMON_KEYS, "path")

    def __init__(self, path: str | None = None, **values) -> None:
        unknown = values.keys() - {*self.PROFILE_KEYS, *self.DAEMON_KEYS}
        if unknown:
            raise TypeError(f"ShimConfig: unknown keys {sorted(unknown)}")
        for key in self.PROFILE_KEYS:
            setattr(self, key, values.get(key))
        for key, default in self.DAEMON_KEYS.items():
            setattr(self, key, values.get(key, default))
        self.path = path

    def over(self, base: "ShimConfig") -> "ShimConfig":
        """This config's profile keys, each one unset here taken from BASE."""
        merged = ShimConfig(self.path, **{key: getattr(self, key) for key in self.DAEMON_KEYS})
        for key in self.PROFILE_KEYS:
            value = getattr(self, key)
            setattr(merged, key, getattr(base, key) if value is None else value)
        return merged

    def cluster_network(self):
        """The runtime's ClusterNetwork for these keys (None when none is set)."""
        if all(getattr(self, key) is None for key in self.CLUSTER_KEYS):
            return None
        from runtime.security.cluster import ClusterNetwork

        return ClusterNetwork.parse(
            self.cluster_service_cidrs, self.cluster_pod_cidrs, self.cluster_dns, self.path or ""
        )


def load_config(path: str | None) -> ShimConfig:
    """Read the shim config at PATH (or the default file); no file means defaults."""
    if not path:
        if not os.path.exists(DEFAULT_CONFIG_PATH):
            return ShimConfig()
        path = DEFAULT_CONFIG_PATH
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"shim config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"shim config {path}: {e}") from e
    unknown = set(data) - {*ShimConfig.PROFILE_KEYS, *ShimConfig.DAEMON_KEYS}
    if unknown:
        raise ConfigError(f"shim config {path}: unknown keys {sorted(unknown)}")
    profile = data.get("profile")
    if profile is not None and (not isinstance(profile, str) or not profile):
        raise ConfigError(f"shim config {path}: profile: must be a non-empty string")
    # Their entries are checked where they are used (runtime/security/selection.py).
    allowed = _string_list(data, "allowed_annotation_profiles", path)
    profile_dirs = _string_list(data, "profile_dirs", path)
    # The modes are checked where they are used too (selection.ProfilePolicy): an unknown
    # one fails every Create under this config.
    mode = data.get("mode")
    if mode is not None and (not isinstance(mode, str) or not mode):
        raise ConfigError(f"shim config {path}: mode: must be a non-empty string")
    allowed_modes = _string_list(data, "allowed_annotation_modes", path)
    learn_dir = data.get("learn_dir")
    if learn_dir is not None and (not isinstance(learn_dir, str) or not os.path.isabs(learn_dir)):
        raise ConfigError(f"shim config {path}: learn_dir: must be an absolute path")
    id_ranges = data.get("id_ranges")
    if id_ranges not in (None, *ID_RANGES):
        raise ConfigError(f"shim config {path}: id_ranges: {id_ranges!r} is not one of {ID_RANGES}")
    pool = {}
    for key, least in (("id_pool_first", 1), ("id_pool_ranges", 1)):
        value = data.get(key)
        if value is not None and (type(value) is not int or value < least):
            raise ConfigError(f"shim config {path}: {key}: must be an integer >= {least}")
        pool[key] = value
    allow_host_network = data.get("allow_host_network")
    if allow_host_network is not None and type(allow_host_network) is not bool:
        raise ConfigError(f"shim config {path}: allow_host_network: must be true or false")
    cluster = {key: _string_list(data, key, path) for key in ShimConfig.CLUSTER_KEYS}
    if any(value is not None for value in cluster.values()):
        # Checked here, so a bad address fails the config (and so the Create) by name.
        from runtime.errors import InvalidArgument

        try:
            ShimConfig(path=path, **cluster).cluster_network()
        except InvalidArgument as e:
            raise ConfigError(f"shim config {e}") from None
    grouping = data.get("grouping")
    if grouping is not None and grouping not in GROUPINGS:
        raise ConfigError(f"shim config {path}: grouping: {grouping!r} is not one of {GROUPINGS}")
    seconds = {}
    for key, least in (("idle_exit_seconds", 0), ("stall_timeout_seconds", 0.1)):
        value = data.get(key, ShimConfig.DAEMON_KEYS[key])
        if not isinstance(value, int | float) or isinstance(value, bool) or value < least:
            raise ConfigError(f"shim config {path}: {key}: must be a number >= {least:g}")
        seconds[key] = float(value)
    return ShimConfig(
        profile=profile,
        grouping=grouping,
        **seconds,
        path=path,
        allowed_annotation_profiles=allowed,
        profile_dirs=profile_dirs,
        mode=mode,
        allowed_annotation_modes=allowed_modes,
        learn_dir=learn_dir,
        id_ranges=id_ranges,
        allow_host_network=allow_host_network,
        **cluster,
        **pool,
    )


def _string_list(data: dict, key: str, path: str) -> tuple[str, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"shim config {path}: {key}: must be a list of non-empty strings")
    return tuple(value)


def group_id(container_id: str, annotations: dict, config: ShimConfig) -> str:
    """Which daemon serves a container: containers with equal group ids share one."""
    sandbox = annotations.get(SANDBOX_ID_ANNOTATION)
    # Under CRI (a sandbox id) the annotations are the pod author's, passed on by
    # containerd when the operator's pod_annotations list them: a pod must not choose to
    # join a daemon other pods use, so there only the operator's grouping decides.
    explicit = None if sandbox else annotations.get(GROUP_ANNOTATION)
    if explicit:
        return "group:" + explicit
    grouping = config.grouping or default_grouping(annotations)
    if grouping == "namespace":
        return "namespace"
    if grouping == "pod" and sandbox:
        return "pod:" + sandbox
    return "container:" + container_id


def default_grouping(annotations: dict) -> str:
    """Without a configured grouping: one daemon per pod under CRI, where every pod is in
    namespace k8s.io (a pod whose daemon dies or whose Create hangs takes no other pod
    with it); elsewhere one per namespace, the least memory."""
    return "pod" if annotations.get(SANDBOX_ID_ANNOTATION) else "namespace"


def group_dir(containerd_address: str, namespace: str, group: str) -> str:
    """The daemon's directory (socket, lock, reservations), unique per containerd and namespace."""
    key = sha256(f"{containerd_address}\0{namespace}\0{group}".encode()).hexdigest()
    return os.path.join(STATE_ROOT, "g", key)


def socket_path(gdir: str) -> str:
    return os.path.join(gdir, "sock")


def runtime_root(containerd_address: str, namespace: str) -> str:
    """The runtime core's state root for one containerd namespace."""
    key = sha256(containerd_address.encode()).hexdigest()[:16]
    return os.path.join(STATE_ROOT, "r", key, namespace)


def decode_runtime_options(data: bytes) -> str | None:
    """config_path from a serialized Any holding runtimeoptions.v1.Options, or None.

    Any is {type_url=1, value=2}; Options is {type_url=1, config_path=2}.
    """
    from shim import wire

    try:
        fields = wire.length_delimited_fields(data)
        type_url = fields.get(1, b"").decode(errors="replace")
        if not type_url.endswith("runtimeoptions.v1.Options"):
            return None
        path = wire.length_delimited_fields(fields.get(2, b"")).get(2, b"").decode()
    except wire.WireError as e:
        raise ConfigError(f"runtime options: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError("runtime options: config_path is not UTF-8") from None
    return path or None


def decode_start_input(data: bytes, container_id: str, namespace: str) -> tuple[str | None, bool]:
    """(config_path, bootstrap) from what containerd writes to `start`'s stdin.

    containerd before 2.3 writes the runtime options alone, a serialized Any; 2.3 and later
    write a BootstrapParams (api/proto/containerd/runtime/bootstrap/v1) with the options as
    one of its extensions, and expect a BootstrapResult back (start_reply). Both messages
    begin with two strings in fields 1 and 2, so the form is told as containerd's own shims
    tell it: a BootstrapParams names this container and namespace there, an Any a type URL.
    """
    from shim import wire

    try:
        fields = wire.all_length_delimited_fields(data)
        head = dict(fields)
        if data and head.get(1) == container_id.encode() and head.get(2) == namespace.encode():
            paths = [
                decode_runtime_options(wire.length_delimited_fields(extension).get(1, b""))
                for number, extension in fields
                if number == 8
            ]
            return next((p for p in paths if p), None), True
    except wire.WireError as e:
        raise ConfigError(f"bootstrap parameters: {e}") from None
    return decode_runtime_options(data), False


# The task API version `start` announces in a BootstrapResult: the daemon serves
# containerd.task.v2.Task (version 3 would be containerd.task.v3.Task).
TASK_API_VERSION = 2


def start_reply(address: str, bootstrap: bool) -> bytes:
    """What `start` writes to stdout: a BootstrapResult for a containerd that sent
    BootstrapParams, else the bare address containerd 1.x and 2.0-2.2 read."""
    if not bootstrap:
        return address.encode()
    from shim import wire

    return (
        wire.field_varint(1, TASK_API_VERSION)
        + wire.field_bytes(2, address.encode())
        + wire.field_bytes(3, b"ttrpc")
    )


def write_bundle_state(path: str, values: dict[str, str]) -> None:
    """key=value records separated by NUL (no value can contain one): read without json."""
    write_atomic(path, "".join(f"{key}={value}\0" for key, value in values.items() if value))


def write_atomic(path: str, data: str) -> None:
    """Readers see the old file or the new one, never a half-written one."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_bundle_state(path: str) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            data = f.read().decode()
    except (OSError, UnicodeDecodeError):
        return {}
    values = {}
    for record in data.split("\0"):
        key, sep, value = record.partition("=")
        if sep:
            values[key] = value
    return values


# Annotations that decide a group; when none of them appears in config.json's text,
# `start` need not parse it (the json module costs `start` more than all its work).
GROUPING_ANNOTATIONS = (SANDBOX_ID_ANNOTATION, GROUP_ANNOTATION)


def grouping_annotations(config_json: bytes) -> dict:
    """The annotations of a config.json that may matter for grouping ({} if none appears)."""
    if not any(key.encode() in config_json for key in GROUPING_ANNOTATIONS):
        return {}
    import json

    annotations = json.loads(config_json).get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ConfigError("config.json: annotations: must be an object")
    return annotations
