"""Shared fixtures for tests against the real kernel, containerd, runc and gVisor.

All of them need root; the suite refuses to run without it rather than pass vacuously.
"""

import os
import shutil
import sys

import pytest

from integration.ids import TAG_VARIABLE, new_session_tag, session_tag, tagged
from integration.leaks import leftovers
from tools import gotools
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


# The containerd versions a module marked `every_containerd` runs each of its tests under:
# Debian's 1.6 and the 2.x tools/gotools.py builds (the shim's own integration tests).
CONTAINERD_VERSIONS = ("1.6", "2.x")
CONTAINERD_FIXTURES = {"1.6": "containerd16", "2.x": "containerd2"}
IMAGE_FIXTURES = {"1.6": "busybox_image16", "2.x": "busybox_image2"}


def pytest_generate_tests(metafunc):
    if "containerd" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "every_containerd"
    ):
        # Module scope: a module runs all of its tests under one version, then the other,
        # and its module fixtures (leftover checks, images) follow the version.
        metafunc.parametrize("containerd", CONTAINERD_VERSIONS, indirect=True, scope="module")


def _containerd_version(request) -> str:
    # Unparametrized (the modules not marked every_containerd): Debian's 1.6.
    return getattr(request, "param", "1.6")


@pytest.fixture(scope="module")
def containerd(request):
    """The private containerd a test drives. Both versions' daemons are session-wide (one
    each, started on first use), so switching between them restarts nothing."""
    return request.getfixturevalue(CONTAINERD_FIXTURES[_containerd_version(request)])


@pytest.fixture(scope="session")
def containerd16():
    """A private Debian containerd 1.6 (the `containerd` and `ctr` on PATH)."""
    instance = PrivateContainerd().start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def containerd2():
    """A private containerd 2.x (tools/gotools.py), with its own ctr and runc shim."""
    binaries = [gotools.binary(gotools.CONTAINERD2, name) for name in ("containerd", "ctr")]
    if not all(binaries):
        pytest.skip(gotools.missing_reason(gotools.CONTAINERD2))
    instance = PrivateContainerd(containerd_bin=binaries[0], ctr_bin=binaries[1]).start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def busybox_archive(tmp_path_factory) -> str:
    archive = str(tmp_path_factory.mktemp("image") / "busybox.tar")
    build_image(archive, DEFAULT_REF)
    return archive


@pytest.fixture(scope="module")
def busybox_image(request, containerd) -> str:
    """The busybox image, imported (once per session) into the containerd the test drives."""
    version = "2.x" if containerd.major_version >= 2 else "1.6"
    return request.getfixturevalue(IMAGE_FIXTURES[version])


@pytest.fixture(scope="session")
def busybox_image16(containerd16, busybox_archive) -> str:
    containerd16.import_image(busybox_archive)
    return DEFAULT_REF


@pytest.fixture(scope="session")
def busybox_image2(containerd2, busybox_archive) -> str:
    """The busybox image, imported into containerd 2.x."""
    containerd2.import_image(busybox_archive)
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
        directory = tmp_path / f"{tagged('bundle')}-{next(counter)}"
        return build_bundle(str(directory), args=list(args), **overrides)

    return make


@pytest.fixture
def podnet():
    """A pod netns and a peer netns on a veth (integration/podnet.py), deleted after."""
    from integration.podnet import PodNetwork

    net = PodNetwork()
    try:
        yield net
    finally:
        net.delete()


def pytest_report_header(config):
    """The Go-built tools' versions (or why they are missing), at the top of the output."""
    return [f"go tools: {gotools.version_line(tool)}" for tool in gotools.ALL]


def pytest_configure(config):
    # A fresh tag per session, in the environment so that every process started from
    # here carries it: what the suite creates is named with it (integration/ids.py).
    os.environ[TAG_VARIABLE] = new_session_tag()


def pytest_sessionfinish(session, exitstatus):
    """After the suite nothing of this session may remain: a leak fails the run."""
    if os.geteuid() != 0:
        return
    left = leftovers(session_tag(), exclude_pids={os.getpid()})
    if left:
        print(f"\nthis session ({session_tag()}) left these behind:\n  " + "\n  ".join(left))
        session.exitstatus = 1
