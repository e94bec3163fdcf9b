"""Audit mode through containerd (docs/denials.md): what the profile would refuse is
recorded and allowed, the escape class stays refused (and recorded).

A static probe, bind-mounted read-only over the image's /var, makes one call of each
kind and prints `NAME rc errno`: two calls ci-runner denies that are not of the escape
class (kcmp, personality(ADDR_NO_RANDOMIZE)), and escape-class ones (unshare, mount,
clone with CLONE_NEWUSER, setns, bpf, ioctl TIOCSTI). Under enforce mode all fail with
EPERM; under audit mode (operator's shim config, or the annotation io.zviz.mode where
the operator allows it) the first two succeed with an `audit` record each, the escape
class still fails EPERM with its record. An unknown mode, or an annotation asking audit
mode where the operator does not allow it, fails the create.
"""

import os
import shutil
import subprocess
import tempfile
import time

import pytest

from integration.ids import tagged, unique_id
from runtime import denials
from shim import config as shim_config

pytestmark = [pytest.mark.containerd, pytest.mark.every_containerd]

ZVIZ = "io.containerd.zviz.v2"

PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *name, long rc) {
    printf("%s %ld %d\n", name, rc, rc < 0 ? errno : 0);
    fflush(stdout);
}

int main(void) {
    pid_t me = getpid();
    report("kcmp", syscall(SYS_kcmp, me, me, 0 /* KCMP_FILE */, 0, 0));
    report("personality", syscall(SYS_personality, ADDR_NO_RANDOMIZE));
    report("unshare", syscall(SYS_unshare, CLONE_NEWNS));
    report("mount", syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, 0));
    long child = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
    if (child == 0) _exit(0);
    if (child > 0) waitpid(child, 0, 0);
    report("clone-newuser", child);
    int ns = open("/proc/self/ns/net", O_RDONLY);
    report("setns", syscall(SYS_setns, ns, 0));
    report("bpf", syscall(SYS_bpf, 0, 0, 0));
    char c = 'x';
    report("tiocsti", syscall(SYS_ioctl, 0, TIOCSTI, &c));
    return 0;
}
"""
AUDITED = ("kcmp", "personality")
STILL_DENIED = ("unshare", "mount", "clone-newuser", "setns", "bpf", "tiocsti")
# The records of the escape class, by syscall (a clone probe's record says "clone").
STILL_DENIED_SYSCALLS = ("unshare", "mount", "clone", "setns", "bpf", "ioctl")


@pytest.fixture(scope="module")
def probe_dir():
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc missing: the audit-mode probe is a C program")
    path = tempfile.mkdtemp(prefix=tagged("zviz-audit-mode") + "-")
    os.chmod(path, 0o755)  # the mapped container root must reach it
    source = os.path.join(path, "probe.c")
    with open(source, "w") as f:
        f.write(PROBE)
    subprocess.run([gcc, "-static", "-O2", "-o", os.path.join(path, "probe"), source], check=True)
    os.unlink(source)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_probe(containerd, image, probe_dir, *, config_text=None, annotations=()):
    """(ctr's result, the probe's answers by name, the container's records) of one run."""
    cid = unique_id("zviz-audit-mode")
    cmd = ["run", "--runtime", ZVIZ]
    config_dir = tempfile.mkdtemp(prefix=tagged("zviz-audit-mode-cfg") + "-")
    if config_text is not None:
        path = os.path.join(config_dir, "shim.toml")
        with open(path, "w") as f:
            f.write(config_text)
        cmd += ["--runtime-config-path", path]
    for key, value in annotations:
        cmd += ["--annotation", f"{key}={value}"]
    cmd += ["--mount", f"type=bind,src={probe_dir},dst=/var,options=rbind:ro"]
    state = os.path.join(shim_config.runtime_root(containerd.address, containerd.namespace), cid)
    try:
        # Detached, and kept alive after the probe: the records live in the container's
        # state directory, which goes with its task.
        result = containerd.ctr(
            *cmd[:1], "-d", *cmd[1:], image, cid, "sh", "-c", "/var/probe > /tmp/answers; sleep 60",
            check=False, timeout=120,
        )  # fmt: skip
        answers, records = {}, []
        if result.returncode != 0:
            return result, answers, records
        # The kernel's records reach the file through the shim's loop: wait for them.
        deadline = time.monotonic() + 15
        wanted = {*AUDITED, *STILL_DENIED_SYSCALLS}
        while time.monotonic() < deadline:
            records, _ = denials.read_lines(os.path.join(state, denials.DENIALS_FILE))
            if wanted <= {r.get("syscall") for r in records}:
                break
            time.sleep(0.2)
        printed = containerd.ctr(
            "tasks", "exec", "--exec-id", "answers", cid, "cat", "/tmp/answers", check=False
        )
        # The probe once more as an exec'd process: it runs in the container's mode too.
        again = containerd.ctr(
            "tasks", "exec", "--exec-id", "probe", cid, "/var/probe", check=False
        )
        for prefix, output in (("", printed.stdout), ("exec ", again.stdout)):
            for line in output.splitlines():
                name, rc, err = line.split()
                answers[prefix + name] = (int(rc), int(err))
        return result, answers, records
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        containerd.ctr("tasks", "delete", "-f", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)
        shutil.rmtree(config_dir, ignore_errors=True)


def _check_audited(answers, records):
    for name in (*AUDITED, *(f"exec {n}" for n in AUDITED)):
        assert answers[name][0] >= 0, f"{name} refused in audit mode: {answers}"
    for name in (*STILL_DENIED, *(f"exec {n}" for n in STILL_DENIED)):
        assert answers[name] == (-1, 1), f"{name} not refused (EPERM) in audit mode: {answers}"
    by_syscall = {r["syscall"]: r for r in records if r.get("source") == "seccomp"}
    for name in AUDITED:
        assert by_syscall[name]["verdict"] == "audit", by_syscall.get(name)
        assert by_syscall[name]["rule"].endswith(denials.AUDITED)
    for name in STILL_DENIED_SYSCALLS:
        assert by_syscall[name]["verdict"] == "EPERM", by_syscall.get(name)
        assert by_syscall[name]["rule"].endswith(denials.STILL_DENIED)


def test_enforce_mode_refuses_them_all(containerd, busybox_image, probe_dir):
    result, answers, _ = _run_probe(containerd, busybox_image, probe_dir)
    assert result.returncode == 0, result.stderr
    for name in (*AUDITED, *STILL_DENIED):
        assert answers[name] == (-1, 1), f"{name}: {answers}"
        assert answers[f"exec {name}"] == (-1, 1), f"exec {name}: {answers}"


def test_audit_mode_from_the_operators_config(containerd, busybox_image, probe_dir):
    result, answers, records = _run_probe(
        containerd, busybox_image, probe_dir, config_text='mode = "audit"\n'
    )
    assert result.returncode == 0, result.stderr
    _check_audited(answers, records)


def test_audit_mode_from_an_annotation_the_operator_allows(containerd, busybox_image, probe_dir):
    annotation = [("io.zviz.mode", "audit")]
    refused, _, _ = _run_probe(containerd, busybox_image, probe_dir, annotations=annotation)
    assert refused.returncode != 0
    assert "allowed_annotation_modes" in refused.stderr, refused.stderr
    result, answers, records = _run_probe(
        containerd,
        busybox_image,
        probe_dir,
        config_text='allowed_annotation_modes = ["audit"]\n',
        annotations=annotation,
    )
    assert result.returncode == 0, result.stderr
    _check_audited(answers, records)


def test_an_unknown_mode_is_refused_at_create(containerd, busybox_image, probe_dir):
    by_annotation, _, _ = _run_probe(
        containerd, busybox_image, probe_dir, annotations=[("io.zviz.mode", "complain")]
    )
    assert by_annotation.returncode != 0 and "complain" in by_annotation.stderr
    by_config, _, _ = _run_probe(
        containerd, busybox_image, probe_dir, config_text='mode = "permissive"\n'
    )
    assert by_config.returncode != 0 and "permissive" in by_config.stderr


def test_the_broker_records_and_allows_in_audit_mode_but_not_egress_deny(containerd, busybox_image):
    """web-server in audit mode: a connect its egress ports refuse goes through (the
    container's network has no route: ENETUNREACH, not EPERM) with an `audit` record; one
    to 10.0.0.1 (its egress_deny) is still refused."""
    cid = unique_id("zviz-audit-broker")
    config_dir = tempfile.mkdtemp(prefix=tagged("zviz-audit-mode-cfg") + "-")
    config = os.path.join(config_dir, "shim.toml")
    with open(config, "w") as f:
        f.write('mode = "audit"\n')
    state = os.path.join(shim_config.runtime_root(containerd.address, containerd.namespace), cid)
    script = "while :; do nc 198.51.100.1 9999; nc 10.0.0.1 80; sleep 0.5; done"
    try:
        result = containerd.ctr(
            "run", "-d", "--runtime", ZVIZ, "--runtime-config-path", config,
            "--annotation", "io.zviz.profile=web-server", busybox_image, cid, "sh", "-c", script,
            check=False, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 15
        by_address = {}
        while time.monotonic() < deadline and len(by_address) < 2:
            records, _ = denials.read_lines(os.path.join(state, denials.DENIALS_FILE))
            by_address = {
                r["args"].get("address"): r for r in records if r.get("source") == "broker"
            }
            time.sleep(0.2)
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        containerd.ctr("tasks", "delete", "-f", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)
        shutil.rmtree(config_dir, ignore_errors=True)
    audited = by_address["198.51.100.1:9999"]
    assert audited["verdict"] == "audit", audited
    assert audited["rule"] == (
        f"egress to 198.51.100.1 port 9999 not allowed by profile; {denials.AUDITED}"
    )
    refused = by_address["10.0.0.1:80"]
    assert refused["verdict"] == "EPERM", refused
