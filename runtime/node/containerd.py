"""containerd as `zviz node check|install` see it: its version, its config, zviz's entries.

Config version 2 (containerd 1.6/1.7) names the CRI plugin `io.containerd.grpc.v1.cri`,
version 3 (containerd 2.x) `io.containerd.cri.v1.runtime`. The runtime entry is the same
under either: `runtime_type = "io.containerd.zviz.v2"` as handler `zviz`, the name a
Kubernetes RuntimeClass gives.

Where the entry goes: containerd 1.x merges an imported file by replacing whole plugin
sections (containerd issue 5837), so a drop-in naming the CRI plugin would erase a CRI
section the main config has; 2.0 merges them key by key (containerd PR 9982). A drop-in
(conf.d/zviz.toml beside the main config, reached through `imports`) is used where
that loses nothing: always for version 3, for version 2 only when the main config has no
CRI section. Otherwise a marked block is appended to the main config. Either way the
result is parsed again before anything is written, and a config that does not parse or
whose version is unknown is reported, never rewritten.
"""

import fnmatch
import glob
import os
import re
import shutil
import subprocess
import tomllib

RUNTIME_TYPE = "io.containerd.zviz.v2"
HANDLER = "zviz"
DEFAULT_CONFIG = "/etc/containerd/config.toml"
CRI_PLUGIN = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
DROP_IN_NAME = "zviz.toml"
BLOCK_BEGIN = "# BEGIN zviz: written by `zviz node install`, removed by `zviz node uninstall`"
BLOCK_END = "# END zviz"


class ConfigRefused(Exception):
    """A containerd config zviz will not edit: broken, of an unknown version, or conflicting."""


def containerd_version(binary: str = "containerd") -> str | None:
    """'1.6.20' from `containerd --version`; None when there is no containerd."""
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\sv?(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else None


def config_version_for(containerd: str | None) -> int:
    """The config version a containerd writes by default: 3 from 2.0 on, else 2."""
    if containerd and int(containerd.split(".")[0]) >= 2:
        return 3
    return 2


def read_config(path: str) -> tuple[str | None, dict]:
    """(text, parsed) of the config at PATH; (None, {}) when there is none.

    Raises ConfigRefused for a file that is not TOML or has no known version (a file
    without `version` is a version-1 config, which containerd 2.x no longer reads).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None, {}
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigRefused(f"{path}: not valid TOML ({e}); left as it is") from e
    version = data.get("version")
    if version not in CRI_PLUGIN:
        raise ConfigRefused(
            f"{path}: config version {version!r} is not one zviz writes (2 or 3); left as it is"
        )
    return text, data


def runtime_entry(data: dict, version: int) -> dict | None:
    """The `zviz` runtime table in a parsed config, if it has one."""
    runtimes = (
        data.get("plugins", {})
        .get(CRI_PLUGIN[version], {})
        .get("containerd", {})
        .get("runtimes", {})
    )
    entry = runtimes.get(HANDLER)
    return entry if isinstance(entry, dict) else None


def registered(path: str) -> tuple[bool, str]:
    """Whether the config at PATH (with its imports) registers zviz, and how we know."""
    text, data = read_config(path)
    if text is None:
        return False, f"{path} does not exist"
    version = data["version"]
    sources = [(path, data)]
    for pattern in data.get("imports", []):
        for imported in sorted(glob.glob(pattern)):
            try:
                with open(imported, "rb") as f:
                    sources.append((imported, tomllib.load(f)))
            except (OSError, tomllib.TOMLDecodeError):
                continue
    for source, parsed in sources:
        entry = runtime_entry(parsed, version)
        if entry is not None:
            if entry.get("runtime_type") == RUNTIME_TYPE:
                return True, f"handler {HANDLER!r} in {source} (config version {version})"
            return (
                False,
                f"{source}: handler {HANDLER!r} has runtime_type {entry.get('runtime_type')!r}",
            )
    return False, f"{path} (config version {version}) has no handler {HANDLER!r}"


def entry_text(version: int) -> str:
    plugin = CRI_PLUGIN[version]
    return (
        f'[plugins."{plugin}".containerd.runtimes.{HANDLER}]\n  runtime_type = "{RUNTIME_TYPE}"\n'
    )


def drop_in_path(config_path: str) -> str:
    return os.path.join(os.path.dirname(config_path), "conf.d", DROP_IN_NAME)


def plan(config_path: str, containerd: str | None) -> dict[str, str | None]:
    """What `node install` writes: {path: new text}; None as a value means "remove".

    Raises ConfigRefused when the config cannot be edited safely. An empty dict means
    the config already has exactly zviz's entry.
    """
    text, data = read_config(config_path)
    if text is None:
        version = config_version_for(containerd)
        text, data = f"version = {version}\n", {"version": version}
    version = data["version"]
    existing = runtime_entry(data, version)
    ours_in_main = BLOCK_BEGIN in text
    drop_in = drop_in_path(config_path)
    if existing is not None and not ours_in_main:
        if existing.get("runtime_type") == RUNTIME_TYPE:
            return {}  # registered by hand: nothing to do
        raise ConfigRefused(
            f"{config_path}: handler {HANDLER!r} already exists with runtime_type "
            f"{existing.get('runtime_type')!r}; left as it is"
        )
    if ours_in_main:
        return {}  # our block is there (idempotent)
    header = f"# zviz runtime for containerd (config version {version}); see `zviz node install`\n"
    drop_in_text = f"{header}version = {version}\n\n{entry_text(version)}"
    cri_in_main = CRI_PLUGIN[version] in data.get("plugins", {})
    if version == 3 or not cri_in_main:
        imports = data.get("imports", [])
        if any(fnmatch.fnmatch(drop_in, pattern) for pattern in imports):
            new_main = text
        elif "imports" in data:
            # Editing a user's array in place is where text edits go wrong: append instead.
            return _append_plan(config_path, text, version)
        else:
            new_main = _insert_imports(text, drop_in)
        _check_parses(new_main, config_path)
        _check_parses(drop_in_text, drop_in)
        changes = {drop_in: drop_in_text}
        if new_main != text or not os.path.exists(config_path):
            changes[config_path] = new_main
        return changes
    return _append_plan(config_path, text, version)


def _append_plan(config_path: str, text: str, version: int) -> dict[str, str | None]:
    block = f"\n{BLOCK_BEGIN}\n{entry_text(version)}{BLOCK_END}\n"
    new_main = text + ("" if text.endswith("\n") else "\n") + block
    parsed = _check_parses(new_main, config_path)
    if (runtime_entry(parsed, version) or {}).get("runtime_type") != RUNTIME_TYPE:
        raise ConfigRefused(f"{config_path}: appending zviz's entry would not register it")
    return {config_path: new_main}


def _insert_imports(text: str, drop_in: str) -> str:
    """The config with `imports = [DROP_IN]` right after its `version` line (a top-level key)."""
    line = f'imports = ["{drop_in}"]  # zviz: added by `zviz node install`\n'
    match = re.search(r"^version\s*=.*\n?", text, re.MULTILINE)
    if match is None:
        return line + text
    end = match.end()
    prefix = text[:end] if text[:end].endswith("\n") else text[:end] + "\n"
    return prefix + line + text[end:]


def _check_parses(text: str, path: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigRefused(f"{path}: zviz's edit would not parse ({e}); left as it is") from e


def unplan(config_path: str, original: str | None) -> dict[str, str | None]:
    """What `node uninstall` writes: the main config without zviz's edits, the drop-in removed.

    ORIGINAL is the backup's text when one was kept (None: the config did not exist
    before `node install`): restored as it was only while the config still equals what
    install wrote, so edits made since are not thrown away.
    """
    changes: dict[str, str | None] = {}
    drop_in = drop_in_path(config_path)
    if os.path.exists(drop_in):
        changes[drop_in] = None
    try:
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return changes
    stripped = re.sub(
        r"\n?" + re.escape(BLOCK_BEGIN) + r"\n.*?" + re.escape(BLOCK_END) + r"\n",
        "",
        text,
        flags=re.DOTALL,
    )
    stripped = re.sub(
        r'^imports = \[".*?"\]  # zviz: added by `zviz node install`\n',
        "",
        stripped,
        flags=re.MULTILINE,
    )
    if original is not None and stripped == original:
        if text != original:
            changes[config_path] = original
    elif original is None and stripped.strip() in ("version = 2", "version = 3"):
        changes[config_path] = None  # install created it
    elif stripped != text:
        changes[config_path] = stripped
    return changes
