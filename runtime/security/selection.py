"""Who chooses a container's profile, and from where a profile file may come.

Three parties can name a profile, trusted differently:

- root on the host: `zviz --profile NAME_OR_FILE` (any built-in, any file);
- the operator: the shim config's `profile`, `allowed_annotation_profiles` and
  `profile_dirs` (a `ProfilePolicy`);
- whoever wrote the pod or the image: the annotation `io.zviz.profile` in
  config.json. It may only name a profile the operator allows (by default the built-ins
  not marked unsafe), never a file: a file could come from the image or a volume the
  pod writes, and a profile is the whole policy (user namespace and host root included).

Profile files the operator names load only through `load_root_owned_file`.

The profile's mode (enforce or audit, docs/denials.md) is chosen the same way: the
profile's own `mode`, over it the operator's `mode`, over that the annotation
`io.zviz.mode`, which may always ask for "enforce" (stricter) and for "audit" only when
the operator lists it in `allowed_annotation_modes`: audit mode lets through what the
profile would refuse, so a pod must not choose it on its own. The operator's mode (or an
allowed annotation) may also be "learn", the shim's: audit mode with the rootfs opened up,
and the profile the container needed written when it is deleted (shim/learn.py); the
profile chosen is then the learning's base (`base_profile`), and anything that resolves a
learn-mode policy without learning (the pod's sandbox container) runs it in audit mode.
"""

import os
from dataclasses import dataclass

from runtime.errors import InvalidArgument
from runtime.security.profiles import (
    ANNOTATION,
    DEFAULT_PROFILE,
    MODE_ANNOTATION,
    MODES,
    PROFILES_DIR,
    Profile,
    load_profile,
    load_root_owned_file,
    with_mode,
)

# The shim's mode beyond the profiles' own (module docstring).
LEARN_MODE = "learn"
POLICY_MODES = (*MODES, LEARN_MODE)

DEFAULT_RULE = (
    "without allowed_annotation_profiles in the shim config, an annotation may only name a "
    "built-in profile not marked unsafe"
)


@dataclass(frozen=True, slots=True)
class ProfilePolicy:
    # The profile when no annotation names one: a name, or the path of a profile file.
    default: str = DEFAULT_PROFILE
    # Profile names an annotation may choose; None: the built-ins not marked unsafe.
    allowed: tuple[str, ...] | None = None
    # Directories whose NAME.toml files are profiles named NAME (root-owned, checked).
    profile_dirs: tuple[str, ...] = ()
    # The operator's mode for every container (None: each profile's own).
    mode: str | None = None
    # Modes the annotation io.zviz.mode may choose beyond "enforce" (always allowed).
    allowed_modes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        named = [("mode", self.mode)] if self.mode is not None else []
        named += [("allowed_annotation_modes", mode) for mode in self.allowed_modes]
        for key, mode in named:
            if mode not in POLICY_MODES:
                raise InvalidArgument(
                    f"shim config: {key}: {mode!r} is not one of {', '.join(POLICY_MODES)}"
                )
        for name in self.allowed or ():
            # Names only: an annotation never loads a file, so a path here would mean nothing.
            if not is_profile_name(name):
                raise InvalidArgument(
                    f"shim config: allowed_annotation_profiles: {name!r} is not a profile name "
                    "(profile files go in profile_dirs)"
                )
        for directory in self.profile_dirs:
            if not os.path.isabs(directory):
                raise InvalidArgument(f"shim config: profile_dirs: {directory!r} is not absolute")


def is_profile_name(value: str) -> bool:
    """A plain name (a built-in or a file in profile_dirs), never a path."""
    return bool(value) and all(c.isalnum() or c in "-_" for c in value)


def choose(annotations: dict | None, policy: ProfilePolicy) -> Profile:
    """The profile for a container whose config.json has ANNOTATIONS, under POLICY, in the
    mode they choose (module docstring)."""
    mode = _profile_mode(policy.mode)
    profile = with_mode(_choose_profile(annotations, policy), mode, "shim config: mode")
    annotated = _profile_mode(annotated_mode(annotations, policy.allowed_modes))
    return with_mode(profile, annotated, MODE_ANNOTATION)


def _profile_mode(mode: str | None) -> str | None:
    """The profile mode a policy mode runs in: learning runs in audit mode."""
    return "audit" if mode == LEARN_MODE else mode


def learning(annotations: dict | None, policy: ProfilePolicy) -> bool:
    """Whether the container is learnt: the annotation io.zviz.mode asks for "learn" (and
    the operator allows it), or the operator's mode is "learn" and the annotation asks
    for no other mode."""
    asked = annotated_mode(annotations, policy.allowed_modes)
    return (asked if asked is not None else policy.mode) == LEARN_MODE


def base_profile(annotations: dict | None, policy: ProfilePolicy) -> Profile:
    """The profile a learnt container's learning extends: the one `choose` would pick,
    in its own mode."""
    return _choose_profile(annotations, policy)


def annotated_mode(annotations: dict | None, allowed: tuple[str, ...]) -> str | None:
    """The mode the annotation io.zviz.mode asks for, if ALLOWED lets it (else refused)."""
    value = (annotations or {}).get(MODE_ANNOTATION)
    if value is None:
        return None
    refused = f"mode {value!r} from annotation {MODE_ANNOTATION} refused"
    if value not in POLICY_MODES:
        raise InvalidArgument(f"{refused}: not one of {', '.join(POLICY_MODES)}")
    if value != "enforce" and value not in allowed:
        raise InvalidArgument(f"{refused}: not in the operator's allowed_annotation_modes")
    return value


def _choose_profile(annotations: dict | None, policy: ProfilePolicy) -> Profile:
    value = (annotations or {}).get(ANNOTATION)
    if value is None:
        return load_operator_profile(policy.default, policy.profile_dirs)
    if not isinstance(value, str):
        raise InvalidArgument(f"config.json: annotations.{ANNOTATION}: must be a string")
    refused = f"profile {value!r} from annotation {ANNOTATION} refused"
    if not is_profile_name(value):
        raise InvalidArgument(
            f"{refused}: an annotation may only name a profile, never a file (profile files "
            "are the host's choice: zviz --profile, or profile_dirs in the shim config)"
        )
    if policy.allowed is not None:
        if value not in policy.allowed:
            allowed = ", ".join(policy.allowed) or "none"
            raise InvalidArgument(
                f"{refused}: not in the operator's allowed_annotation_profiles ({allowed})"
            )
        return load_operator_profile(value, policy.profile_dirs)
    profile = load_profile(value)  # a name: a built-in, or "unknown profile"
    if profile.unsafe:
        raise InvalidArgument(f"{refused}: {DEFAULT_RULE}")
    return profile


def load_operator_profile(name: str, profile_dirs: tuple[str, ...]) -> Profile:
    """A profile the operator named: a built-in, NAME.toml in one of PROFILE_DIRS (the first
    that has it), or a file's absolute path; files only when root's (load_root_owned_file)."""
    if not is_profile_name(name):
        return load_root_owned_file(name)
    if os.path.isfile(os.path.join(PROFILES_DIR, name + ".toml")):
        return load_profile(name)
    for directory in profile_dirs:
        path = os.path.join(directory, name + ".toml")
        if os.path.lexists(path):
            return load_root_owned_file(path)
    dirs = f" or in profile_dirs ({', '.join(profile_dirs)})" if profile_dirs else ""
    raise InvalidArgument(f"profile: unknown profile {name!r}: not a built-in{dirs}")
