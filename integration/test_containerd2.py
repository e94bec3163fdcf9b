"""What only containerd 2.x (tools/gotools.py builds it) asks of the shim.

Every test of the shim's own modules (test_shim_containerd.py, test_ttrpc_events.py,
test_runc_shim_drives_zviz.py, security/test_containerd.py) runs under both Debian's 1.6
and 2.x (integration/conftest.py parametrizes them); here: that the 2.x those runs use is
a 2.x, and the `-info` call 2.x makes and 1.6 does not. The config path 2.x hands `start`
inside BootstrapParams is covered by test_shim_containerd.py's grouping test under 2.x
(before the shim read BootstrapParams it failed there: every container went to the
namespace's one daemon). Skipped with the reason when 2.x is not built.
"""

import pytest

from integration.ids import unique_id

pytestmark = pytest.mark.containerd

ZVIZ = "io.containerd.zviz.v2"


def test_it_is_containerd_2(containerd2):
    """The 2.x parameter of the shim's modules drives a 2.x, not the 1.6 on PATH."""
    assert containerd2.major_version == 2
    version = containerd2.ctr("version").stdout
    assert "Version:  v2." in version or "Version:  2." in version, version


def test_containerd_got_an_answer_to_shim_info(containerd2, busybox_image2):
    """2.x runs `SHIM -info` for a runtime's features and logs when it fails (it did, for
    every zviz container, before the shim knew the flag)."""
    container_id = unique_id("zviz-shim-info")
    result = containerd2.ctr(
        "run", "--rm", "--runtime", ZVIZ, busybox_image2, container_id, "true", check=False
    )
    assert result.returncode == 0, result.stderr
    with open(containerd2.log_path) as f:
        failures = [line for line in f if "-info" in line and "containerd-shim-zviz-v2" in line]
    assert not failures, failures[-1]
