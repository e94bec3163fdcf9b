"""`zviz profile learn --base NAME [--out FILE] -- ctr [...] run ...`: learning through the
shim (docs/profiles.md, "Learning a profile"). The `ctr run` is run as given, with
`--rm` (the shim writes the learned profile once the container exited, before the
Delete `ctr run` makes is answered: no container is left behind), and with the
annotations that ask the shim for learn mode and for NAME as the base, unless the
shim config already says so. The shim config (`--runtime-config-path`, else the
machine-wide file) must allow learn mode and name a learn_dir: said here before
anything runs. The learned profile is then read from learn_dir (shim/learn.py names
it) and written to FILE (or stdout).
"""

import os
import subprocess
import time

from runtime.errors import InvalidArgument

# ctr's options that take no value (containerd 1.6 and 2.x); every other option is
# taken to have one, unless written --option=value.
BOOLEAN_GLOBAL = {"--debug", "--help", "-h", "--version", "-v"}
BOOLEAN_RUN = {
    "--rm", "--null-io", "--detach", "-d", "--cni", "--runc-systemd-cgroup",
    "--remap-labels", "--net-host", "--privileged", "--privileged-without-host-devices",
    "--read-only", "--tty", "-t", "--allow-new-privs", "--seccomp", "--rootfs",
    "--no-pivot", "--sync-fs",
}  # fmt: skip
MODE_ANNOTATION = "io.zviz.mode"
PROFILE_ANNOTATION = "io.zviz.profile"
# After ctr returns, how long the learned file may take to appear (the shim writes it
# before the Delete `ctr run` makes is answered: normally it is there already).
WAIT_SECONDS = 10.0


class CtrRun:
    """A `ctr ... run ...` command line, read as far as learning needs."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)
        self.namespace = os.environ.get("CONTAINERD_NAMESPACE") or "default"
        self.run_at = None
        i = 1
        while i < len(argv) and argv[i].startswith("-"):
            name = argv[i].split("=")[0]
            i, value = _option(argv, i, BOOLEAN_GLOBAL)
            if name in ("--namespace", "-n"):
                self.namespace = value
        if i >= len(argv) or argv[i] != "run":
            raise InvalidArgument("profile learn: the command must be `ctr [...] run ...`")
        self.run_at = i
        self.options: dict[str, str | None] = {}
        i += 1
        positional = []
        while i < len(argv):
            if argv[i] == "--":
                positional += argv[i + 1 :]
                break
            if argv[i].startswith("-") and not positional:
                name = argv[i].split("=")[0]
                i, value = _option(argv, i, BOOLEAN_RUN)
                self.options[name] = value
                continue
            positional.append(argv[i])
            i += 1
        if len(positional) < 2:
            raise InvalidArgument("profile learn: `ctr run` needs an image and a container id")
        self.container_id = positional[1]

    def has(self, *names: str) -> bool:
        return any(name in self.options for name in names)

    def with_run_options(self, extra: list[str]) -> list[str]:
        at = self.run_at + 1
        return self.argv[:at] + extra + self.argv[at:]


def _option(argv: list[str], i: int, booleans: set[str]) -> tuple[int, str | None]:
    """(the index after the option at I, its value or None)."""
    name, equals, value = argv[i].partition("=")
    if equals:
        return i + 1, value
    if name in booleans:
        return i + 1, None
    if i + 1 >= len(argv):
        raise InvalidArgument(f"profile learn: ctr option {name} needs a value")
    return i + 2, argv[i + 1]


def learn_through_ctr(base_name: str, out: str | None, argv: list[str]) -> int:
    from runtime.security import selection
    from shim import config as shim_config
    from shim import learn as shim_learn

    command = CtrRun(argv)
    if command.has("--detach", "-d"):
        raise InvalidArgument(
            "profile learn: --detach: the learned profile is read once the run ends"
        )
    config_path = command.options.get("--runtime-config-path")
    where = config_path or shim_config.DEFAULT_CONFIG_PATH
    try:
        config = shim_config.load_config(config_path)
        if config_path:
            config = config.over(shim_config.load_config(None))
    except shim_config.ConfigError as e:
        raise InvalidArgument(f"profile learn: {e}") from None
    allowed = selection.LEARN_MODE in (config.allowed_annotation_modes or ())
    if not (config.mode == selection.LEARN_MODE or allowed) or not config.learn_dir:
        raise InvalidArgument(
            f"profile learn: the shim config ({where}) does not allow learning: it needs "
            'allowed_annotation_modes = ["learn"] (or mode = "learn") and learn_dir'
        )
    extra = [] if command.has("--rm") else ["--rm"]
    if config.mode != selection.LEARN_MODE:
        extra += ["--annotation", f"{MODE_ANNOTATION}=learn"]
    if base_name != (config.profile or selection.DEFAULT_PROFILE):
        if not selection.is_profile_name(base_name):
            raise InvalidArgument(
                f"profile learn: --base {base_name!r}: through the shim, the config's profile "
                "or a profile name its annotation may choose (never a file)"
            )
        extra += ["--annotation", f"{PROFILE_ANNOTATION}={base_name}"]
    name = shim_learn.learned_file_name(command.namespace, command.container_id, {})
    learned_path = os.path.join(config.learn_dir, name)
    before = _identity(learned_path)
    from runtime.commands import ForwardedSignals

    # ctr run passes them on to the task (its --rm then deletes the container, and the
    # shim writes what was learned); before ctr runs, one ends the learning.
    signals = ForwardedSignals()
    if signals.stop_signal() is None:
        ctr = subprocess.Popen(command.with_run_options(extra))
        signals.forward_to(ctr.pid)
        code = ctr.wait()
        signals.target_exited()
    stop = signals.stop_signal()
    if stop is not None:
        from runtime.security.learn_run import stopped

        return stopped(stop)
    deadline = time.monotonic() + WAIT_SECONDS
    while _identity(learned_path) == before:
        if time.monotonic() > deadline:
            raise InvalidArgument(
                f"profile learn: no learned profile at {learned_path} (ctr exited {code}; "
                "the shim's log says why)"
            )
        time.sleep(0.1)
    with open(learned_path) as f:
        text = f.read()
    if out:
        stem = os.path.basename(out).removesuffix(".toml")
        text = text.replace(f'name = "{name.removesuffix(".toml")}"', f'name = "{stem}"', 1)
    from runtime.security.learn_run import emit

    return emit(text, out, f"ctr exited {code}" if code != 0 else None)


def _identity(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
