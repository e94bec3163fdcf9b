import shutil
import tempfile

import pytest

from integration.ids import tagged


@pytest.fixture
def short_root():
    # short: the daemon's socket (root/g/<sha256>/sock) must fit in a sun_path
    root = tempfile.mkdtemp(prefix=tagged("zrl") + "-", dir="/tmp")
    yield root
    shutil.rmtree(root, ignore_errors=True)
