"""`zviz profile learn -- ctr ... run ...` interrupted (issue 16): the learner passes
SIGINT, SIGTERM and SIGHUP on to `ctr run`, which passes them to the task; the task
ends, `ctr run --rm` removes the container, the shim writes what was learned, and
the learner writes the profile. Before, the learner died of the signal and `ctr run`
(its child) went on: the container ran on, unlearned, until its workload ended.

Under the session's private containerd 1.6 (tools/containerd.py); the shim config and
learn_dir are the operator's (integration/test_profile_learn_shim.py's fixtures).
"""

import os
import time

import pytest

from integration import leaks
from integration.ids import tagged, unique_id
from integration.reliability.test_interrupted import STOPPING, TRAPPING, finish, start, wait_ready
from integration.test_profile_learn import probe_binary  # noqa: F401 - a fixture
from integration.test_profile_learn_shim import ctr_run_args, operator_dir, shim_config  # noqa: F401

pytestmark = pytest.mark.containerd


@pytest.mark.parametrize("sig", STOPPING, ids=lambda s: s.name)
def test_learn_through_ctr_signalled_while_running(
    zviz_bin,
    containerd,
    busybox_image,
    operator_dir,  # noqa: F811 - the fixture imported above
    sig,
):
    container_id = unique_id("zviz-rel-learnctr")
    out = os.path.join(operator_dir, "profiles", f"{tagged('zviz-rel-learned')}.toml")
    # The shim daemon exits as soon as it has no container (not 30 s later): the leak
    # check then sees its end too.
    config = shim_config(
        operator_dir,
        f'allowed_annotation_modes = ["learn"]\nlearn_dir = "{operator_dir}/learned"\n'
        "idle_exit_seconds = 0\n",
    )
    ctr = ctr_run_args(containerd, busybox_image, config, container_id, TRAPPING)
    learner = start(
        [zviz_bin, "profile", "learn", "--base", "ci-runner", "--out", out, "--", *ctr],
        env=containerd.env,
    )
    try:
        wait_ready(learner)
        learner.send_signal(sig)
        code, err = finish(learner)
        assert code == 0, err
        assert "ctr exited 3" in err  # the trap: the signal reached the workload
        with open(out) as f:
            assert "[profile]" in f.read()
        deadline = time.monotonic() + 15
        while (left := leaks.leftovers(container_id)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == []
        listed = containerd.ctr("containers", "ls", "-q", check=False).stdout.split()
        assert container_id not in listed
    finally:
        if learner.poll() is None:
            learner.kill()
            learner.wait()
        containerd.ctr("tasks", "delete", "-f", container_id, check=False)
        containerd.ctr("containers", "delete", container_id, check=False)
