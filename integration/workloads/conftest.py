"""The workload suite's fixtures: the Debian images (tools/debimage.py: built once per
machine, cached, imported once per session) and each test run under runc and zviz."""

import shutil
import tempfile

import pytest

from integration.ids import tagged, unique_id
from tools import debimage
from tools.workloads import RUNTIMES, Workloads


@pytest.fixture(scope="session")
def workload_image(containerd16):
    """workload_image(NAME) -> the ref of image NAME, imported into the private containerd.
    A failed build raises (with the build's log): it fails the test, never skips it."""
    imported: dict[str, str] = {}

    def image(name: str) -> str:
        if name not in imported:
            archive, ref = debimage.ensure(name)
            containerd16.import_image(archive)
            imported[name] = ref
        return imported[name]

    return image


@pytest.fixture(params=sorted(RUNTIMES))
def runtime(request) -> str:
    return request.param


@pytest.fixture
def workloads(containerd16, runtime):
    log_dir = tempfile.mkdtemp(prefix=tagged("zviz-wl") + "-")
    runner = Workloads(containerd16, runtime, log_dir, new_id=unique_id)
    try:
        yield runner
    finally:
        runner.remove_all()
        shutil.rmtree(log_dir, ignore_errors=True)
