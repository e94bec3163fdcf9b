"""The OCI runtime features document (`zviz features`), shaped like `runc features`.

Each list says what zviz both recognises in config.json and applies: a name the
runtime would accept but ignore is left out, so a caller never relies on a feature
that is not there. The names come from the modules that implement them (spec.py
for what parses, rootfs.py for mount options, security/seccomp.py for seccomp).
"""

from runtime import spec
from runtime.errors import ZvizError

OCI_VERSION_MIN = "1.0.0"
OCI_VERSION_MAX = "1.2.0"

# Every OCI hook runs (runtime/hooks.py).
SUPPORTED_HOOKS: tuple[str, ...] = spec.HOOK_NAMES

# security/seccomp.py refuses SCMP_ACT_NOTIFY from config.json: the profile's
# broker owns the one seccomp listener.
UNSUPPORTED_SECCOMP_ACTIONS = ("SCMP_ACT_NOTIFY",)

# security/seccomp.py maps these to 0: SPEC_ALLOW would turn off the speculative
# store bypass mitigation, and WAIT_KILLABLE_RECV only matters to a listener.
UNSUPPORTED_SECCOMP_FLAGS = (
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
)

# Annotations in config.json that change what the runtime does: a caller that lets
# untrusted users set annotations should filter these. io.zviz.profile can only choose
# among the profiles the operator allows (security/selection.py), never load a file.
UNSAFE_ANNOTATIONS = ("io.zviz.profile",)


def features() -> dict:
    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": OCI_VERSION_MAX,
        "hooks": list(SUPPORTED_HOOKS),
        "mountOptions": mount_options(),
        "linux": {
            "namespaces": namespaces(),
            "capabilities": capabilities(),
            "cgroup": {
                "v1": True,
                "v2": True,
                "systemd": False,
                "systemdUser": False,
                "rdma": False,
            },
            "seccomp": {
                "enabled": True,
                "actions": sorted(
                    a for a in spec.SECCOMP_ACTIONS if a not in UNSUPPORTED_SECCOMP_ACTIONS
                ),
                "operators": sorted(spec.SECCOMP_OPERATORS),
                "archs": sorted(spec.SECCOMP_ARCHS),
                "knownFlags": list(spec.SECCOMP_FLAGS),
                "supportedFlags": [
                    f for f in spec.SECCOMP_FLAGS if f not in UNSUPPORTED_SECCOMP_FLAGS
                ],
            },
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
            # rootfs.py refuses the idmap options and does not apply mounts[].uidMappings.
            "mountExtensions": {"idmap": {"enabled": False}},
        },
        "annotations": annotations(),
        "potentiallyUnsafeConfigAnnotations": list(UNSAFE_ANNOTATIONS),
    }


def mount_options() -> list[str]:
    """The mount option names rootfs.py turns into flags (anything else goes to the filesystem as data)."""
    from runtime import rootfs

    recognised = set(rootfs._FLAG_OPTIONS) | set(rootfs.PROPAGATION)
    return sorted(recognised & set(spec.MOUNT_FLAG_OPTIONS))


def namespaces() -> list[str]:
    from runtime.linux import NAMESPACE_FLAGS

    return sorted(set(spec.NAMESPACE_TYPES) & set(NAMESPACE_FLAGS))


def capabilities(cap_last_cap_path: str = "/proc/sys/kernel/cap_last_cap") -> list[str]:
    """Capability names up to the running kernel's last one (all zviz knows if it cannot tell)."""
    try:
        with open(cap_last_cap_path) as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = len(spec.CAPABILITIES) - 1
    return list(spec.CAPABILITIES[: last + 1])


def annotations() -> dict[str, str]:
    result = {
        "io.zviz.version": _zviz_version(),
        "io.zviz.profile.default": "",
        "io.zviz.profiles": "",
    }
    try:
        from runtime.security import profiles

        result["io.zviz.profile.default"] = profiles.DEFAULT_PROFILE
        result["io.zviz.profiles"] = ",".join(profiles.list_profiles())
    except (ImportError, OSError, ZvizError):
        pass  # the document still answers without the profile list
    libseccomp = _libseccomp_version()
    if libseccomp:
        result["io.github.seccomp.libseccomp.version"] = libseccomp
    return {k: v for k, v in result.items() if v}


def _zviz_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zviz")
    except PackageNotFoundError:
        return ""  # run from the tree, not installed


def _libseccomp_version() -> str:
    import ctypes

    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return ""
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    v = lib.seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"
