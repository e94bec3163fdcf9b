"""The static C programs zviz compiles at install (`make install`, `zviz node install`):
the exec anchor (runtime/exec_anchor.c) and the broker's warden (runtime/broker_warden.c).

One place decides where they are (the install's bin directory), how they are built
(statically: the anchor runs in the container's root, which may have no libc) and how a
binary says which source it was built from (`--layout`, a hex constant each program's
Python side mirrors). Without a C compiler or libc6-dev neither is built and the runtime
takes each one's fallback.
"""

import os
import sys

# Each program's binary name and its source beside this module.
SOURCES = {"zviz-anchor": "exec_anchor.c", "zviz-warden": "broker_warden.c"}
# What `zviz node check` and `zviz node install` tell a node without a built program.
BUILD_HINT = "install gcc and libc6-dev, then run `zviz node install`"


def binary_path(name: str) -> str:
    """Where the runtime looks for the compiled program NAME, and where `make install`
    and `zviz node install` build it: the install's bin directory, beside the interpreter
    (in a venv, the checkout's .venv or a wheel's, the directory pip put zviz and the
    shim in). sys.executable rather than sysconfig: that costs a `zviz run` 4 ms."""
    return os.path.join(os.path.dirname(sys.executable), name)


def build(bin_dir: str, name: str) -> str | None:
    """Compile NAME's source (SOURCES), statically, into BIN_DIR/NAME; None
    without a C compiler or a static libc (libc6-dev). The same binary as before is left
    alone (a second install changes nothing)."""
    import filecmp
    import shutil
    import subprocess
    import tempfile

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not has_static_libc(compiler):
        return None
    source = os.path.join(os.path.dirname(os.path.realpath(__file__)), SOURCES[name])
    output = os.path.join(os.path.abspath(bin_dir), name)
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as scratch:
        built = os.path.join(scratch, name)
        compiled = subprocess.run(
            [compiler, "-O2", "-Wall", "-Werror", "-static", "-s", "-o", built, source],
            capture_output=True,
            text=True,
        )
        if compiled.returncode != 0:
            # With a compiler and libc.a, a failure is the source's: said, not hidden as
            # "not built" (the runtime would quietly take the fallback).
            raise RuntimeError(f"{compiler} {source}: {compiled.stderr.strip()}")
        if os.path.exists(output) and filecmp.cmp(built, output, shallow=False):
            return output
        shutil.copy2(built, output + ".new")
    os.replace(output + ".new", output)
    return output


def built_layout(path: str) -> int | None:
    """The layout (a hex constant) the program at PATH was built for; None if it cannot
    say (missing, not executable, built before it could)."""
    import subprocess

    try:
        answered = subprocess.run([path, "--layout"], capture_output=True, text=True, timeout=10)
        return int(answered.stdout.strip(), 16) if answered.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def has_static_libc(compiler: str) -> bool:
    """Whether COMPILER finds libc.a (libc6-dev): it prints the bare name when it does not."""
    import subprocess

    found = subprocess.run(
        [compiler, "-print-file-name=libc.a"], capture_output=True, text=True
    ).stdout.strip()
    return os.path.isabs(found) and os.path.exists(found)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"] and len(sys.argv) == 3:
        for name in SOURCES:
            print(build(sys.argv[2], name) or f"{name}: no C compiler or static libc: not built")
    else:
        sys.exit("usage: python -m runtime.static_programs --build BIN_DIR")
