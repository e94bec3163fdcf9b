"""Shared fixtures for tests against the real kernel, containerd, runc and gVisor.

All of them need root; the suite refuses to run without it rather than pass vacuously.
"""

import os
import shutil
import sys

import pytest

from tools.containerd import PrivateContainerd, runsc_wrapper
from tools.mkbundle import build_bundle
from tools.mkimage import DEFAULT_REF, build_image

VENV_BIN = os.path.dirname(sys.executable)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        raise pytest.UsageError("integration tests run real containers and need root")


@pytest.fixture(scope="session")
def zviz_bin() -> str:
    path = os.path.join(VENV_BIN, "zviz")
    assert os.access(path, os.X_OK), f"{path} missing: run `make install`"
    return path


@pytest.fixture(scope="session")
def shim_bin() -> str:
    path = os.path.join(VENV_BIN, "containerd-shim-zviz-v2")
    assert os.access(path, os.X_OK), f"{path} missing: run `make install`"
    return path


@pytest.fixture(scope="session")
def runc_bin() -> str:
    path = shutil.which("runc")
    assert path, "runc missing: `make deps` installs it"
    return path


@pytest.fixture(scope="session")
def runsc_bin() -> str:
    path = shutil.which("runsc")
    assert path, "runsc missing: `make deps` installs it"
    return path


@pytest.fixture(scope="session")
def containerd():
    instance = PrivateContainerd().start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def busybox_image(containerd, tmp_path_factory) -> str:
    archive = str(tmp_path_factory.mktemp("image") / "busybox.tar")
    build_image(archive, DEFAULT_REF)
    containerd.import_image(archive)
    return DEFAULT_REF


@pytest.fixture(scope="session")
def runsc_runc_binary(tmp_path_factory, runsc_bin) -> str:
    """A runc-compatible wrapper for gVisor, for `ctr run --runc-binary`."""
    return runsc_wrapper(str(tmp_path_factory.mktemp("runsc")))


@pytest.fixture
def make_bundle(tmp_path):
    """make_bundle(args=[...], **config_overrides) -> path of a fresh busybox bundle."""
    counter = iter(range(1000))

    def make(args=("true",), **overrides) -> str:
        return build_bundle(str(tmp_path / f"bundle{next(counter)}"), args=list(args), **overrides)

    return make


def _leftovers() -> list[str]:
    """Every zviz mount, cgroup, process and state directory still on the machine."""
    found = []
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if "zviz" in line.split()[4]]
    for hierarchy in os.listdir("/sys/fs/cgroup"):
        top = os.path.join("/sys/fs/cgroup", hierarchy)
        for dirpath, dirnames, _ in os.walk(top):
            found += [f"cgroup {os.path.join(dirpath, d)}" for d in dirnames if "zviz" in d]
            if dirpath.count("/") > 6:
                dirnames.clear()
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(pid) != me and ("containerd-shim-zviz" in cmdline or "/bin/zviz " in cmdline):
            found.append(f"process {pid} {cmdline.strip()}")
    return found


_before: set[str] = set()


def pytest_sessionstart(session):
    _before.update(_leftovers())


def pytest_sessionfinish(session, exitstatus):
    """After the suite no zviz mount, cgroup or process may remain: a leak fails the run."""
    if os.geteuid() != 0:
        return
    new = [item for item in _leftovers() if item not in _before]
    if new:
        print("\nzviz left these behind after the suite:\n  " + "\n  ".join(new))
        session.exitstatus = 1
