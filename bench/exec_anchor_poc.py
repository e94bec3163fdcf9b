"""Proof of the kernel mechanics of the exec "anchor" (docs/architecture.md, "An exec and
PID 1's Landlock domain"): not the runtime's code, a throwaway to measure with.

    python -m bench.exec_anchor_poc            (root; busybox-static)

    this script ──fork──▶ anchor: new mount/uts/ipc/net namespaces, builds the rootfs
                                  (pivot_root), Landlock restrict, then serves execs
                          anchor ──fork──▶ X: unshare(CLONE_NEWPID) ──fork──▶ PID 1; X exits
    this script ──fork──▶ helper: setns(mnt, pid) ──fork──▶ mounts /proc (unrestricted)
    exec request ──▶ anchor ──fork──▶ setns(PID 1's pid ns) ──fork──▶ the exec, no Landlock
                                                                      of its own

No user namespace, seccomp or cgroup: what is measured is whether an exec forked by the
anchor reaches PID 1 (/proc/1/environ, /proc/1/fd/1, kill 1) while Landlock still holds
for it, whether the workload can see the anchor, the anchor's PSS and an exec's latency
through it. Runs twice: with the rules PID 1 has today (made before /proc is mounted,
so /proc stays unreadable: Landlock skips the hidden mount point) and with READ on "/".
Not in `make bench` (bench/__main__.py). Prints one line per fact; exits 1 if any
expectation fails.
"""

import array
import ctypes
import json
import os
import shutil
import signal
import socket
import stat
import statistics
import sys
import tempfile
import time
import traceback

from runtime import linux, procstat
from runtime.security import landlock
from tools.mkbundle import build_rootfs

TAG = os.environ.get("ZVIZ_TEST_TAG", "s4exec")


def send(sock: socket.socket, message: dict, fds=()) -> None:
    data = json.dumps(message).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return (json.loads(data) if data else None), list(fds)


class AnchorRuleset(landlock.Ruleset):
    """The runtime's Ruleset tells a directory by /proc/self/fd, which the anchor does
    not have yet (/proc comes once PID 1 exists): fstat the O_PATH fd instead."""

    def allow_fd(self, fd: int, access: int, name: str = "") -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= landlock.FILE_ACCESS
        access &= self.handled_fs
        rule = landlock._PathBeneathAttr(access, fd)
        linux.raw_syscall(
            "landlock_add_rule",
            ctypes.c_int(self.fd),
            ctypes.c_int(landlock.RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_uint32(0),
            detail=name,
        )


def anchor(rootfs: str, control: socket.socket, pid1_stdout: int, read_all: bool) -> None:
    """The namespace child: rootfs, Landlock, PID 1 through X, then one exec per request."""
    linux.set_pdeathsig(signal.SIGKILL)
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWNET)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount(rootfs, rootfs, None, linux.MS_BIND | linux.MS_REC)
    os.chdir(rootfs)
    linux.mount("tmpfs", "tmp", "tmpfs", 0, "mode=1777")
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")
    # The ruleset PID 1 builds today, in short: read every top-level entry but /dev, write
    # /tmp, scoped. /proc is not mounted yet: its rule lands on the directory beneath.
    # read_all: READ on "/" itself instead, which reaches /proc once mounted, and /dev.
    abi = landlock.abi_version()
    ruleset = AnchorRuleset(abi, False, False, abi >= 6)
    ruleset.allow_path("/", landlock.READ if read_all else landlock.FS_READ_DIR)
    for entry in os.listdir("/"):
        if entry != "dev" and not os.path.islink("/" + entry):
            ruleset.allow_path("/" + entry, landlock.READ)
    ruleset.allow_path("/tmp", landlock.READ | landlock.WRITE)
    ruleset.allow_path("/dev", landlock.FS_READ_DIR)
    ruleset.restrict()  # host root here: CAP_SYS_ADMIN stands for no_new_privs
    ruleset.close()
    go_read, go_write = os.pipe()  # PID 1 waits on it for /proc
    pid_read, pid_write = os.pipe()  # X tells the anchor PID 1's pid
    x = os.fork()
    if x == 0:
        linux.unshare(linux.CLONE_NEWPID)
        pid1 = os.fork()
        if pid1 == 0:
            os.close(go_write)
            os.dup2(pid1_stdout, 1)
            os.read(go_read, 1)
            env = {"PATH": "/bin", "S4EXEC": "pid1"}
            os.execve("/bin/sh", ["sh", "-c", "echo started; exec sleep 1000"], env)
        os.write(pid_write, str(pid1).encode())
        os._exit(0)
    os.close(pid_write)
    os.waitpid(x, 0)
    pid1 = int(os.read(pid_read, 16))
    os.close(pid_read)
    os.close(go_read)
    os.close(pid1_stdout)
    pid1_fd = linux.pidfd_open(pid1)
    send(control, {"pid1": pid1}, [go_write])
    os.close(go_write)
    while True:
        request, fds = recv(control)
        if request is None:
            os._exit(0)
        started = os.fork()
        if started == 0:
            linux.setns(pid1_fd, linux.CLONE_NEWPID)  # this child's children: PID 1's
            execd = os.fork()
            if execd == 0:
                os.dup2(fds[0], 1)
                os.dup2(fds[0], 2)
                linux.set_no_new_privs()
                os.execve("/bin/sh", ["sh", "-c", request["script"]], {"PATH": "/bin"})
            _, status = os.waitpid(execd, 0)
            os._exit(os.waitstatus_to_exitcode(status))
        for fd in fds:
            os.close(fd)
        _, status = os.waitpid(started, 0)
        send(control, {"exit": os.waitstatus_to_exitcode(status)})


def mount_proc(pid1: int) -> None:
    """The unrestricted helper: a procfs of PID 1's namespace, made by a process in it."""
    mnt = os.open(f"/proc/{pid1}/ns/mnt", os.O_RDONLY)
    pid = os.open(f"/proc/{pid1}/ns/pid", os.O_RDONLY)
    helper = os.fork()
    if helper == 0:
        linux.setns(mnt, linux.CLONE_NEWNS)
        linux.setns(pid, linux.CLONE_NEWPID)
        mounter = os.fork()
        if mounter == 0:
            linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
            os._exit(0)
        _, status = os.waitpid(mounter, 0)
        os._exit(os.waitstatus_to_exitcode(status))
    _, status = os.waitpid(helper, 0)
    os.close(mnt)
    os.close(pid)
    assert os.waitstatus_to_exitcode(status) == 0, "mounting /proc failed"


def exec_in(control: socket.socket, script: str) -> tuple[int, str]:
    read_end, write_end = os.pipe()
    send(control, {"script": script}, [write_end])
    os.close(write_end)
    reply, _ = recv(control)
    with os.fdopen(read_end) as f:
        return reply["exit"], f.read()


def kill_our_children() -> None:
    """As subreaper, PID 1 is ours once X exits: kill and reap every child left."""
    for child in procstat.children().get(os.getpid(), ()):
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def variant(read_all: bool) -> list[str]:
    """One container through an anchor; the expectations that failed."""
    print(f"-- ruleset: {'READ on /' if read_all else 'as PID 1 has today'}")
    workdir = tempfile.mkdtemp(prefix=f"zviz-{TAG}-anchor-")
    rootfs = os.path.join(workdir, "rootfs")
    build_rootfs(rootfs)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    out_read, out_write = os.pipe()
    anchor_pid = os.fork()
    if anchor_pid == 0:
        ours.close()
        os.close(out_read)
        try:
            anchor(rootfs, theirs, out_write, read_all)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    theirs.close()
    os.close(out_write)
    failed = []

    def expect(what: str, ok: bool, seen) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {seen}")
        if not ok:
            failed.append(what)

    try:
        message, fds = recv(ours)
        pid1 = message["pid1"]
        mount_proc(pid1)
        os.write(fds[0], b"g")
        os.close(fds[0])
        pid1_out = os.fdopen(out_read)
        expect("PID 1 started", pid1_out.readline() == "started\n", "started")
        ppid = procstat.parent(pid1)
        expect("PID 1 is not the anchor's child", ppid != anchor_pid, f"ppid {ppid}")
        same = (
            os.stat(f"/proc/{anchor_pid}/ns/pid").st_ino == os.stat(f"/proc/{pid1}/ns/pid").st_ino
        )
        expect("the anchor is outside PID 1's pid namespace", not same, f"same={same}")
        code, out = exec_in(
            ours,
            "(tr '\\0' '\\n' < /proc/1/environ | grep ^S4EXEC=) 2>/tmp/e || echo environ-refused; "
            "echo written-by-exec > /proc/1/fd/1 && echo wrote; kill -0 1 && echo signalled; "
            "touch /etc/s4exec 2>/tmp/e || echo etc-refused; touch /tmp/s4 && echo tmp-ok; "
            "cat /proc/1/comm 2>/tmp/e || echo proc-refused",
        )
        lines = out.split()
        # A rule on a directory does not reach a filesystem mounted over it later (Landlock
        # skips hidden mount points): with today's rules /proc is unreadable, PID 1's too.
        environ = "S4EXEC=pid1" if read_all else "environ-refused"
        comm = "sleep" if read_all else "proc-refused"
        expect(
            "an exec reaches PID 1 (fd, signal; environ and /proc only with READ on /), "
            "Landlock still refuses /etc",
            lines == [environ, "wrote", "signalled", "etc-refused", "tmp-ok", comm],
            " | ".join(out.splitlines()),
        )
        expect("PID 1 got the exec's line", pid1_out.readline() == "written-by-exec\n", "")
        if read_all:
            # The container's /proc: PID 1 (sleep), the exec's shell and its pipeline.
            _, out = exec_in(ours, "for p in /proc/[0-9]*; do cat $p/comm; done | sort -u")
            seen = set(out.split())
            expect(
                "the workload sees no anchor",
                "sleep" in seen and seen <= {"sleep", "sh", "cat", "sort"},
                sorted(seen),
            )
        times = []
        for _ in range(20):
            start = time.monotonic()
            code, _ = exec_in(ours, "exec /bin/true")
            times.append((time.monotonic() - start) * 1000)
        expect(
            "exec /bin/true through the anchor",
            code == 0,
            f"median {statistics.median(times):.2f} ms",
        )
        print(
            f"info anchor PSS: {pss_kib(anchor_pid)} KiB (Python, stdlib + runtime.linux/landlock)"
        )
    finally:
        ours.close()  # the anchor exits at EOF
        os.waitpid(anchor_pid, 0)
        kill_our_children()  # PID 1 (its namespace dies with it), whatever failed
        shutil.rmtree(workdir)
    return failed


def main() -> int:
    linux.set_child_subreaper()  # PID 1 comes back to us when X exits
    failed = variant(read_all=False) + variant(read_all=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
