"""An exec'd process and PID 1's Landlock domain (issue 11 item 4, issue 14 item 2), through
`zviz run -d` and `zviz exec`.

`kubectl exec` into a container expects to reach PID 1 as the same user would: write to
its output (`echo hi > /proc/1/fd/1`), read /proc/1/environ, signal it (`kill -HUP 1`).
Landlock allows ptrace-mode access (/proc/<pid>/fd, environ, mem) and, with `scope`,
signals only towards the caller's own domain or one nested under it. An exec that calls
landlock_restrict_self itself is in a sibling of PID 1's domain, where the first two are
refused; so execs are forked by the container's exec anchor, a child of PID 1 holding its
domain (runtime/exec_anchor.py; docs/architecture.md, "An exec and PID 1's Landlock
domain"). Signals work either way: in a pid namespace of the container's own, the signal
scope is not asked (security._signals_need_scope). What must hold whatever the domain: an
exec writes nowhere PID 1 cannot.
"""

import os
import select
import time

import pytest

from integration.ids import tagged
from integration.zviz_cli import Zviz, leftovers, unique_id

PROFILES = ["ci-runner", "hostile-tenant"]
# PID 1 first tries the writes test_an_exec_writes_nowhere_pid_1_cannot makes; then a
# child of its own, in PID 1's Landlock domain as an exec is, does what the exec tests
# ask of an exec: the control that what they ask is reachable from that domain.
IN_PID_1S_DOMAIN = (
    "cat /proc/1/environ | tr '\\0' '\\n' | grep -q ^PATH= && echo environ; "
    "kill -0 1 && echo signalled; "
    "echo written-by-child > /proc/1/fd/1"
)
IDLE = (
    "touch /etc/s4exec-pid1 2>/dev/null && echo pid1-wrote-etc; "
    "touch /tmp/s4exec-pid1 && echo pid1-wrote-tmp; "
    f"({IN_PID_1S_DOMAIN}); "
    "echo started; while :; do sleep 0.1; done"
)


@pytest.fixture
def zviz(zviz_bin, tmp_path):
    return Zviz(zviz_bin, str(tmp_path / tagged("root")))


@pytest.fixture
def running(zviz, make_bundle, request):
    """(container id, read end of PID 1's stdout pipe, PID 1's lines before "started") of
    a detached container running IDLE under the profile `request.param`; deleted after."""
    container_id = unique_id("zviz-s4exec")
    # A writable rootfs: what refuses a write below is Landlock, not a read-only mount.
    bundle = make_bundle(["sh", "-c", IDLE], root={"path": "rootfs", "readonly": False})
    # A directory of uid 1000's own, outside the profile's writable paths.
    users_own = os.path.join(bundle, "rootfs", "srv", "s4exec")
    os.makedirs(users_own)
    os.chown(users_own, 1000, 1000)
    read_end, write_end = os.pipe()
    try:
        # PID 1's stdout is a pipe: Landlock checks no path for a pipe, so opening
        # /proc/1/fd/1 meets the ptrace-mode check and the pipe's owner. create, then
        # give the pipe to the container's root as the shim does (a pipe of host root's
        # is closed to it: docs/security.md, "Known limits"), then start.
        created = zviz.create(bundle, container_id, "--profile", request.param, stdout=write_end)
        assert created.returncode == 0, created.stderr
        os.close(write_end)
        write_end = -1
        pid1 = os.stat(f"/proc/{zviz.state(container_id)['pid']}")
        os.fchown(read_end, pid1.st_uid, pid1.st_gid)
        started = zviz("start", container_id)
        assert started.returncode == 0, started.stderr
        before = []
        while (line := read_line(read_end)) not in ("started", ""):
            before.append(line)
        assert line == "started", before
        yield container_id, read_end, before
    finally:
        if write_end >= 0:
            os.close(write_end)
        zviz("delete", "--force", container_id)
        os.close(read_end)
        assert leftovers(container_id, zviz.root) == []


def read_line(fd: int, timeout: float = 10) -> str:
    """One line from the pipe, or what came before the timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode().rstrip("\n")


@pytest.mark.parametrize("running", PROFILES, indirect=True)
def test_a_child_of_pid_1_reaches_it(running):
    # The control for the exec tests: from PID 1's own domain all of it works.
    _, _, pid1_said = running
    assert pid1_said[1:] == ["environ", "signalled", "written-by-child"], pid1_said


@pytest.mark.parametrize("running", PROFILES, indirect=True)
def test_an_exec_reads_pid_1s_environ_and_writes_to_its_stdout(zviz, running):
    container_id, pid1_stdout, _ = running
    executed = zviz(
        "exec", container_id, "sh", "-c",
        "cat /proc/1/environ | tr '\\0' '\\n' | grep -q ^PATH= && echo environ; "
        "echo written-by-exec > /proc/1/fd/1 && echo write",
    )  # fmt: skip
    assert executed.stdout.split() == ["environ", "write"], executed.stderr
    assert read_line(pid1_stdout) == "written-by-exec"


@pytest.mark.parametrize("running", PROFILES, indirect=True)
def test_an_exec_signals_pid_1(zviz, running):
    # `kubectl exec ... kill -HUP 1` (or `nginx -s reload`), how many images reload their
    # configuration. kill -0 passes the same permission checks, Landlock's included.
    container_id, _, _ = running
    executed = zviz("exec", container_id, "sh", "-c", "kill -0 1 && echo signalled")
    assert executed.stdout.split() == ["signalled"], executed.stderr


@pytest.mark.parametrize("running", PROFILES, indirect=True)
def test_an_exec_writes_nowhere_pid_1_cannot(zviz, running):
    # /etc is root's and /srv/s4exec uid 1000's, both mode 0755, on a writable rootfs:
    # only Landlock refuses their owners' writes, to PID 1 and to every exec, whatever
    # domain an exec ends up in. /tmp, the profile's writable path, shows both can write.
    container_id, _, pid1_said = running
    assert pid1_said[0] == "pid1-wrote-tmp", pid1_said
    script = (
        "touch /etc/s4exec-exec-$(id -u) 2>/dev/null && echo exec-wrote-etc; "
        "touch /srv/s4exec/exec-$(id -u) 2>/dev/null && echo exec-wrote-srv; "
        "touch /tmp/s4exec-exec-$(id -u) && echo exec-wrote-tmp; "
        "stat -c %a:%u /etc /srv/s4exec; "
        'awk \'$2 == "/" {split($4, o, ","); print o[1]}\' /proc/mounts'
    )
    for user in ("0:0", "1000:1000"):
        executed = zviz("exec", "--user", user, container_id, "sh", "-c", script)
        assert executed.returncode == 0, executed.stderr
        assert executed.stdout.split() == ["exec-wrote-tmp", "755:0", "755:1000", "rw"], (
            user,
            executed.stdout,
            executed.stderr,
        )
