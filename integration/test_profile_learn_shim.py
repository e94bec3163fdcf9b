"""Learning through the shim (issue 15 item 4, "and a shim mode for a pod"): learn -> run
-> probe under a private containerd.

`zviz profile learn --base BASE --out FILE -- ctr ... run ...` runs the container through
the zviz shim in learn mode (the shim config allows the annotation io.zviz.mode=learn
and names learn_dir); the shim writes the learned profile at the container's Delete and
the CLI copies it to FILE, which is in the operator's profile_dirs. The same workload
then runs enforcing under that profile (chosen by the annotation the config allows),
and a probe of one thing the workload never did is refused; under BASE the workload's
own calls are refused (learning was needed).
"""

import os
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

from integration.ids import tagged, unique_id
from integration.test_profile_learn import (
    EACCES,
    EPERM,
    _answers,
    _learned,
    probe_binary,  # noqa: F401 - a fixture
)

pytestmark = pytest.mark.containerd

ZVIZ = "io.containerd.zviz.v2"


@pytest.fixture
def operator_dir(probe_binary):  # noqa: F811 - the fixture imported above
    """What the operator owns: profile_dirs (root's, on a path of root's directories, not
    /tmp: the profile rule refuses a world-writable parent), learn_dir beside it, the shim
    configs, and the probe (a directory the containers' mapped root may traverse)."""
    top = tempfile.mkdtemp(prefix=tagged("s5learn2-operator") + "-", dir="/run")
    os.chmod(top, 0o755)
    for part in ("profiles", "configs", "probe"):
        os.mkdir(os.path.join(top, part), 0o755)
    shutil.copy(probe_binary, os.path.join(top, "probe", "probe"))
    os.chmod(os.path.join(top, "probe", "probe"), 0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def shim_config(operator_dir: str, text: str) -> str:
    path = os.path.join(operator_dir, "configs", f"{unique_id('s5learn2-config')}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def learn_config(operator_dir: str) -> str:
    return shim_config(
        operator_dir,
        f'allowed_annotation_modes = ["learn"]\nlearn_dir = "{operator_dir}/learned"\n',
    )


def enforce_config(operator_dir: str, profile: str) -> str:
    return shim_config(
        operator_dir,
        f'profile_dirs = ["{operator_dir}/profiles"]\n'
        f'allowed_annotation_profiles = ["{profile}"]\n',
    )


def ctr_run_args(containerd, image, config, cid, args, *, mounts=(), annotations=()):
    """`ctr ... run ...` of IMAGE as CID through the zviz shim under shim config CONFIG."""
    cmd = [containerd.ctr_bin, "--address", containerd.address, "-n", containerd.namespace,
           "run", "--runtime", ZVIZ, "--runtime-config-path", config]  # fmt: skip
    for mount in mounts:
        cmd += ["--mount", mount]
    for annotation in annotations:
        cmd += ["--annotation", annotation]
    return [*cmd, image, cid, *args]


def probe_mount(operator_dir: str) -> str:
    return f"type=bind,src={operator_dir}/probe,dst=/probe,options=rbind:ro"


def run_enforcing(containerd, image, config, args, *, mounts=(), annotations=(), timeout=120):
    cid = unique_id("s5learn2")
    cmd = ctr_run_args(containerd, image, config, cid, args, mounts=mounts, annotations=annotations)
    cmd.insert(cmd.index("run") + 1, "--rm")
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=containerd.env
        )
    finally:
        containerd.ctr("tasks", "delete", "-f", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)


def learn_through_ctr(zviz_bin, containerd, base, out, ctr_args, *, timeout=180):
    return subprocess.run(
        [zviz_bin, "profile", "learn", "--base", base, "--out", out, "--", *ctr_args],
        capture_output=True, text=True, timeout=timeout, env=containerd.env,
    )  # fmt: skip


@pytest.mark.every_containerd
def test_busybox_learned_through_the_shim(zviz_bin, containerd, busybox_image, operator_dir):
    """kcmp (ci-runner denies it) and a write to /var are learned through the shim; unshare
    (escape class) stays refused. Enforcing, the learned profile lets both through, and
    sysfs and a write to /etc (never done) are refused; under ci-runner both fail."""
    workload = ("kcmp", "unshare", "write:/var/state")
    mounts = (probe_mount(operator_dir),)
    name = tagged("s5learn2-busybox")
    out = os.path.join(operator_dir, "profiles", f"{name}.toml")
    config = learn_config(operator_dir)
    cid = unique_id("s5learn2")
    learning = learn_through_ctr(
        zviz_bin,
        containerd,
        "ci-runner",
        out,
        ctr_run_args(
            containerd, busybox_image, config, cid, ["/probe/probe", *workload], mounts=mounts
        ),
    )
    try:
        assert learning.returncode == 0, f"{learning.stdout}\n{learning.stderr}"
        answers = _answers(learning.stdout)
        assert answers == {"kcmp": "ok", "unshare": f"errno {EPERM}", "write:/var/state": "ok"}
        # The container is gone (--rm), and the shim's own copy is root's alone.
        listed = containerd.ctr("containers", "list", "-q").stdout.split()
        assert cid not in listed
        learned_dir = os.path.join(operator_dir, "learned")
        shim_copy = os.path.join(learned_dir, f"{containerd.namespace}_{cid}.toml")
        assert stat.S_IMODE(os.stat(learned_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(shim_copy).st_mode) == 0o600
        # One line of the shim's log (which containerd copies into its own) names it.
        with open(containerd.log_path) as f:
            assert f"learned profile of {cid} written to {shim_copy}" in f.read()
    finally:
        containerd.ctr("tasks", "delete", "-f", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)

    learned = _learned(out)
    assert learned["profile"]["name"] == name
    assert learned["profile"]["extends"] == "ci-runner"
    assert learned["seccomp"]["allow_add"] == ["kcmp"], learned
    assert learned["landlock"]["writable_add"] == ["/var"], learned
    assert "unshare: escape class" in open(out).read()

    probe = (*workload, "write:/var/more", "sysfs", "write:/etc/planted")
    enforced = run_enforcing(
        containerd,
        busybox_image,
        enforce_config(operator_dir, name),
        ["/probe/probe", *probe],
        mounts=mounts,
        annotations=[f"io.zviz.profile={name}"],
    )
    assert enforced.returncode == 0, enforced.stderr
    assert _answers(enforced.stdout) == {
        "kcmp": "ok",
        "unshare": f"errno {EPERM}",
        "write:/var/state": "ok",
        "write:/var/more": "ok",
        "sysfs": f"errno {EPERM}",
        "write:/etc/planted": f"errno {EACCES}",
    }
    under_base = run_enforcing(
        containerd,
        busybox_image,
        shim_config(operator_dir, ""),
        ["/probe/probe", *workload],
        mounts=mounts,
    )
    assert _answers(under_base.stdout) == {
        "kcmp": f"errno {EPERM}",
        "unshare": f"errno {EPERM}",
        "write:/var/state": f"errno {EACCES}",
    }


def test_a_syscall_past_the_record_rate_limit_is_learned(
    zviz_bin, containerd, busybox_image, operator_dir
):
    """More denied calls than the records' burst (denials.RECORD_BURST): the calls after
    it are only counted, in the summary written when the container goes; sysfs, made
    only after the burst, is learned from that summary."""
    from runtime.denials import RECORD_BURST

    workload = ["kcmp"] * (RECORD_BURST + 20) + ["sysfs"]
    out = os.path.join(operator_dir, "profiles", f"{tagged('s5learn2-burst')}.toml")
    cid = unique_id("s5learn2")
    learning = learn_through_ctr(
        zviz_bin,
        containerd,
        "ci-runner",
        out,
        ctr_run_args(
            containerd,
            busybox_image,
            learn_config(operator_dir),
            cid,
            ["/probe/probe", *workload],
            mounts=(probe_mount(operator_dir),),
        ),
    )
    containerd.ctr("tasks", "delete", "-f", cid, check=False)
    containerd.ctr("containers", "delete", cid, check=False)
    assert learning.returncode == 0, f"{learning.stdout}\n{learning.stderr}"
    assert _answers(learning.stdout) == {"kcmp": "ok", "sysfs": "ok"}
    assert _learned(out)["seccomp"]["allow_add"] == ["kcmp", "sysfs"]


def test_the_profile_is_written_when_the_container_exits(containerd, busybox_image, operator_dir):
    """A learnt container whose task outlives its exit (`ctr run -d`: nothing deletes it
    until `ctr task rm`) has its profile written once it exited, while the task is still
    there to be inspected."""
    cid = unique_id("s5learn2")
    cmd = ctr_run_args(
        containerd, busybox_image, learn_config(operator_dir), cid,
        ["/probe/probe", "write:/var/state"], mounts=(probe_mount(operator_dir),),
        annotations=["io.zviz.mode=learn"],
    )  # fmt: skip
    cmd.insert(cmd.index("run") + 1, "--detach")
    path = os.path.join(operator_dir, "learned", f"{containerd.namespace}_{cid}.toml")
    try:
        ran = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=containerd.env)
        assert ran.returncode == 0, ran.stderr
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        tasks = containerd.ctr("tasks", "list").stdout
        assert any(line.split()[:1] == [cid] and "STOPPED" in line for line in tasks.splitlines())
        assert _learned(path)["landlock"]["writable_add"] == ["/var"]
    finally:
        containerd.ctr("tasks", "delete", "-f", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)


def test_learning_needs_the_operators_leave(zviz_bin, containerd, busybox_image, operator_dir):
    """Without learn mode in the shim config the CLI says so and runs nothing; a shim
    config that allows it without learn_dir refuses the Create by name."""
    out = os.path.join(operator_dir, "never.toml")
    config = shim_config(operator_dir, 'allowed_annotation_modes = ["audit"]\n')
    cid = unique_id("s5learn2")
    refused = learn_through_ctr(
        zviz_bin,
        containerd,
        "ci-runner",
        out,
        ctr_run_args(containerd, busybox_image, config, cid, ["true"]),
    )
    assert refused.returncode == 1
    assert "does not allow learning" in refused.stderr and config in refused.stderr
    assert not os.path.exists(out)
    assert cid not in containerd.ctr("containers", "list", "-q").stdout.split()

    # The annotation alone (the CLI's check bypassed) under a config without learn_dir.
    no_dir = shim_config(operator_dir, 'allowed_annotation_modes = ["learn"]\n')
    created = run_enforcing(
        containerd, busybox_image, no_dir, ["true"], annotations=["io.zviz.mode=learn"]
    )
    assert created.returncode != 0
    assert "learn_dir" in created.stderr, created.stderr


# --- the CI job image (integration/workloads, `make images`) through containerd ---


@pytest.fixture
def ci_image(containerd):
    from tools import debimage

    image = debimage.IMAGES["ci"]
    release = debimage.host_release()
    archive = image.archive(release)
    if not os.path.exists(archive):
        pytest.skip("the ci workload image is not built: run `make images`")
    containerd.import_image(archive)
    return image.ref(release)


def test_ci_job_learned_through_the_shim(zviz_bin, containerd, ci_image, operator_dir):
    """The CI job (git clone, gcc/make, pytest) learned from hostile-tenant through the
    shim: it then passes enforcing under the learned profile, and a probe's kcmp and a
    write to /etc are refused; under hostile-tenant the job fails."""
    from tools.workloads import CI_BUILD_JOB, CI_REPOSITORY, ci_bare_repository

    repository = tempfile.mkdtemp(prefix=tagged("s5learn2-repo") + "-", dir="/run")
    os.chmod(repository, 0o755)
    bare = ci_bare_repository(repository)
    mounts = (
        f"type=bind,src={bare},dst={CI_REPOSITORY},options=rbind:ro",
        probe_mount(operator_dir),
    )
    name = tagged("s5learn2-ci")
    out = os.path.join(operator_dir, "profiles", f"{name}.toml")
    try:
        base_config = shim_config(operator_dir, 'profile = "hostile-tenant"\n')
        under_base = run_enforcing(
            containerd, ci_image, base_config, list(CI_BUILD_JOB), mounts=mounts, timeout=300
        )
        assert under_base.returncode != 0, under_base.stdout

        cid = unique_id("s5learn2")
        learning = learn_through_ctr(
            zviz_bin,
            containerd,
            "hostile-tenant",
            out,
            ctr_run_args(
                containerd,
                ci_image,
                learn_config(operator_dir),
                cid,
                list(CI_BUILD_JOB),
                mounts=mounts,
            ),
            timeout=400,
        )
        containerd.ctr("tasks", "delete", "-f", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)
        assert learning.returncode == 0, f"{learning.stdout}\n{learning.stderr}"
        assert "3 passed" in learning.stdout, f"{learning.stdout}\n{learning.stderr}"
        learned = _learned(out)
        assert learned["landlock"]["writable_add"] == ["/root"], learned
        assert learned["seccomp"]["allow_add"], learned
        assert "kcmp" not in learned["seccomp"]["allow_add"]

        config = enforce_config(operator_dir, name)
        annotations = [f"io.zviz.profile={name}"]
        enforced = run_enforcing(
            containerd, ci_image, config, list(CI_BUILD_JOB), mounts=mounts,
            annotations=annotations, timeout=300,
        )  # fmt: skip
        assert enforced.returncode == 0, f"{enforced.stdout}\n{enforced.stderr}"
        assert "hello, job" in enforced.stdout.splitlines()
        probe = ["/probe/probe", "write:/root/ok", "kcmp", "write:/etc/planted"]
        answers = _answers(
            run_enforcing(
                containerd, ci_image, config, probe, mounts=mounts, annotations=annotations
            ).stdout
        )
        assert answers == {
            "write:/root/ok": "ok",
            "kcmp": f"errno {EPERM}",
            "write:/etc/planted": f"errno {EACCES}",
        }
    finally:
        shutil.rmtree(repository, ignore_errors=True)


# --- a pod under containerd's CRI: a RuntimeClass handler whose shim config has mode learn ---


@pytest.fixture(scope="module")
def learn_node(tmp_path_factory):
    """A CRI node (integration/cni_node.py) with handler zviz-learn: mode = "learn", its
    learn_dir under a root-owned directory of its own."""
    from integration.test_cri import cri_node, handler_configs

    top = tempfile.mkdtemp(prefix=tagged("s5learn2-cri") + "-", dir="/run")
    learn_dir = os.path.join(top, "learned")
    handlers = handler_configs(
        tmp_path_factory, {"zviz-learn": f'mode = "learn"\nlearn_dir = "{learn_dir}"\n'}
    )
    try:
        with cri_node(tmp_path_factory, cri_handlers=handlers) as harness:
            yield harness, learn_dir
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_pods_container_is_learned_under_a_learn_handler(learn_node, tmp_path):
    """A pod of RuntimeClass handler zviz-learn: its container writes to /var (ci-runner's
    Landlock refuses it when enforcing) and exits; its learned profile appears (before the
    container is removed) as <pod namespace>_<pod name>_<container name>.toml and grants
    /var. The pod's sandbox (pause) container is not learnt."""
    import asyncio

    from integration.test_cri import pod, run

    cri, learn_dir = learn_node
    pb = cri.pb

    async def scenario() -> str:
        async with pod(cri, "zviz-learn", tmp_path / "logs") as the_pod:
            container_id = await the_pod.start_container("app", "echo learnt > /var/state")
            for _ in range(200):
                status = await the_pod.runtime.ContainerStatus(
                    pb.ContainerStatusRequest(container_id=container_id)
                )
                if status.status.state == pb.CONTAINER_EXITED:
                    break
                await asyncio.sleep(0.05)
            assert status.status.exit_code == 0, the_pod.log("app")
            # Written once the container exited (containerd's CRI deletes its task then).
            name = f"default_{the_pod.config.metadata.name}_app.toml"
            for _ in range(100):
                if os.path.exists(os.path.join(learn_dir, name)):
                    break
                await asyncio.sleep(0.05)
            assert os.listdir(learn_dir) == [name]
            await the_pod.runtime.RemoveContainer(
                pb.RemoveContainerRequest(container_id=container_id)
            )
            return the_pod.config.metadata.name

    pod_name = run(scenario())
    assert os.listdir(learn_dir) == [f"default_{pod_name}_app.toml"]
    assert stat.S_IMODE(os.stat(learn_dir).st_mode) == 0o700
    learned = _learned(os.path.join(learn_dir, f"default_{pod_name}_app.toml"))
    assert learned["profile"]["extends"] == "ci-runner"
    assert learned["landlock"]["writable_add"] == ["/var"], learned
