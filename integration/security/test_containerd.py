"""The security layers when containerd drives zviz's shim (`ctr run`), beside runc.

The probe binary comes in through a read-only bind mount over the image's empty /var
(the mapped container root cannot create a new mount point in an image owned by host
root until the core id-maps the rootfs); the image is the busybox image the session built. runc runs under containerd without `--seccomp`, as `ctr run`
does by default; `--seccomp` rows show containerd's default profile for comparison.
"""

import os
import shutil
import tempfile

import pytest

from integration.ids import tagged, unique_id
from integration.security.conftest import parse_verdict
from integration.security.escapes import PROBES
from runtime.security import capabilities
from tools.containerd import lost_by_runcs_shim

pytestmark = [pytest.mark.containerd, pytest.mark.every_containerd]

ZVIZ = "io.containerd.zviz.v2"
RUNC = "io.containerd.runc.v2"


@pytest.fixture(scope="module")
def probe_dir(probe_bin):
    path = tempfile.mkdtemp(prefix=tagged("zviz-sec-ctr") + "-")
    os.chmod(path, 0o755)  # the mapped container root must reach it
    shutil.copy2(probe_bin, os.path.join(path, "probe"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ctr_run(containerd, image, runtime, args, *, probe_dir=None, annotations=(), extra=()):
    cid = unique_id("zviz-sec-ctr")
    cmd = ["run", "--rm", "--runtime", runtime, *extra]
    for key, value in annotations:
        cmd += ["--annotation", f"{key}={value}"]
    if probe_dir:
        cmd += ["--mount", f"type=bind,src={probe_dir},dst=/var,options=rbind:ro"]
    try:
        return containerd.ctr(*cmd, image, cid, *args, check=False, timeout=120)
    finally:
        containerd.ctr("tasks", "delete", "-f", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)


def test_shim_applies_every_layer(containerd, busybox_image):
    result = ctr_run(
        containerd,
        busybox_image,
        ZVIZ,
        [
            "sh",
            "-c",
            "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; cat /proc/self/uid_map",
        ],
    )
    assert result.returncode == 0, result.stderr
    status = dict(line.split(":\t") for line in result.stdout.splitlines() if ":\t" in line)
    # containerd's default spec asks for runc's 14: ci-runner keeps only those the kernel
    # confines to the container's user namespace (issue 14).
    confined = capabilities.mask(capabilities.CONFINED_TO_USER_NAMESPACE)
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == confined, status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert "100000" in result.stdout  # container root is an unprivileged host uid


def test_annotation_selects_the_profile(containerd, busybox_image):
    # Each profile maps container root to its own host range (docs/security.md).
    script = ["cat", "/proc/self/uid_map"]
    default = ctr_run(containerd, busybox_image, ZVIZ, script)
    hostile = ctr_run(
        containerd, busybox_image, ZVIZ, script, annotations=[("io.zviz.profile", "hostile-tenant")]
    )
    assert default.stdout.split()[:2] == ["0", "100000"], default.stdout + default.stderr
    assert hostile.stdout.split()[:2] == ["0", "200000"], hostile.stdout + hostile.stderr
    unknown = ctr_run(
        containerd, busybox_image, ZVIZ, ["true"], annotations=[("io.zviz.profile", "nope")]
    )
    assert unknown.returncode != 0 and "unknown profile 'nope'" in unknown.stderr


@pytest.mark.parametrize("name", ["unshare_user", "keyctl", "io_uring", "ptrace", "caps", "mount"])
def test_probe_blocked_under_the_shim_runc_shown_beside(containerd, busybox_image, probe_dir, name):
    zviz = ctr_run(containerd, busybox_image, ZVIZ, ["/var/probe", name], probe_dir=probe_dir)
    runc = ctr_run(containerd, busybox_image, RUNC, ["/var/probe", name], probe_dir=probe_dir)
    if lost_by_runcs_shim(RUNC, runc):
        # The reference column is asked once more rather than read as empty.
        runc = ctr_run(containerd, busybox_image, RUNC, ["/var/probe", name], probe_dir=probe_dir)
    # The shim's default profile is ci-runner: the outcome pinned for it, nothing else.
    verdict = parse_verdict(name, zviz)
    assert (verdict.word, verdict.outcome) == ("BLOCKED", PROBES[name].ci_runner), (
        f"{verdict}: {zviz.stderr}"
    )
    assert runc.stdout.split(" ", 1)[0] in ("BLOCKED", "ESCAPED"), runc.stdout + runc.stderr


def test_broker_mediates_under_the_shim(containerd, busybox_image):
    """web-server under containerd: the shim's broker refuses a private destination
    (EPERM, where the kernel alone would answer ENETUNREACH) and lets the container's own
    loopback through (nobody listens: ECONNREFUSED, issue 14)."""
    script = "echo x | nc 10.0.0.1 80; echo private=$?; echo x | nc 127.0.0.1 80; echo lo=$?"
    result = ctr_run(
        containerd,
        busybox_image,
        ZVIZ,
        ["sh", "-c", script],
        annotations=[("io.zviz.profile", "web-server")],
    )
    assert result.stdout.split() == ["private=1", "lo=1"], result.stdout + result.stderr
    # Only nc's lines: ctr 2.x warns about cgroup v1 on stderr first.
    said = [line for line in result.stderr.splitlines() if line.startswith("nc: ")]
    assert len(said) == 2, result.stderr
    assert "(10.0.0.1): Operation not permitted" in said[0], result.stderr
    assert "(127.0.0.1): Connection refused" in said[1], result.stderr
