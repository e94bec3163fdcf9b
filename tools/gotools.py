"""The Go-built tools the integration tests run beside Debian's containerd 1.6: containerd 2.x
with its `ctr`, and nerdctl. `make tools` (`python3 -m tools.gotools`) builds them.

Each is built from its Go module at the version pinned here (the one place
the versions are named) into a cache outside the checkout, /var/cache/zviz-tools/<tool>-
<version>/bin, with Go's module and build caches beside it: a machine builds each version
once, later runs (and other checkouts) find the binaries and skip the build. Tests ask
`binary()` and skip, saying why, when a tool is not built (no `go` on the machine).

Standard library only: `make tools` runs before the venv exists.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

CACHE_ROOT = os.environ.get("ZVIZ_TOOLS_CACHE", "/var/cache/zviz-tools")


@dataclass(frozen=True)
class GoTool:
    name: str
    module: str
    version: str
    commands: tuple[str, ...]  # package paths inside the module; each gives one binary
    # containerd's btrfs snapshotter needs cgo and libbtrfs's headers, which a fresh
    # machine lacks; the tests use overlayfs, so it is left out rather than installed.
    tags: tuple[str, ...] = ()
    # -X settings: a build from the module directory has no module version in its build
    # info, so a tool that reads its version from there is told it here.
    version_variable: str = ""
    # Files of the module that its programs read from their working directory at run time
    # (runtime-tools' rootfs tarball), copied beside the binaries.
    data_files: tuple[str, ...] = ()
    # A module zip keeps vendor/modules.txt but not the vendored sources, so Go's default
    # vendor mode fails on such a module: it builds against the module cache instead.
    vendor_dir_stripped: bool = False
    # Programs copied into containers whose rootfs has no libc for them.
    static: bool = False

    @property
    def bin_dir(self) -> str:
        return os.path.join(CACHE_ROOT, f"{self.name}-{self.version}", "bin")

    def binaries(self) -> list[str]:
        """The named commands' binaries (a `dir/...` pattern names no single binary; "."
        is the module's own main package, named as Go names it: the module's last part)."""
        return [
            os.path.join(self.bin_dir, os.path.basename(self.module if c == "." else c))
            for c in self.commands
            if not c.endswith("...")
        ]


CONTAINERD2 = GoTool(
    name="containerd",
    module="github.com/containerd/containerd/v2",
    version="v2.4.2",
    # Its own runc shim too: Debian's (1.6) takes the BootstrapParams 2.x writes to `start`
    # for bare runtime options and fails, and runc is the tests' reference.
    commands=("cmd/containerd", "cmd/ctr", "cmd/containerd-shim-runc-v2"),
    tags=("no_btrfs",),
)
# nerdctl 2.0 is the last line that supports containerd 1.6 as well as 2.x (2.1 dropped 1.6).
NERDCTL = GoTool(
    name="nerdctl",
    module="github.com/containerd/nerdctl/v2",
    version="v2.0.5",
    commands=("cmd/nerdctl",),
    version_variable="github.com/containerd/nerdctl/v2/pkg/version.Version",
)
# The OCI runtime conformance suite: `runtimetest` (copied into each container) and the
# validation programs, one per directory of validation/ (tools/conformance.py runs them).
# The commit Debian packages (0.9.0+git20220423.g0105384); its pseudo-version names the
# commit's own time, which the proxy needs to resolve it.
RUNTIME_TOOLS = GoTool(
    name="runtime-tools",
    module="github.com/opencontainers/runtime-tools",
    version="v0.9.1-0.20220125021840-0105384f68e1",
    commands=("cmd/runtimetest", "validation/..."),
    data_files=("rootfs-amd64.tar.gz",),
    vendor_dir_stripped=True,
    static=True,
)
# The runc handler of containerd 2.x's CRI, the reference beside zviz: Debian's runc 1.1
# announces no id-mapped mounts (`runc features`), and 2.x refuses a hostUsers: false pod
# (whose /etc/hosts and friends are id-mapped) on a runtime that does not.
RUNC = GoTool(
    name="runc",
    module="github.com/opencontainers/runc",
    version="v1.5.3",
    commands=(".",),
    tags=("seccomp",),  # cgo and Debian's libseccomp-dev, as runc's own Makefile builds it
)
ALL = (CONTAINERD2, NERDCTL, RUNTIME_TOOLS, RUNC)


def binary(tool: GoTool, command: str) -> str | None:
    """The cached binary `command` of `tool`, or None when it is not built."""
    path = os.path.join(tool.bin_dir, command)
    return path if os.access(path, os.X_OK) else None


# Where Go's own release tarball installs itself, often left off a service's PATH.
GO_TARBALL_BINARY = "/usr/local/go/bin/go"


def go_binary() -> str | None:
    """The `go` to build with: the one on PATH, else the tarball's; None when neither."""
    found = shutil.which("go")
    if found is None and os.access(GO_TARBALL_BINARY, os.X_OK):
        found = GO_TARBALL_BINARY
    return found


def missing_reason(tool: GoTool) -> str:
    """Why `tool` is not there, for a test's skip message."""
    if go_binary() is None:
        return f"{tool.name} {tool.version} is not built and `go` is not installed (make tools)"
    return f"{tool.name} {tool.version} is not built in {tool.bin_dir}: run `make tools`"


def _go_env() -> dict[str, str]:
    return dict(
        os.environ,
        GOMODCACHE=os.path.join(CACHE_ROOT, "gomod"),
        GOCACHE=os.path.join(CACHE_ROOT, "gobuild"),
        GOFLAGS="-buildvcs=false",
        GOTOOLCHAIN="local",
    )


def build(tool: GoTool, go: str) -> float:
    """Build `tool` unless its binaries are cached; return the seconds the build took.

    What `go install MODULE/cmd/X@VERSION` does, spelled out: fetch the module at the
    pinned version, then build inside it. `go install pkg@version` itself refuses a module
    whose go.mod has replace directives (nerdctl's has one), and asks the proxy for the
    module's version list to look for deprecations, which a restricted proxy may refuse.
    """
    if all(os.access(b, os.X_OK) for b in tool.binaries()):
        return 0.0
    env = _go_env()
    started = time.monotonic()
    download = subprocess.run(
        [go, "mod", "download", "-json", f"{tool.module}@{tool.version}"],
        env=env,
        cwd=CACHE_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if download.returncode != 0:
        raise SystemExit(f"tools: fetching {tool.module}@{tool.version}: {download.stdout}")
    source = json.loads(download.stdout)["Dir"]
    # Into a fresh directory renamed into place at the end: an interrupted build leaves no
    # half set of binaries that the next run would take for a finished one.
    staging = tool.bin_dir + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    flags = ["-tags", ",".join(tool.tags)] if tool.tags else []
    if tool.version_variable:
        flags += ["-ldflags", f"-X {tool.version_variable}={tool.version}"]
    if tool.vendor_dir_stripped:
        flags += ["-mod=mod"]
    if tool.static:
        env["CGO_ENABLED"] = "0"
    # One `go build` for all: a directory as -o takes each main package's binary by its
    # directory's name, and the packages share one compile of their dependencies.
    subprocess.run(
        [go, "build", *flags, "-o", staging + "/", *("./" + c for c in tool.commands)],
        env=env,
        cwd=source,
        check=True,
    )
    for name in tool.data_files:
        shutil.copyfile(os.path.join(source, name), os.path.join(staging, name))
    shutil.rmtree(tool.bin_dir, ignore_errors=True)
    os.rename(staging, tool.bin_dir)
    return time.monotonic() - started


def version_line(tool: GoTool) -> str:
    """`name version: what the first binary says about itself` (or that it is missing)."""
    first = tool.binaries()[0]
    if not os.access(first, os.X_OK):
        return f"{tool.name} {tool.version}: not built ({missing_reason(tool)})"
    out = subprocess.run([first, "--version"], capture_output=True, text=True, check=False)
    first_line = (out.stdout or out.stderr).strip().split("\n")[0]  # runc says more
    return f"{tool.name} {tool.version}: {first_line}"


def main() -> int:
    go = go_binary()
    if go is None:
        print(
            "tools: `go` is not installed: the containerd 2.x, nerdctl and conformance tests"
            " will skip"
        )
        return 0
    os.makedirs(CACHE_ROOT, exist_ok=True)
    for tool in ALL:
        seconds = build(tool, go)
        state = f"built in {seconds:.0f}s" if seconds else "cached"
        print(f"tools: {version_line(tool)} ({state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
