"""The wheel is the product: built from the sdist, installed into a fresh venv, it runs containers.

The install lives outside the checkout (integration/wheel_install.py) and its commands
run with nothing pointing back at the checkout, so a file the wheel lacks (the profiles
once were) fails here as it fails for a user.
"""

import email
import os
import tarfile
import zipfile

import pytest

from integration.conftest import CONTAINERD_VERSIONS
from integration.ids import tagged, unique_id
from integration.test_nerdctl import Node, containerd_binaries
from integration.test_shim_containerd import _remove, _shim_pid
from integration.wheel_install import built, installed
from runtime import VERSION
from tools import gotools
from tools.containerd import ZVIZ_SHIM, PrivateContainerd
from tools.dist import CHECKOUT, direct_wheel
from tools.mkimage import DEFAULT_REF

# What runtime/, shim/ and api/ import from outside the standard library.
RUNTIME_REQUIREMENTS = {"protobuf", "pyseccomp"}
ZVIZ = "io.containerd.zviz.v2"


@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    with zipfile.ZipFile(built()[1]) as archive:
        yield archive


def _metadata(archive: zipfile.ZipFile):
    (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(archive.read(name))


def test_the_wheel_holds_the_profiles_and_the_c_sources(wheel):
    names = set(wheel.namelist())
    for profile in ("ci-runner", "web-server", "batch-job", "hostile-tenant", "development"):
        assert f"runtime/profiles/{profile}.toml" in names
    # What `zviz node install` compiles: the fast client, the exec anchor, the warden.
    assert "runtime/forkserver_client.c" in names
    assert "runtime/exec_anchor.c" in names
    assert "runtime/broker_warden.c" in names
    assert "shim/main.py" in names and "api/ttrpc/server.py" in names
    assert not any(n.startswith(("tests/", "integration/", "tools/", "bench/")) for n in names)


def test_the_wheel_requires_what_the_runtime_imports_and_nothing_else(wheel):
    requires = _metadata(wheel).get_all("Requires-Dist")
    unconditional = {
        r.split(";")[0].split("<")[0].split(">")[0].strip() for r in requires if ";" not in r
    }
    assert unconditional == RUNTIME_REQUIREMENTS
    # the test tools only behind the `test` extra
    assert all('extra == "test"' in r for r in requires if r.split(">")[0] in ("pytest", "grpclib"))


def test_the_wheel_names_no_path_of_the_build_machine(wheel):
    checkout = os.path.realpath(CHECKOUT).encode()
    for name in wheel.namelist():
        assert checkout not in wheel.read(name), name


def _contents(path: str) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_the_sdist_builds_the_same_wheel_as_the_source_tree():
    """Same files, same bytes (zip timestamps aside): the sdist forgets nothing."""
    assert _contents(built()[1]) == _contents(direct_wheel())


def test_the_sdist_holds_every_file_of_the_wheel():
    sdist, wheel_path = built()
    with tarfile.open(sdist) as tar:
        in_sdist = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    with zipfile.ZipFile(wheel_path) as archive:
        package_files = [n for n in archive.namelist() if ".dist-info/" not in n]
    assert package_files
    assert set(package_files) <= in_sdist


@pytest.fixture(scope="module")
def install():
    return installed()


def test_the_install_imports_itself_not_the_checkout(install):
    result = install.run(
        "python", "-c", "import runtime, shim; print(runtime.__file__, shim.__file__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(install.venv), result.stdout
    assert CHECKOUT not in result.stdout


def test_installed_zviz_lists_the_built_in_profiles(install):
    result = install.run("zviz", "profile", "list")
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == [
        "batch-job",
        "ci-runner",
        "development",
        "hostile-tenant",
        "web-server",
    ]


def test_installed_zviz_runs_a_container(install, make_bundle, tmp_path):
    bundle = make_bundle(
        ["sh", "-c", "echo from-the-wheel; cat /proc/self/status | grep ^Seccomp:"]
    )
    root = str(tmp_path / tagged("root"))
    # ZVIZ_NO_FORKSERVER: a fork server started from this install would outlive the
    # session's venv; the slow path is the one every install has.
    result = install.run(
        "zviz",
        "--root",
        root,
        "run",
        "--bundle",
        bundle,
        unique_id("zviz-wheel"),
        ZVIZ_NO_FORKSERVER="1",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == "from-the-wheel"
    assert lines[1].split() == ["Seccomp:", "2"]


def test_installed_shim_starts(install):
    result = install.run("containerd-shim-zviz-v2", "-v")
    assert result.returncode == 0, result.stderr
    assert f"Version:  {VERSION}" in result.stdout
    # containerd runs the shim by its path: its #! must be the install's own interpreter.
    with open(os.path.join(install.bin, "containerd-shim-zviz-v2")) as f:
        assert f.readline().startswith(f"#!{install.bin}/python")


def test_no_checkout_path_in_the_installed_files(install):
    checkout = os.path.realpath(CHECKOUT).encode()
    found = []
    for dirpath, _dirs, files in os.walk(install.venv):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                if checkout in f.read():
                    found.append(path)
    assert found == []


# ---- containerd and nerdctl with nothing but the install's shim ------------------------------


def _assert_the_install_serves(pid: int, install) -> None:
    """PID is the install's shim: its interpreter and script from the install's bin, no
    library mapped from the checkout, no variable pointing Python or PATH back at it."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")[:-1]
    # The venv's python links to the system's interpreter, so /proc/PID/exe names that;
    # the install shows in argv: the script's #! is the install's own python.
    assert argv[0].startswith(install.bin + "/"), argv
    assert argv[1] == os.path.join(install.bin, ZVIZ_SHIM), argv
    checkout = os.path.realpath(CHECKOUT)
    with open(f"/proc/{pid}/maps") as f:
        assert checkout not in f.read()
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = dict(
            entry.split("=", 1) for entry in f.read().decode().split("\0") if "=" in entry
        )
    for variable in ("PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        assert checkout not in environ.get(variable, ""), (variable, environ.get(variable))


@pytest.fixture(scope="module", params=CONTAINERD_VERSIONS)
def installed_containerd(request, install, busybox_archive):
    """A private containerd whose PATH holds the install's shim and no other zviz shim."""
    containerd_bin, ctr_bin = containerd_binaries(request.param)
    instance = PrivateContainerd(
        containerd_bin=containerd_bin, ctr_bin=ctr_bin, shim_dir=install.bin
    )
    try:
        instance.start()
        instance.import_image(busybox_archive)
        yield instance
    finally:
        instance.stop()


def test_ctr_runs_a_container_with_the_installed_shim(installed_containerd, install):
    containerd = installed_containerd
    ran = containerd.ctr(
        "run", "--rm", "--runtime", ZVIZ, DEFAULT_REF, unique_id("zviz-wheel-ctr"),
        "echo", "from-the-wheel", check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "from-the-wheel\n"
    container_id = unique_id("zviz-wheel-ctr")
    try:
        started = containerd.ctr(
            "run", "-d", "--runtime", ZVIZ, DEFAULT_REF, container_id, "sleep", "1000",
            check=False,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        _assert_the_install_serves(_shim_pid(containerd, container_id), install)
    finally:
        _remove(containerd, container_id)


@pytest.fixture(scope="module", params=CONTAINERD_VERSIONS)
def installed_nerdctl_node(request, install, busybox_archive):
    nerdctl_bin = gotools.binary(gotools.NERDCTL, "nerdctl")
    if nerdctl_bin is None:
        pytest.skip(gotools.missing_reason(gotools.NERDCTL))
    binaries = containerd_binaries(request.param)
    node = Node(nerdctl_bin, *binaries, busybox_archive, shim_dir=install.bin)
    try:
        yield node
    finally:
        node.stop()


def test_nerdctl_runs_a_container_with_the_installed_shim(installed_nerdctl_node, install):
    node = installed_nerdctl_node
    ran = node.nerdctl(
        "run", "--runtime", ZVIZ, "--rm", "--network", "none", DEFAULT_REF,
        "echo", "from-the-wheel",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "from-the-wheel\n"
    name = unique_id("zviz-wheel-nerd")
    try:
        started = node.nerdctl(
            "run", "--runtime", ZVIZ, "-d", "--name", name, "--network", "none", DEFAULT_REF,
            "sleep", "1000",
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        _assert_the_install_serves(_shim_pid(node.containerd, started.stdout.strip()), install)
        # stopped, then removed: nerdctl's logger for the container ends when it sees the
        # task exit through containerd (`rm -f` alone leaves it retrying for a while)
        stopped = node.nerdctl("stop", "-t", "1", name)
        assert stopped.returncode == 0, stopped.stderr
    finally:
        node.nerdctl("rm", "-f", name)
