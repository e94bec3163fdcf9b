"""`zviz node install|uninstall`: make this install of zviz the node's containerd runtime.

What install does, each step idempotent (a second run writes the same bytes):
  - BIN_DIR/containerd-shim-zviz-v2 and BIN_DIR/zviz: the compiled fork-server clients
    built for this install (the fast shim `start`/`delete` and `zviz run`, runtime/forkserver.py),
    which exec this install's Python entries (pip's scripts, whose `#!` names its own
    venv's interpreter) for everything else; without a C compiler, symlinks to those
    entries (the slow path, said so). containerd finds shims on its PATH;
  - the exec anchor and the broker's warden, compiled from the wheel's
    runtime/exec_anchor.c and runtime/broker_warden.c into this install's own bin
    directory, where the runtime looks for them (runtime/static_programs.py; not
    BIN_DIR: they belong to the install, and --root does not move them). Without a C
    compiler and libc.a it is said so: execs then cannot reach PID 1's /proc entries,
    and each seccomp broker forks a Python warden;
  - the containerd runtime entry, as runtime/node/containerd.py plans it;
  - where AppArmor is active, a profile attached to the shim and zviz, loaded into the
    kernel: the one that lets zviz create user namespaces under Ubuntu's
    kernel.apparmor_restrict_unprivileged_userns (an Ubuntu kernel patch: Debian's
    kernel, with AppArmor on by default, has no such sysctl and gets the same profile
    without the userns rule its parser does not know);
  - prints the RuntimeClass a cluster needs.
A config that was there is copied to CONFIG.zviz-backup once (the first install), and
what install created is listed in STATE_FILE, so uninstall removes only that.
--root puts every default path under another directory (the tests' stand-in for /).
"""

import json
import os
import shutil
import subprocess
import sys

from runtime import forkserver
from runtime.node import containerd as containerd_config

SHIM_NAME = "containerd-shim-zviz-v2"
STATE_FILE = "var/lib/zviz/node-install.json"
# AppArmor's own switch, what aa-enabled reads: "Y" where the LSM is active. It needs no
# securityfs mount (which /sys/kernel/security/apparmor does), and it is read under --root
# like every other path, so a test's root stands in for the node's /sys.
APPARMOR_ENABLED = "/sys/module/apparmor/parameters/enabled"
# The policy the kernel holds, one "name (mode)" a line (securityfs).
APPARMOR_LOADED = "/sys/kernel/security/apparmor/profiles"
# Shipped by apparmor_parser 4 (Ubuntu 24.04), the first to know the `userns` rule;
# parser 3 (Debian 12) has abi/3.0 only and refuses both the rule and this abi.
APPARMOR_ABI_4 = "/etc/apparmor.d/abi/4.0"
# Every profile install loads is named this and the installed file's label ("zviz-shim").
APPARMOR_NAME_PREFIX = "zviz-"
# Where apparmor_parser lives when PATH lacks the sbin directories.
SBIN_PATH = "/usr/sbin:/sbin"
BACKUP_SUFFIX = ".zviz-backup"
RUNTIME_CLASS = f"""apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: zviz
handler: {containerd_config.HANDLER}
"""


class Paths:
    def __init__(self, root: str, config: str | None, bin_dir: str | None):
        self.root = os.path.abspath(root)
        self.config = config or self.under(containerd_config.DEFAULT_CONFIG)
        self.bin_dir = bin_dir or self.under("/usr/local/bin")
        self.state = self.under("/" + STATE_FILE)
        self.apparmor_profile = self.under("/etc/apparmor.d/zviz")

    def under(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))


def apparmor_enabled(paths: Paths) -> bool:
    try:
        with open(paths.under(APPARMOR_ENABLED)) as f:
            return f.read().strip() == "Y"
    except OSError:
        return False  # no AppArmor in this kernel (or not built in): nothing to install


def loaded_apparmor_profiles(paths: Paths) -> dict[str, str] | None:
    """{name: mode} of the profiles the kernel holds; None where securityfs cannot tell."""
    try:
        with open(paths.under(APPARMOR_LOADED)) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    loaded = {}
    for line in lines:
        name, _, mode = line.rpartition(" (")
        loaded[name] = mode.rstrip(")")
    return loaded


def apparmor_parser() -> str | None:
    return shutil.which("apparmor_parser", path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def scripts_dir() -> str:
    """This install's bin directory (the venv's), where pip put zviz and the shim."""
    return forkserver.scripts_dir()


def python_entry(entry: str = forkserver.ZVIZ_ENTRY) -> str:
    """pip's script for ENTRY (runtime/forkserver.py's ENTRIES): zviz-python, or
    containerd-shim-zviz-v2-python, where `make install` put the compiled client in its
    place."""
    return forkserver.python_entry(scripts_dir(), entry)


def install(paths: Paths, dry_run: bool, restart: bool, out) -> int:
    state = _read_state(paths)
    created = set(state.get("created", []))
    say = out.write
    # The config first: a config we refuse stops everything before anything is written.
    try:
        changes = containerd_config.plan(paths.config, containerd_config.containerd_version())
    except containerd_config.ConfigRefused as e:
        say(f"containerd config: REFUSED: {e}\n")
        return 1
    shim_target = os.path.join(scripts_dir(), SHIM_NAME)
    if not os.path.exists(shim_target):
        say(f"shim: {shim_target} missing: is zviz installed (pip install zviz-*.whl)?\n")
        return 1
    client = _has_compiler()
    # (label, installed name, the fork server's entry)
    entries = (("shim", SHIM_NAME, forkserver.SHIM_ENTRY), ("zviz", "zviz", forkserver.ZVIZ_ENTRY))
    steps = [
        (
            label,
            os.path.join(paths.bin_dir, name),
            ("client", "the compiled fork-server client")
            if client
            else ("link", python_entry(entry)),
        )
        for label, name, entry in entries
    ]
    # Every refusal before the first write: nothing is ever half-installed.
    for label, path, _ in steps:
        if os.path.lexists(path) and path not in created and not os.path.islink(path):
            say(f"{label}: {path} exists and is not zviz's: left as it is\n")
            return 1
    apparmor = apparmor_enabled(paths)
    profile_text = _apparmor_profile(steps, os.path.exists(paths.under(APPARMOR_ABI_4)))
    loads_apparmor = apparmor and paths.root == "/" and apparmor_parser() is not None
    if loads_apparmor:
        # -Q: parse only, into no kernel, so a profile the parser refuses stops install here
        parsed = subprocess.run(
            [apparmor_parser(), "-Q", "-K"], input=profile_text, capture_output=True, text=True
        )
        if parsed.returncode != 0:
            say(f"apparmor: apparmor_parser refuses the profile: {parsed.stderr.strip()}\n")
            return 1
    for label, path, (kind, what) in steps:
        if dry_run:
            if kind == "link":
                say(f"{label}: would link {path} -> {what} (the Python entry: no C compiler)\n")
            else:
                say(f"{label}: would install {path}: {what}\n")
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == "link":
            _replace_with_symlink(path, what)
            note = " (the Python entry: the slow path, no C compiler)"
            say(f"{label}: {path} -> {what}{note}\n")
        else:
            say(f"{label}: {path}: {what}\n")
        created.add(path)
    if client and not dry_run:
        for _label, name, entry in entries:
            _build_client(os.path.join(paths.bin_dir, name), entry)
    _build_static_programs(dry_run, say)
    backup = paths.config + BACKUP_SUFFIX
    for path, text in sorted(changes.items()):
        if dry_run:
            say(f"containerd config: would write {path}:\n{text}\n")
            continue
        if path == paths.config and os.path.exists(path) and not os.path.exists(backup):
            shutil.copy2(path, backup)
            say(f"containerd config: backup {backup}\n")
        if not os.path.exists(path):
            created.add(path)
        _write(path, text)
        say(f"containerd config: wrote {path}\n")
    if not changes:
        say(f"containerd config: {paths.config} already registers handler zviz\n")
    if not apparmor:
        say("apparmor: not present on this kernel: no profile needed\n")
    elif dry_run:
        say(f"apparmor: would install {paths.apparmor_profile}\n")
    else:
        changed = _write(paths.apparmor_profile, profile_text)
        created.add(paths.apparmor_profile)
        say(f"apparmor: {paths.apparmor_profile} ({_apparmor_purpose(profile_text)})\n")
        if not loads_apparmor:
            why = "--root is not this kernel" if paths.root != "/" else "no apparmor_parser"
            say(f"apparmor: not loaded ({why}); the apparmor package's service loads it at boot\n")
        elif not changed and _apparmor_names(steps) <= set(loaded_apparmor_profiles(paths) or ()):
            say("apparmor: unchanged and loaded: not reloaded\n")
        else:
            subprocess.run([apparmor_parser(), "-r", paths.apparmor_profile], check=True)
            say(f"apparmor: loaded {', '.join(sorted(_apparmor_names(steps)))}\n")
    if not dry_run:
        _write_state(paths, {"created": sorted(created), "config": paths.config})
    _restart(restart, dry_run, say)
    say("\nRuntimeClass for Kubernetes (kubectl apply -f -):\n" + RUNTIME_CLASS)
    return 0


def uninstall(paths: Paths, dry_run: bool, restart: bool, out) -> int:
    say = out.write
    state = _read_state(paths)
    backup = paths.config + BACKUP_SUFFIX
    original = None
    if os.path.exists(backup):
        with open(backup, encoding="utf-8") as f:
            original = f.read()
    changes = containerd_config.unplan(paths.config, original)
    for path, text in sorted(changes.items()):
        verb = "remove" if text is None else "write"
        if dry_run:
            say(f"containerd config: would {verb} {path}\n")
        elif text is None:
            os.unlink(path)
            say(f"containerd config: removed {path}\n")
        else:
            _write(path, text)
            say(f"containerd config: restored {path}\n")
    if os.path.exists(backup) and not dry_run:
        os.unlink(backup)
    for path in state.get("created", []):
        if path in changes or not os.path.lexists(path):
            continue
        if dry_run:
            say(f"would remove {path}\n")
            continue
        if path == paths.apparmor_profile and paths.root == "/" and apparmor_parser():
            # out of the kernel too, not only off the disk (a node without the parser
            # any more has nothing to unload it with: the file goes all the same)
            subprocess.run([apparmor_parser(), "-R", path], check=False)
        os.unlink(path)
        say(f"removed {path}\n")
    if not dry_run and os.path.exists(paths.state):
        os.unlink(paths.state)
    _restart(restart, dry_run, say)
    return 0


def _has_compiler() -> bool:
    """Whether the fork-server client can be compiled here (else zviz runs the slow path)."""
    return bool(shutil.which("cc") or shutil.which("gcc"))


def _build_client(path: str, entry: str) -> None:
    forkserver.compile_client(path, python_entry(entry), entry=entry)


def _build_static_programs(dry_run: bool, say) -> None:
    """The exec anchor (runtime/exec_anchor.py) and the broker's warden
    (runtime/security/broker/warden.py) where the runtime looks for them. Rebuilt on
    every install: a wheel upgraded in place keeps the old binaries, which the new
    runtime could not use. Left by uninstall, like the rest of the install they belong to."""
    from runtime import static_programs

    for label, program, with_it, without_it in _static_programs():
        path = program.binary_path()
        if dry_run:
            say(f"{label}: would build {path}\n")
            continue
        try:
            built = program.build(os.path.dirname(path))
        except (RuntimeError, OSError) as e:
            built, why = None, f"build failed: {e}"
        else:
            why = "no C compiler or no static libc"
        if built is None:
            say(f"{label}: not built ({why}): {without_it}; {static_programs.BUILD_HINT} again\n")
        else:
            say(f"{label}: {built} ({with_it})\n")


def _static_programs():
    """(label, module, what it gives, what its absence costs) of each static program."""
    from runtime import exec_anchor
    from runtime.security.broker import warden

    return (
        (
            "exec-anchor",
            exec_anchor,
            "execs run in PID 1's Landlock domain",
            "execs get a Landlock domain of their own and cannot write /proc/1/fd/1 or"
            " read /proc/1/environ",
        ),
        (
            "broker-warden",
            warden,
            "each seccomp broker's warden is this static program",
            "each seccomp broker forks a Python warden (~1 MiB more a container)",
        ),
    )


def _replace_with_symlink(path: str, target: str) -> None:
    if os.path.islink(path) and os.readlink(path) == target:
        return
    temporary = path + ".zviz-new"
    if os.path.lexists(temporary):
        os.unlink(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, path)


def _write(path: str, text: str) -> bool:
    """Whether PATH changed: same bytes leave the file (and its mtime) alone."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        pass
    temporary = path + ".zviz-new"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    if os.path.exists(path):
        shutil.copymode(path, temporary)
    os.replace(temporary, path)
    return True


def _apparmor_names(steps) -> set[str]:
    return {APPARMOR_NAME_PREFIX + label for label, _, _ in steps}


def _apparmor_profile(steps, abi_4: bool) -> str:
    """Ubuntu 24.04's pattern for a program that needs user namespaces (its runc profile).

    Unconfined: the profile exists to carry the `userns` rule and to attach, nothing is
    confined. Attached to each installed file's real path, since AppArmor matches the file
    exec'd after symlinks (the shim's link resolves to the install's script, which is what
    the kernel attaches to, not its interpreter). Without parser 4's abi the profile
    still attaches, and the rule that parser would refuse is left out: only an Ubuntu
    kernel mediates user namespace creation, and it ships parser 4.
    """
    abi, rules = ("4.0", "  userns,\n") if abi_4 else ("3.0", "")
    profiles = "".join(
        f'profile {APPARMOR_NAME_PREFIX}{label} "{_attached_file(path, how)}" '
        f"flags=(unconfined) {{\n{rules}}}\n"
        for label, path, how in steps
    )
    return f"abi <abi/{abi}>,\n\n" + profiles


def _attached_file(path: str, how: tuple[str, str]) -> str:
    """The file the kernel will see exec'd for PATH once installed: a link's resolved
    target (known before the link is made: the profile is parsed before any write)."""
    kind, what = how
    return os.path.realpath(what if kind == "link" else path)


def _apparmor_purpose(text: str) -> str:
    if "userns," in text:
        return "allows zviz's user namespaces"
    return "attached to zviz, without the userns rule: this apparmor_parser predates it"


def _restart(restart: bool, dry_run: bool, say) -> None:
    if not restart:
        say("containerd: not restarted (give --restart, or: systemctl restart containerd)\n")
    elif dry_run:
        say("containerd: would restart (systemctl restart containerd)\n")
    else:
        subprocess.run(["systemctl", "restart", "containerd"], check=True)
        say("containerd: restarted\n")


def _read_state(paths: Paths) -> dict:
    try:
        with open(paths.state) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {}


def _write_state(paths: Paths, state: dict) -> None:
    _write(paths.state, json.dumps(state, indent=2) + "\n")


def main_install(args) -> int:
    paths = Paths(args.root, args.containerd_config, args.bin_dir)
    if args.node_command == "install":
        return install(paths, args.dry_run, args.restart, sys.stdout)
    return uninstall(paths, args.dry_run, args.restart, sys.stdout)
