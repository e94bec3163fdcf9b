"""What pods rely on (issue 11 item 4), through containerd's CRI plugin as a kubelet calls it.

Each scenario runs under handler `runc` (the reference: a runc cell that fails is a broken
test) and handler `zviz`, on the node and CNI network of integration/test_cri.py (this
module gets its own, from the same `cri` fixture). A zviz cell marked xfail(strict) is a
behaviour zviz lacks today; its reason names what fails and why.

The volumes are host directories made as the kubelet makes them under
/var/lib/kubelet/pods/<uid>/volumes: owned by root, configMap files 0644, secret files
0640 root:<fsGroup> (defaultMode 0640 with an fsGroup), the projected service-account
token 0600 owned by the pod's runAsUser, all bound read-only; the emptyDir 02777
root:<fsGroup>, bound writable. Under zviz the read-only ones are id-mapped through the
container's user namespace (runtime/idmap.py), so those host ids are the pod's ids.
"""

import asyncio
import contextlib
import os
import time
import uuid

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from integration import test_cri
from integration.cgroup_checks import CGROUP_ROOT, MiB, cgroup_file, host_version, read
from integration.ids import tagged, unique_id
from integration.test_cri import Pod, both_handlers, run
from integration.zviz_cli import Zviz, edit_config
from runtime import cgroups
from tools.mkimage import DEFAULT_REF

# This module's own node: test_cri's module-scoped fixture, under this module's name.
cri = test_cri.cri

RUN_AS_USER = 1000
RUN_AS_GROUP = 3000
FS_GROUP = 2000
# Loops in the shell rather than one long sleep: a trap runs only between commands.
IDLE = "while :; do sleep 0.1; done"


class PodUnderTest(Pod):
    """A Pod whose containers take the security context, resources and attempt a kubelet sets."""

    async def create(
        self,
        name: str,
        script: str,
        *,
        attempt: int = 0,
        mounts=(),
        user: int | None = None,
        group: int | None = None,
        groups=(),
        readonly_rootfs: bool = False,
        resources=None,
    ) -> str:
        pb = self.pb
        context = pb.LinuxContainerSecurityContext(
            namespace_options=self._namespaces(),
            readonly_rootfs=readonly_rootfs,
            supplemental_groups=list(groups),
        )
        if user is not None:
            context.run_as_user.value = user
        if group is not None:
            context.run_as_group.value = group
        created = await self.runtime.CreateContainer(
            pb.CreateContainerRequest(
                pod_sandbox_id=self.id,
                sandbox_config=self.config,
                config=pb.ContainerConfig(
                    metadata=pb.ContainerMetadata(name=name, attempt=attempt),
                    image=pb.ImageSpec(image=DEFAULT_REF),
                    command=["sh", "-c", script],
                    mounts=list(mounts),
                    # As the kubelet names them: <container>/<attempt>.log
                    log_path=f"{name}/{attempt}.log",
                    linux=pb.LinuxContainerConfig(resources=resources, security_context=context),
                ),
            )
        )
        return created.container_id

    async def start(self, container_id: str) -> None:
        await self.runtime.StartContainer(self.pb.StartContainerRequest(container_id=container_id))

    async def run_container(self, name: str, script: str, **options) -> str:
        container_id = await self.create(name, script, **options)
        await self.start(container_id)
        return container_id

    async def status(self, container_id: str):
        response = await self.runtime.ContainerStatus(
            self.pb.ContainerStatusRequest(container_id=container_id)
        )
        return response.status

    async def wait_exited(self, container_id: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while (status := await self.status(container_id)).state != self.pb.CONTAINER_EXITED:
            assert time.monotonic() < deadline, f"{container_id} still {status.state}"
            await asyncio.sleep(0.1)
        return status

    def log_file(self, name: str, attempt: int = 0) -> str:
        return os.path.join(self.log_dir, name, f"{attempt}.log")

    def log_of(self, name: str, attempt: int = 0) -> str:
        with contextlib.suppress(FileNotFoundError), open(self.log_file(name, attempt)) as f:
            return f.read()
        return ""

    async def wait_logged(self, name: str, text: str, attempt: int = 0, timeout=10) -> str:
        """The container's log once it holds TEXT (containerd copies output asynchronously)."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log_of(name, attempt)):
            assert time.monotonic() < deadline, f"{text!r} never reached the log: {log!r}"
            await asyncio.sleep(0.05)
        return log


@contextlib.asynccontextmanager
async def pod(cri, handler: str, log_dir, cgroup_parent: str = ""):
    async with cri.runtime() as runtime:
        the_pod = PodUnderTest(cri, runtime, handler, str(log_dir))
        try:
            await the_pod.run(cgroup_parent=cgroup_parent)
            yield the_pod
        finally:
            await the_pod.remove()


@contextlib.contextmanager
def pod_cgroup():
    """A cgroupfs parent for a pod, as the kubelet's /kubepods/pod<uid>; removed after."""
    parent = f"/{tagged('zpd-pod')}-{uuid.uuid4().hex[:8]}"
    try:
        yield parent
    finally:
        # The runtimes made it for the pod's containers; the kubelet removes it, so do we.
        for hierarchy in os.listdir(CGROUP_ROOT):
            top = os.path.join(CGROUP_ROOT, hierarchy)
            if not os.path.islink(top):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(os.path.join(top, parent.lstrip("/")))
        unified = os.path.join(CGROUP_ROOT, parent.lstrip("/"))
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.rmdir(unified)


def messages(log: str) -> list[tuple[str, str, str]]:
    """(stream, tag, message) of each CRI log line: `<RFC 3339 time> <stream> <P|F> <text>`."""
    entries = []
    for line in log.splitlines():
        timestamp, stream, tag, text = line.split(" ", 3)
        assert timestamp[:4].isdigit() and "T" in timestamp, line
        entries.append((stream, tag, text))
    return entries


# ---- logs and stdio ----------------------------------------------------------------


@both_handlers()
def test_logs_are_in_the_cri_format_with_each_stream_named(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            await the_pod.run_container(
                "zpd-app", f"echo to stdout; echo to stderr >&2; printf partial; echo; {IDLE}"
            )
            return await the_pod.wait_logged("zpd-app", "partial")

    entries = messages(run(scenario()))
    assert ("stdout", "F", "to stdout") in entries, entries
    assert ("stderr", "F", "to stderr") in entries, entries
    # "partial" and its newline came in two writes; CRI joins them into one full line.
    assert [e for e in entries if "partial" in e[2]] in (
        [("stdout", "F", "partial")],
        [("stdout", "P", "partial"), ("stdout", "F", "")],
    ), entries


@both_handlers()
def test_a_container_writing_to_dev_stdout_and_dev_stderr_is_logged(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            await the_pod.run_container(
                "zpd-app",
                "echo via dev stdout > /dev/stdout; echo via dev stderr > /dev/stderr; "
                f"echo done; {IDLE}",
            )
            return await the_pod.wait_logged("zpd-app", "done")

    entries = messages(run(scenario()))
    assert ("stdout", "F", "via dev stdout") in entries, entries
    assert ("stderr", "F", "via dev stderr") in entries, entries


@both_handlers()
def test_a_run_as_user_process_and_its_exec_write_to_dev_stdout(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            app = await the_pod.run_container(
                "zpd-app",
                f"echo from the user > /dev/stdout; echo started; {IDLE}",
                user=RUN_AS_USER,
                group=RUN_AS_GROUP,
            )
            exec_result = await the_pod.exec(app, "id -u; echo from an exec > /dev/stdout")
            return exec_result, await the_pod.wait_logged("zpd-app", "started")

    (code, out, err), log = run(scenario())
    assert code == 0 and out == f"{RUN_AS_USER}\nfrom an exec\n", (out, err)
    assert ("stdout", "F", "from the user") in messages(log), log


@both_handlers()
def test_an_exec_reaches_pid_1s_environ_and_stdout(cri, tmp_path, handler):
    # `kubectl exec` into a container writing to /proc/1/fd/1; /proc/1/environ shows
    # the same check (ptrace read access to PID 1) without any fifo involved.
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            app = await the_pod.run_container("zpd-app", IDLE)
            return await the_pod.exec(
                app,
                "cat /proc/1/environ >/dev/null 2>&1 && echo environ; "
                "ls /proc/1/fd >/dev/null 2>&1 && echo fd; "
                "echo x > /proc/1/fd/1 && echo write",
            )

    code, out, err = run(scenario())
    assert out.split() == ["environ", "fd", "write"], (out, err)


@both_handlers()
def test_log_rotation_through_reopen_container_log(cri, tmp_path, handler):
    # What the kubelet's log manager does: rename the file, ReopenContainerLog, the runtime
    # writes on in a new file at the original path.
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            app = await the_pod.run_container(
                "zpd-app", "i=0; while :; do i=$((i+1)); echo line $i; sleep 0.05; done"
            )
            path = the_pod.log_file("zpd-app")
            await the_pod.wait_logged("zpd-app", "line 3")
            os.rename(path, path + ".1")
            await the_pod.runtime.ReopenContainerLog(
                the_pod.pb.ReopenContainerLogRequest(container_id=app)
            )
            await the_pod.wait_logged("zpd-app", "line")
            await asyncio.sleep(0.3)  # output keeps going to the new file
            with open(path + ".1") as f:
                return f.read(), the_pod.log_of("zpd-app")

    rotated, current = run(scenario())
    before = [int(text.split()[1]) for _, _, text in messages(rotated)]
    after = [int(text.split()[1]) for _, _, text in messages(current)]
    assert before[:3] == [1, 2, 3], before
    assert len(after) >= 3, after
    # Nothing lost or doubled across the reopen: the numbering goes on where it stopped.
    assert after[0] == before[-1] + 1 and after == list(range(after[0], after[0] + len(after)))


# ---- resources and stats ----------------------------------------------------------------


def container_cgroup(container_id: str):
    """The container's cgroup, found by its name in the memory hierarchy (v1 or v2)."""
    top = os.path.join(CGROUP_ROOT, "memory" if host_version() == 1 else "")
    for dirpath, dirnames, _ in os.walk(top):
        if container_id in dirnames or os.path.basename(dirpath).endswith(f"{container_id}.scope"):
            found = os.path.join(dirpath, container_id) if container_id in dirnames else dirpath
            return cgroups.for_container(container_id, "/" + os.path.relpath(found, top))
    raise AssertionError(f"no cgroup named {container_id} under {top}")


def memory_limit(cg) -> int:
    return int(read(cgroup_file(cg, "memory", "memory.limit_in_bytes", "memory.max")))


def cpu_quota(cg) -> str:
    text = read(cgroup_file(cg, "cpu", "cpu.cfs_quota_us", "cpu.max"))
    return text.split()[0]


@both_handlers()
def test_update_container_resources_changes_the_containers_cgroup(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            pb = the_pod.pb
            app = await the_pod.run_container(
                "zpd-app",
                IDLE,
                resources=pb.LinuxContainerResources(
                    memory_limit_in_bytes=64 * MiB, cpu_period=100000, cpu_quota=20000
                ),
            )
            cg = container_cgroup(app)
            before = memory_limit(cg), cpu_quota(cg)
            await the_pod.runtime.UpdateContainerResources(
                pb.UpdateContainerResourcesRequest(
                    container_id=app,
                    linux=pb.LinuxContainerResources(
                        memory_limit_in_bytes=96 * MiB, cpu_period=100000, cpu_quota=50000
                    ),
                )
            )
            return before, (memory_limit(cg), cpu_quota(cg))

    before, after = run(scenario())
    assert before == (64 * MiB, "20000")
    assert after == (96 * MiB, "50000")


@both_handlers()
def test_container_and_pod_stats(cri, tmp_path, handler):
    async def scenario(cgroup_parent):
        # PodSandboxStats reads the pod's cgroup: a pod without a parent has none.
        async with pod(cri, handler, tmp_path, cgroup_parent) as the_pod:
            pb = the_pod.pb
            # Some CPU time and memory to show: a busy loop, then idle.
            app = await the_pod.run_container(
                "zpd-app",
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo busy done; " + IDLE,
            )
            await the_pod.wait_logged("zpd-app", "busy done", timeout=30)
            one = await the_pod.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=app))
            listed = await the_pod.runtime.ListContainerStats(
                pb.ListContainerStatsRequest(
                    filter=pb.ContainerStatsFilter(pod_sandbox_id=the_pod.id)
                )
            )
            try:
                sandbox = await the_pod.runtime.PodSandboxStats(
                    pb.PodSandboxStatsRequest(pod_sandbox_id=the_pod.id)
                )
            except GRPCError as error:
                sandbox = error
            return app, one.stats, list(listed.stats), sandbox

    with pod_cgroup() as cgroup_parent:
        app, stats, listed, sandbox = run(scenario(cgroup_parent))
    assert stats.attributes.id == app and stats.attributes.metadata.name == "zpd-app"
    # 20000 shell loop rounds: tens of milliseconds of CPU at least.
    assert stats.cpu.usage_core_nano_seconds.value >= 10_000_000, stats.cpu
    assert stats.memory.working_set_bytes.value > 0, stats.memory
    assert [s.attributes.id for s in listed] == [app]
    assert listed[0].cpu.usage_core_nano_seconds.value >= stats.cpu.usage_core_nano_seconds.value
    if isinstance(sandbox, GRPCError):
        assert sandbox.status == Status.UNIMPLEMENTED, sandbox
        pytest.skip(f"containerd 1.6's CRI has no PodSandboxStats: {sandbox.message}")
    pod_cpu = sandbox.stats.linux.cpu.usage_core_nano_seconds.value
    assert pod_cpu >= stats.cpu.usage_core_nano_seconds.value, sandbox.stats
    assert sandbox.stats.linux.memory.working_set_bytes.value > 0, sandbox.stats
    assert app in [c.attributes.id for c in sandbox.stats.linux.containers], sandbox.stats


# ---- stopping -------------------------------------------------------------------------


@both_handlers()
def test_stop_sends_term_and_a_container_trapping_it_exits_with_its_own_code(
    cri, tmp_path, handler
):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            app = await the_pod.run_container(
                "zpd-app", f"trap 'echo got TERM; exit 3' TERM; echo ready; {IDLE}"
            )
            await the_pod.wait_logged("zpd-app", "ready")
            started = time.monotonic()
            await the_pod.runtime.StopContainer(
                the_pod.pb.StopContainerRequest(container_id=app, timeout=20)
            )
            took = time.monotonic() - started
            return took, await the_pod.status(app), the_pod.log_of("zpd-app")

    took, status, log = run(scenario())
    assert status.exit_code == 3 and "got TERM" in log, (status, log)
    assert took < 10, f"the stop waited for the grace period ({took:.1f}s) after the exit"


@both_handlers()
def test_stop_kills_a_container_that_ignores_term_when_its_grace_period_ends(
    cri, tmp_path, handler
):
    grace = 2

    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            app = await the_pod.run_container("zpd-app", f"trap '' TERM; echo ready; {IDLE}")
            await the_pod.wait_logged("zpd-app", "ready")
            started = time.monotonic()
            await the_pod.runtime.StopContainer(
                the_pod.pb.StopContainerRequest(container_id=app, timeout=grace)
            )
            return time.monotonic() - started, await the_pod.status(app)

    took, status = run(scenario())
    assert status.state == cri.pb.CONTAINER_EXITED
    assert status.exit_code == 137  # SIGKILL
    assert grace <= took < grace + 8, f"killed after {took:.1f}s for a {grace}s grace period"


# ---- users, volumes, root filesystem ----------------------------------------------------


def kubelet_volumes(root) -> dict[str, str]:
    """Host directories as the kubelet makes a pod's volumes; name -> host path."""
    volumes = {}
    for name in ("empty-dir", "config-map", "secret", "token"):
        directory = root / f"zpd-{name}"
        directory.mkdir(parents=True)
        directory.chmod(0o755)
        volumes[name] = str(directory)
    # emptyDir: made 0777, then with an fsGroup given to it, group rw and setgid added
    # (kubelet's SetVolumeOwnership): 02777 root:fsGroup.
    os.chown(volumes["empty-dir"], 0, FS_GROUP)
    os.chmod(volumes["empty-dir"], 0o2777)
    files = {
        ("config-map", "greeting", 0, 0, 0o644): "hello from the config map\n",
        ("secret", "password", 0, FS_GROUP, 0o640): "s3cret\n",
        ("token", "token", RUN_AS_USER, 0, 0o600): "eyJ.token\n",
    }
    for (volume, name, uid, gid, mode), text in files.items():
        path = os.path.join(volumes[volume], name)
        with open(path, "w") as f:
            f.write(text)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    # The kubelet's pods directory is root's: the container's root is no host user here.
    os.chmod(root, 0o700)
    return volumes


def volume_mounts(pb, volumes: dict[str, str]) -> list:
    return [
        pb.Mount(container_path="/data", host_path=volumes["empty-dir"]),
        pb.Mount(container_path="/etc/config", host_path=volumes["config-map"], readonly=True),
        pb.Mount(container_path="/etc/secret", host_path=volumes["secret"], readonly=True),
        pb.Mount(
            container_path="/var/run/secrets/tokens", host_path=volumes["token"], readonly=True
        ),
    ]


def exec_in_a_volume_app(cri, handler: str, log_dir, volumes, script: str, **options):
    """SCRIPT exec'd in a fresh pod's container running as RUN_AS_USER:RUN_AS_GROUP with
    VOLUMES mounted (OPTIONS: more of the container's settings): (code, out, err)."""

    async def scenario():
        async with pod(cri, handler, log_dir) as the_pod:
            app = await the_pod.run_container(
                "zpd-app",
                IDLE,
                mounts=volume_mounts(the_pod.pb, volumes),
                user=RUN_AS_USER,
                group=RUN_AS_GROUP,
                **options,
            )
            return await the_pod.exec(app, script)

    return run(scenario())


@both_handlers()
def test_run_as_user_and_group_with_the_fs_group_as_supplementary_group(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            app = await the_pod.run_container(
                "zpd-app", IDLE, user=RUN_AS_USER, group=RUN_AS_GROUP, groups=[FS_GROUP]
            )
            return await the_pod.exec(app, "id -u; id -g; id -G")

    code, out, err = run(scenario())
    assert code == 0, err
    uid, gid, groups = out.splitlines()
    assert (uid, gid) == (str(RUN_AS_USER), str(RUN_AS_GROUP))
    assert set(groups.split()) == {str(RUN_AS_GROUP), str(FS_GROUP)}


@both_handlers()
def test_config_map_volume_is_read_only_and_readable(cri, tmp_path, handler):
    volumes = kubelet_volumes(tmp_path / "pods")
    code, out, err = exec_in_a_volume_app(
        cri,
        handler,
        tmp_path / "logs",
        volumes,
        "cat /etc/config/greeting; touch /etc/config/new 2>&1 || echo refused",
        groups=[FS_GROUP],
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "hello from the config map"
    assert "Read-only file system" in out and lines[-1] == "refused", out
    assert not os.path.exists(os.path.join(volumes["config-map"], "new"))


@both_handlers()
def test_a_secret_file_0640_to_the_fs_group_is_readable_by_the_container_user(
    cri, tmp_path, handler
):
    volumes = kubelet_volumes(tmp_path / "pods")
    code, out, err = exec_in_a_volume_app(
        cri, handler, tmp_path / "logs", volumes, "cat /etc/secret/password", groups=[FS_GROUP]
    )
    assert code == 0 and out == "s3cret\n", (out, err)


@both_handlers()
def test_the_projected_service_account_token_is_readable_by_the_container_user(
    cri, tmp_path, handler
):
    volumes = kubelet_volumes(tmp_path / "pods")
    code, out, err = exec_in_a_volume_app(
        cri, handler, tmp_path / "logs", volumes, "cat /var/run/secrets/tokens/token"
    )
    assert code == 0 and out == "eyJ.token\n", (out, err)


@both_handlers()
def test_an_fs_group_empty_dir_is_writable_by_the_container_user(cri, tmp_path, handler):
    volumes = kubelet_volumes(tmp_path / "pods")
    code, out, err = exec_in_a_volume_app(
        cri,
        handler,
        tmp_path / "logs",
        volumes,
        "echo kept > /data/note && cat /data/note",
        groups=[FS_GROUP],
    )
    assert code == 0 and out == "kept\n", (out, err)
    # setgid directory: the file belongs to the fsGroup, as the pod's other containers expect.
    assert os.stat(os.path.join(volumes["empty-dir"], "note")).st_gid == FS_GROUP


@both_handlers()
def test_read_only_root_filesystem(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            app = await the_pod.run_container("zpd-app", IDLE, readonly_rootfs=True)
            return await the_pod.exec(
                app,
                "touch /new-file 2>&1 || echo root refused; cat /etc/hostname >/dev/null && "
                "echo reads",
            )

    code, out, err = run(scenario())
    assert "Read-only file system" in out, out
    lines = out.splitlines()
    assert "root refused" in lines and lines[-1] == "reads", out


# ---- several containers, init containers, restarts ------------------------------------


@both_handlers()
def test_an_init_container_runs_to_completion_before_the_app_starts(cri, tmp_path, handler):
    volume = tmp_path / "zpd-shared"
    volume.mkdir()
    volume.chmod(0o777)  # an emptyDir without fsGroup

    async def scenario():
        async with pod(cri, handler, tmp_path / "logs") as the_pod:
            pb = the_pod.pb
            shared = [pb.Mount(container_path="/shared", host_path=str(volume))]
            init = await the_pod.run_container(
                "zpd-init", "sleep 0.3; echo prepared > /shared/state", mounts=shared
            )
            init_status = await the_pod.wait_exited(init)
            # The kubelet starts the app only once the init container exited 0.
            app = await the_pod.run_container("zpd-app", IDLE, mounts=shared)
            return init_status, await the_pod.exec(app, "cat /shared/state")

    init_status, (code, out, err) = run(scenario())
    assert init_status.exit_code == 0 and init_status.reason == "Completed", init_status
    assert code == 0 and out == "prepared\n", (out, err)


@both_handlers()
def test_several_containers_of_a_pod_run_side_by_side(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            names = [f"zpd-c{i}" for i in range(3)]
            ids = [await the_pod.run_container(n, f"echo I am {n}; {IDLE}") for n in names]
            states = [(await the_pod.status(c)).state for c in ids]
            answers = [(await the_pod.exec(c, "hostname"))[1] for c in ids]
            logs = [await the_pod.wait_logged(n, f"I am {n}") for n in names]
            return ids, states, answers, logs

    ids, states, answers, logs = run(scenario())
    assert len(set(ids)) == 3
    assert states == [cri.pb.CONTAINER_RUNNING] * 3
    assert len(set(answers)) == 1 and answers[0].startswith("pod-"), answers  # the pod's name
    for index, log in enumerate(logs):
        assert ("stdout", "F", f"I am zpd-c{index}") in messages(log)


@both_handlers()
def test_a_crashed_container_is_created_again_under_the_same_name(cri, tmp_path, handler):
    async def scenario():
        async with pod(cri, handler, tmp_path) as the_pod:
            first = await the_pod.run_container("zpd-app", "echo attempt one; exit 2")
            crashed = await the_pod.wait_exited(first)
            # The kubelet's restart: the same name, attempt + 1, the old one kept (exited).
            second = await the_pod.run_container("zpd-app", f"echo attempt two; {IDLE}", attempt=1)
            log = await the_pod.wait_logged("zpd-app", "attempt two", attempt=1)
            return first, crashed, second, await the_pod.status(second), log

    first, crashed, second, status, log = run(scenario())
    assert crashed.exit_code == 2 and crashed.reason == "Error", crashed
    assert second != first
    assert status.state == cri.pb.CONTAINER_RUNNING and status.metadata.attempt == 1
    assert ("stdout", "F", "attempt two") in messages(log)


# ---- user namespaces the kubelet asks for ---------------------------------------------


@both_handlers()
def test_a_host_users_false_pod_gets_the_kubelets_id_mappings(cri, tmp_path, handler):
    host_id = 0x50000  # the kubelet hands each such pod a 65536-aligned range
    pb = cri.pb

    async def scenario():
        async with cri.runtime() as runtime:
            version = await runtime.Version(pb.VersionRequest(version="v1"))
            if tuple(int(n) for n in version.runtime_version.lstrip("v").split(".")[:2]) < (1, 7):
                return version.runtime_version
            the_pod = PodUnderTest(cri, runtime, handler, str(tmp_path))
            mapping = [pb.IDMapping(host_id=host_id, container_id=0, length=65536)]
            userns = pb.UserNamespace(mode=pb.POD, uids=mapping, gids=mapping)
            the_pod._namespaces = lambda: pb.NamespaceOption(
                network=pb.POD, pid=pb.CONTAINER, userns_options=userns
            )
            try:
                await the_pod.run()
                app = await the_pod.run_container("zpd-app", IDLE)
                return await the_pod.exec(app, "cat /proc/self/uid_map")
            finally:
                await the_pod.remove()

    result = run(scenario())
    if isinstance(result, str):
        pytest.skip(
            f"containerd {result}'s CRI ignores NamespaceOption.userns_options (user "
            "namespaces for pods came in containerd 1.7/2.0): hostUsers: false cannot be "
            "asked through it; test_containerd2_cri.py asks it through containerd 2.x's CRI"
        )
    code, out, err = result
    assert code == 0, err
    assert out.split() == ["0", str(host_id), "65536"], out


def test_zviz_run_honours_the_kubelets_id_mappings(zviz_bin, make_bundle, tmp_path):
    # What containerd 1.7+ passes zviz for a hostUsers: false pod: config.json with the
    # kubelet's mappings and a user namespace. The default profile keeps them as they are
    # (its own 100000 mapping is only for a spec without any).
    host_id = 0x60000
    bundle = make_bundle(["sh", "-c", "cat /proc/self/uid_map /proc/self/gid_map; id -u"])

    def kubelet_mappings(config):
        namespaces = config["linux"]["namespaces"]
        if not any(ns["type"] == "user" for ns in namespaces):
            namespaces.append({"type": "user"})
        mapping = [{"containerID": 0, "hostID": host_id, "size": 65536}]
        config["linux"]["uidMappings"] = mapping
        config["linux"]["gidMappings"] = mapping

    edit_config(bundle, kubelet_mappings)
    zviz = Zviz(zviz_bin, str(tmp_path / tagged("zpd-root")))
    result = zviz("run", "--bundle", bundle, unique_id("zpd-userns"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split() for line in lines[:2]] == [["0", str(host_id), "65536"]] * 2
    assert lines[2] == "0"


def test_zviz_run_refuses_mappings_that_give_the_container_host_root(
    zviz_bin, make_bundle, tmp_path
):
    bundle = make_bundle(["true"])

    def host_root_mapping(config):
        namespaces = config["linux"]["namespaces"]
        if not any(ns["type"] == "user" for ns in namespaces):
            namespaces.append({"type": "user"})
        mapping = [{"containerID": 0, "hostID": 0, "size": 65536}]
        config["linux"]["uidMappings"] = mapping
        config["linux"]["gidMappings"] = mapping

    edit_config(bundle, host_root_mapping)
    zviz = Zviz(zviz_bin, str(tmp_path / tagged("zpd-root")))
    result = zviz("run", "--bundle", bundle, unique_id("zpd-userns"))
    assert result.returncode != 0
    assert "maps host uid 0" in result.stderr, result.stderr
