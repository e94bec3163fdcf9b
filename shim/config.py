"""Where the shim keeps its files, and the shim's own configuration.

Imported by `start`, which runs once per container: standard library only, and
the TOML reader only when a config file exists.

The configuration comes from a TOML file named by the runtime options containerd
passes (`runtimeoptions.v1.Options.config_path`: CRI's `options.ConfigPath`, or
`ctr run --runtime-config-path`), else from /etc/zviz/shim.toml when present:

    profile = "ci-runner"          # profile when the spec has no io.zviz.profile annotation
    grouping = "namespace"         # namespace | pod | container: which containers share a daemon
    idle_exit_seconds = 30         # how long an idle daemon waits for the next container
"""

import hashlib
import os

STATE_ROOT = os.environ.get("ZVIZ_SHIM_ROOT", "/run/zviz-shim")
DEFAULT_CONFIG_PATH = "/etc/zviz/shim.toml"
CONFIG_ENV = "ZVIZ_SHIM_CONFIG"

GROUPINGS = ("namespace", "pod", "container")
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
GROUP_ANNOTATION = "io.zviz.shim.group"
PROFILE_ANNOTATION = "io.zviz.profile"

# The file in the bundle that tells `delete` (run after the daemon died) where things are.
BUNDLE_STATE_FILE = "zviz-shim.json"
# Unix socket paths are limited to 108 bytes; containerd's own limit is 106.
SOCKET_PATH_LIMIT = 106


class ConfigError(ValueError):
    pass


class ShimConfig:
    # A plain class, not a dataclass: `dataclasses` imports `inspect`, too slow for `start`.
    __slots__ = ("profile", "grouping", "idle_exit_seconds", "path")

    def __init__(
        self,
        profile: str | None = None,
        grouping: str = "namespace",
        idle_exit_seconds: float = 30.0,
        path: str | None = None,
    ) -> None:
        self.profile = profile
        self.grouping = grouping
        self.idle_exit_seconds = idle_exit_seconds
        self.path = path


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
    unknown = set(data) - {"profile", "grouping", "idle_exit_seconds"}
    if unknown:
        raise ConfigError(f"shim config {path}: unknown keys {sorted(unknown)}")
    profile = data.get("profile")
    if profile is not None and (not isinstance(profile, str) or not profile):
        raise ConfigError(f"shim config {path}: profile: must be a non-empty string")
    grouping = data.get("grouping", "namespace")
    if grouping not in GROUPINGS:
        raise ConfigError(f"shim config {path}: grouping: {grouping!r} is not one of {GROUPINGS}")
    idle = data.get("idle_exit_seconds", 30.0)
    if not isinstance(idle, int | float) or isinstance(idle, bool) or idle < 0:
        raise ConfigError(f"shim config {path}: idle_exit_seconds: must be a number >= 0")
    return ShimConfig(profile=profile, grouping=grouping, idle_exit_seconds=float(idle), path=path)


def group_id(container_id: str, annotations: dict, config: ShimConfig) -> str:
    """Which daemon serves a container: containers with equal group ids share one."""
    explicit = annotations.get(GROUP_ANNOTATION)
    if explicit:
        return "group:" + explicit
    if config.grouping == "namespace":
        return "namespace"
    sandbox = annotations.get(SANDBOX_ID_ANNOTATION)
    if config.grouping == "pod" and sandbox:
        return "pod:" + sandbox
    return "container:" + container_id


def group_dir(containerd_address: str, namespace: str, group: str) -> str:
    """The daemon's directory (socket, lock, reservations), unique per containerd and namespace."""
    key = hashlib.sha256(f"{containerd_address}\0{namespace}\0{group}".encode()).hexdigest()
    return os.path.join(STATE_ROOT, "g", key)


def socket_path(gdir: str) -> str:
    return os.path.join(gdir, "sock")


def runtime_root(containerd_address: str, namespace: str) -> str:
    """The runtime core's state root for one containerd namespace."""
    key = hashlib.sha256(containerd_address.encode()).hexdigest()[:16]
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
