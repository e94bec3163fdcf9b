"""The shim under containerd 2.x (tools/gotools.py builds it), as under Debian's 1.6.

A representative part of test_shim_containerd.py runs again here against a private
containerd 2.x with its own ctr: `run` (exit codes, output), a detached task with exec,
ps, pause, metrics and kill, a killed task's exit status, the OOM event, a task that
outlives a containerd restart (2.x reconnects from the BootstrapResult it saved), a killed
shim cleaned up through `delete` (no stdin from 2.x), and the shim's
config path: 2.x hands it to `start` inside BootstrapParams, where the grouping it sets
decides which daemon serves the container (before the shim read BootstrapParams, the
grouping test failed here: every container went to the namespace's one daemon), and to
Create in the task options, where the profile it sets applies. Each ctr scenario runs
with runc (2.x's own runc shim) as the reference. Skipped with the reason when 2.x is
not built.
"""

import pytest

from integration.ids import unique_id

# The fixtures these tests use, and the tests themselves: collected and run again here.
from integration.test_shim_containerd import (  # noqa: F401
    ctr,
    new_id,
    no_leftovers,
    runtime,
    test_detached_task_is_manageable,
    test_exit_code_passes_through,
    test_grouping_by_pod_and_by_container,
    test_killed_shim_is_cleaned_up_through_delete,
    test_killed_task_exits_137,
    test_memory_hog_produces_an_oom_event,
    test_profile_comes_from_annotation_then_runtime_config,
    test_running_task_survives_a_containerd_restart,
    test_stdout_and_stderr_arrive,
)

pytestmark = pytest.mark.containerd

ZVIZ = "io.containerd.zviz.v2"


@pytest.fixture(scope="module")
def containerd(containerd2):
    return containerd2


@pytest.fixture(scope="module")
def busybox_image(busybox_image2):
    return busybox_image2


def test_it_is_containerd_2(containerd):
    """The tests above ran against the 2.x this module promises, not the 1.6 on PATH."""
    assert containerd.major_version == 2
    version = containerd.ctr("version").stdout
    assert "Version:  v2." in version or "Version:  2." in version, version


def test_containerd_got_an_answer_to_shim_info(containerd, busybox_image):
    """2.x runs `SHIM -info` for a runtime's features and logs when it fails (it did, for
    every zviz container, before the shim knew the flag)."""
    container_id = unique_id("zviz-shim-info")
    result = containerd.ctr(
        "run", "--rm", "--runtime", ZVIZ, busybox_image, container_id, "true", check=False
    )
    assert result.returncode == 0, result.stderr
    with open(containerd.log_path) as f:
        failures = [line for line in f if "-info" in line and "containerd-shim-zviz-v2" in line]
    assert not failures, failures[-1]
