"""The workload suite's fixtures: the Debian images (tools/debimage.py: built once per
machine, cached, imported once per session) and each test run under runc and zviz."""

import os
import shutil
import tempfile

import pytest

from integration.ids import tagged, unique_id
from tools import debimage
from tools.containerd import PrivateContainerd
from tools.workloads import RUNTIMES, Workloads


@pytest.fixture(scope="session")
def workload_containerd():
    """A private containerd 1.6 whose images and snapshots live on a disk (/var/tmp): the
    workload images are hundreds of MB, and the suite's other containerd keeps them under
    /run, a tmpfs on most machines."""
    root = tempfile.mkdtemp(prefix=tagged("zviz-wl-containerd") + "-", dir="/var/tmp")
    os.chmod(root, 0o711)  # as containerd's own: user-namespaced containers traverse it
    instance = PrivateContainerd(root_dir=root).start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def workload_image(workload_containerd):
    """workload_image(NAME) -> the ref of image NAME, imported into the private containerd.
    A failed build raises (with the build's log): it fails the test, never skips it."""
    imported: dict[str, str] = {}

    def image(name: str) -> str:
        if name not in imported:
            archive, ref = debimage.ensure(name)
            workload_containerd.import_image(archive)
            imported[name] = ref
        return imported[name]

    return image


@pytest.fixture(params=sorted(RUNTIMES))
def runtime(request) -> str:
    return request.param


@pytest.fixture
def workloads(workload_containerd, runtime):
    log_dir = tempfile.mkdtemp(prefix=tagged("zviz-wl") + "-")
    runner = Workloads(workload_containerd, runtime, log_dir, new_id=unique_id)
    try:
        yield runner
    finally:
        runner.remove_all()
        shutil.rmtree(log_dir, ignore_errors=True)
