"""The exec anchor: execs forked inside PID 1's Landlock domain (issue 11 item 4).

Every Landlock domain is made by one landlock_restrict_self and passes only by fork. An
exec that restricts itself is in a sibling of PID 1's domain, and Landlock refuses it
ptrace-mode access to PID 1 (/proc/1/fd/1, /proc/1/environ). So PID 1, once every layer
is applied and right before its execve, starts the anchor (vfork, else fork: start;
runtime/exec_anchor.c, a static C program: PID 1's root has no zviz and maybe no libc),
which forks the execs.
docs/architecture.md, "An exec and PID 1's Landlock domain", has the whole picture.

    create (parent):  bind_socket(state dir)  + open_binary()  → fds for PID 1
    PID 1:            security.apply(...) → start() → execve(workload)
    exec (parent):    ineligible(...) / connect(state dir) → fd for the exec child
    exec child:       send_request(fd, process) → channel; await_ready(channel);
                      send_stdio(channel, stdio)   (host pid namespace, host root)
    stand-in:         stand_in(channel): "go", the exec's pid, then exec_anchor.c
                      --stand-in: forwards signals, exits as the exec did

Until the anchor's monitor said "ready" nothing of the exec exists: an anchor that does
not answer within ANSWER_TIMEOUT (the workload, the same user, may SIGSTOP it) or that
closes the request (killed, or built from other source) raises Unanswered, and the exec
takes the old path instead (runtime/container.py).

The stand-in is the exec process as the caller (the shim's reaper, `zviz exec`, its
--pid-file) knows it: it exits as the exec does.
"""

import contextlib
import os
import signal
import socket
import struct

from runtime import errors, procstat, static_programs

SOCKET_NAME = "anchor.sock"
BINARY_NAME = "zviz-anchor"
# Mirrors of exec_anchor.c's request layout: one place each, checked by the unit test.
MAGIC = 0x7A766132
FLAG_TERMINAL = 1
FLAG_UMASK = 2
HEADER = struct.Struct("=5I")
MAX_REQUEST = 256 * 1024
# The anchor and one monitor per exec count in the container's pids limit: below this
# limit the workload keeps its processes and execs take the old path.
MIN_PIDS_LIMIT = 8
# Seconds the exec child waits for the monitor's "ready" (a fork and a write in a tiny
# static process: milliseconds, even on a loaded node) before it looks at the anchor:
# stopped (the workload, the same user, may SIGSTOP it) or gone, the exec takes the old
# path; seen running (slow: a CPU-throttled container), the wait goes on, one more
# ANSWER_TIMEOUT at a time, up to SLOW_ANSWER_LIMIT. Without the anchor's pid, the first
# deadline decides. Well below the 60 s setup timeout, which the exec would otherwise hit.
ANSWER_TIMEOUT = 2.0
SLOW_ANSWER_LIMIT = 30.0


class Unanswered(Exception):
    """The anchor did not take the exec (stopped, killed, out of processes, another
    build): nothing of the exec runs, the old path may run it."""


def binary_path() -> str:
    """The one place the runtime looks for the compiled anchor (runtime/static_programs.py
    says where), and where `make install` and `zviz node install` build it."""
    return static_programs.binary_path(BINARY_NAME)


def build(bin_dir: str) -> str | None:
    """Compile runtime/exec_anchor.c into BIN_DIR; None without a C compiler or a static
    libc (libc6-dev)."""
    return static_programs.build(bin_dir, BINARY_NAME)


# ---------------------------------------------------------------------------
# create: what PID 1 needs for the anchor, made by the parent as host root.


def prepare(state_dir: str, spec, log) -> tuple[int, int] | None:
    """(bound socket fd, O_PATH fd of the binary) for PID 1, or None (logged why): the
    socket is bound at STATE_DIR/anchor.sock, outside the container's root."""
    why = _why_no_anchor(spec)
    if why is None:
        try:
            binary = os.open(binary_path(), os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            why = (
                f"no compiled anchor at {binary_path()} ({e.strerror}): `make install`, or"
                " `python -m runtime.static_programs --build` with that directory, builds it"
            )
    if why is None:
        try:
            return _bind(state_dir), binary
        except OSError as e:  # a full state filesystem: the container runs all the same
            os.close(binary)
            why = f"cannot bind {SOCKET_NAME} ({e.strerror})"
    log.info(f"exec anchor: none ({why}); execs get a Landlock domain of their own")
    return None


def _why_no_anchor(spec) -> str | None:
    resources = spec.linux.resources
    pids = getattr(getattr(resources, "pids", None), "limit", None)
    if pids is not None and 0 < pids < MIN_PIDS_LIMIT:
        return f"pids limit {pids} < {MIN_PIDS_LIMIT}: the anchor would take the workload's"
    return None


def _bind(state_dir: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        # Every datagram then carries its sender's credentials: the anchor serves only
        # host root (the workload cannot reach the path anyway).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        with _socket_path(state_dir) as path:
            sock.bind(path)
    except BaseException:
        sock.close()
        raise
    return sock.detach()


@contextlib.contextmanager
def _socket_path(state_dir: str):
    """The socket's path, short enough for sockaddr_un (108 bytes) however deep the state
    dir is: through /proc/self/fd and a dir fd held only while the path is used."""
    path = os.path.join(state_dir, SOCKET_NAME)
    if len(path.encode()) < 100:
        yield path
        return
    fd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# PID 1, after security.apply.


def expected_uid() -> int:
    """Host root as this user namespace sees it (SCM_CREDENTIALS translate the sender's
    uid into the receiver's namespace): its mapped id, else the overflow uid."""
    with open("/proc/self/uid_map") as f:
        for line in f:
            inside, outside, count = (int(word) for word in line.split())
            if outside <= 0 < outside + count:
                return inside
    with open("/proc/sys/kernel/overflowuid") as f:
        return int(f.read())


_STARTED: list = []


def may_vfork(profile, oci_seccomp: dict | None) -> bool:
    """Whether PID 1 may start the anchor with vfork (start), else it forks, as before:
    - only where every filter it loads allows vfork outright: elsewhere (a user's profile
      without it) the vfork would be refused and leave a denial record in every container;
    - only where PID 1 has `subprocess` from its parent (the shim's asyncio, the fork
      server's preload): PID 1 cannot import after pivot_root, and a one-shot `zviz
      create` would pay 4-8 ms importing it to save the fork of a small process."""
    import sys

    from runtime.security import seccomp

    return "subprocess" in sys.modules and seccomp.allows_plainly(profile, oci_seccomp, "vfork")


def start(socket_fd: int, binary_fd: int, uid: int, own_pid_namespace: bool, vfork: bool) -> None:
    """Start the anchor (PID 1 right before its execve; its layers are applied). A fork the
    pids limit refuses, or an execve that fails, leaves the container without an anchor:
    execs take the old path. VFORK: may_vfork's answer.

    With vfork (CPython's subprocess, the plain vfork syscall: not posix_spawn, whose
    clone3 every profile answers with a logged ENOSYS) no copy of PID 1's page tables is
    made for the anchor's execve to tear down, and PID 1 goes on only once that execve is
    done (subprocess's error pipe: the anchor is never a copy of PID 1 when the workload,
    or an exec right after Start, runs)."""
    args = [BINARY_NAME, str(socket_fd), str(uid), "1" if own_pid_namespace else "0"]
    args.append(str(os.getpid()))
    # /proc/self/fd/N rather than execveat: the strictest profile's seccomp allows only
    # execve; Landlock has a rule for this one file.
    executable = f"/proc/self/fd/{binary_fd}"
    # Without /proc (a spec that mounts none) the execve fails either way, and the vfork
    # child, unable to list /proc/self/fd, would close every fd number up to RLIMIT_NOFILE.
    if vfork and os.path.exists(executable):
        import subprocess  # already imported: may_vfork

        try:
            # pass_fds: the socket loses close-on-exec in the child alone; the binary's
            # fd must stay open for the execve through /proc (the anchor closes every fd
            # but the socket first thing). No preexec_fn: it would turn vfork into fork.
            # restore_signals=False: the anchor inherits PID 1's dispositions, as forked.
            anchor = subprocess.Popen(
                args, executable=executable, env={}, pass_fds=(socket_fd, binary_fd),
                restore_signals=False,
            )  # fmt: skip
            # Held until PID 1's execve: a Popen collected while its child runs warns
            # (ResourceWarning, shown under -W default) on PID 1's stderr, the workload's.
            _STARTED.append(anchor)
            return
        except (OSError, subprocess.SubprocessError):
            pass  # refused (pids limit, a filter): fork, which says the same or works
    _fork_and_exec(socket_fd, executable, args)


def _fork_and_exec(socket_fd: int, executable: str, args: list[str]) -> None:
    # PID 1 waits until the anchor has exec'd (the close-on-exec write end reaches EOF):
    # else, on a loaded machine, the workload (and an exec right after Start) could run
    # before the anchor is the anchor, still a copy of PID 1 under another name.
    exec_done, exec_pending = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(exec_done)
        os.close(exec_pending)
        return
    if pid != 0:
        os.close(exec_pending)
        os.read(exec_done, 1)  # EOF: the child's execve closed it (or the child exited)
        os.close(exec_done)
        return
    try:
        os.close(exec_done)
        os.set_inheritable(socket_fd, True)
        os.execve(executable, args, {})
    finally:
        os._exit(127)


# ---------------------------------------------------------------------------
# exec (parent): may this exec go through the anchor?


def ineligible(process, pid1_process, profile, preserve_fds: int) -> str | None:
    """Why PROCESS cannot be forked by the anchor (it asks for something PID 1 lacks),
    or None. PID1_PROCESS is the container's process as hardened for PID 1 (capabilities
    under the profile's ceiling, noNewPrivileges always set, as for every exec). What a
    CRI exec or `ctr task exec` asks always matches: containerd copies it from the
    container's process."""
    from runtime.security import capabilities as caps

    if preserve_fds:
        return "--preserve-fds"
    asked, _ = caps.ceiling(process.capabilities, profile.capabilities)
    held = pid1_process.capabilities or caps.Capabilities()
    for name in caps.CAPABILITY_SETS:
        if set(getattr(asked, name)) != set(getattr(held, name)):
            return f"its {name} capabilities differ from the container's process"
    for field, what in (
        ("user", "user"),
        ("apparmor_profile", "apparmorProfile"),
        ("selinux_label", "selinuxLabel"),
        ("rlimits", "rlimits"),
        ("oom_score_adj", "oomScoreAdj"),
        ("io_priority", "ioPriority"),
        ("scheduler", "scheduler"),
    ):
        if getattr(process, field) != getattr(pid1_process, field):
            return f"its {what} differs from the container's process"
    if len(encode(process)) > MAX_REQUEST:
        return "its arguments and environment exceed the anchor's request size"
    return None


def connect(state_dir: str, pid1: int) -> tuple[int, int, int]:
    """(a socket connected to the container's anchor, an O_PATH fd of the binary the
    stand-in runs, the anchor's host /proc directory or -1: see find); OSError when there
    is no anchor (never started, or gone: the workload may kill it) or no binary. PID1:
    the container's PID 1, host pid."""
    binary = os.open(binary_path(), os.O_PATH | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        with _socket_path(state_dir) as path:
            sock.connect(path)
    except BaseException:
        sock.close()
        os.close(binary)
        raise
    return sock.detach(), binary, find(pid1)


def find(pid1: int) -> int:
    """The anchor's /proc directory (host procfs, a dir fd: it keeps naming that process
    after the exec child joins the container's mounts), or -1: PID 1's first child named
    zviz-anchor (PID 1 forks it before the workload runs, so it comes first; a workload
    child that names itself so only makes its own execs wait longer for their fallback)."""
    try:
        with open(f"/proc/{pid1}/task/{pid1}/children") as f:
            children = f.read().split()
    except OSError:
        return -1
    for child in children:
        try:
            directory = os.open(f"/proc/{child}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        stat = _stat(directory)
        if stat is not None and stat[0] == BINARY_NAME and stat[2] == pid1:
            return directory  # opened, then checked: not a pid reused meanwhile
        os.close(directory)
    return -1


def _stat(proc_dir: int) -> tuple[str, str, int] | None:
    """(comm, state, parent pid) from PROC_DIR/stat, or None when the process is gone."""
    try:
        fd = os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_dir)
        try:
            text = os.read(fd, 4096).decode(errors="replace")
        finally:
            os.close(fd)
    except OSError:
        return None
    fields = procstat.parse(text)
    return fields[procstat.COMMAND], fields[procstat.STATE], int(fields[procstat.PARENT])


def encode(process, terminal: bool = False) -> bytes:
    """The request body (exec_anchor.c's struct request and strings). TERMINAL: stdin is
    a pty the exec makes its controlling terminal (a new session)."""
    flags = FLAG_TERMINAL if terminal else 0
    umask = process.user.umask
    if umask is not None:
        flags |= FLAG_UMASK
    strings = [process.cwd or "/", *process.args, *(process.env or ())]
    body = b"".join(s.encode() + b"\0" for s in strings)
    header = HEADER.pack(MAGIC, flags, umask or 0, len(process.args), len(process.env or ()))
    return header + body


# ---------------------------------------------------------------------------
# The exec child (host pid namespace, host root): the request; then the stand-in.


def send_request(anchor_fd: int, process, terminal: bool) -> int:
    """Send the request (TERMINAL: stdin will be a pty for a new session); returns our
    end of the reply channel, for await_ready. The anchor's monitor forks nothing before
    the stand-in says "go" on it. Unanswered when the anchor cannot take it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        anchor = socket.socket(fileno=anchor_fd)
        try:
            # MSG_DONTWAIT: a stopped anchor's queue fills (net.unix.max_dgram_qlen, 10 by
            # default), and a send to a full queue would wait for as long as it is stopped.
            anchor.sendmsg(
                [encode(process, terminal)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", theirs.fileno()))],
                socket.MSG_DONTWAIT,
            )
        except OSError as e:
            raise Unanswered(f"the request could not be sent ({e.strerror or e})") from None
        finally:
            anchor.detach()
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours.detach()


def await_ready(
    channel: int,
    anchor_dir: int = -1,
    timeout: float = ANSWER_TIMEOUT,
    limit: float = SLOW_ANSWER_LIMIT,
) -> None:
    """The monitor's "ready" on CHANNEL, or Unanswered (nothing has run: the monitor
    forks the exec only after the stdio and "go", and a monitor that comes late finds
    the channel closed and exits). Past TIMEOUT seconds without it: Unanswered when the
    anchor (ANCHOR_DIR, its /proc directory; -1: unknown) is stopped, gone or unknown,
    else another TIMEOUT, up to LIMIT in all."""
    import select
    import time

    poller = select.poll()
    poller.register(channel, select.POLLIN)
    began = time.monotonic()
    while not poller.poll(int(timeout * 1000)):
        waited = time.monotonic() - began
        stat = _stat(anchor_dir) if anchor_dir >= 0 else None
        if stat is None or stat[1] in "Tt":
            why = "stopped" if stat is not None else "stopped?"
            raise Unanswered(f"the exec anchor did not answer within {timeout:g} s ({why})")
        if waited >= limit:
            raise Unanswered(f"the exec anchor did not answer within {waited:.0f} s (running)")
    try:
        answer = os.read(channel, 128).decode(errors="replace")
    except OSError as e:
        answer = f"read: {e.strerror}"
    if answer == "ready":
        return
    words = answer.split()
    if len(words) == 3 and words[0] == "error" and words[1].isdigit():
        raise Unanswered(f"the exec anchor could not fork ({os.strerror(int(words[1]))})")
    # Closed unanswered: killed with the request queued, or a build that drops this layout.
    raise Unanswered(f"the exec anchor closed the request unanswered ({answer or 'EOF'})")


def send_stdio(channel: int, stdio: tuple[int, int, int]) -> None:
    """The exec's stdin, stdout and stderr to the monitor that said "ready" (a monitor
    gone meanwhile has run nothing: Unanswered)."""
    conn = socket.socket(fileno=channel)
    try:
        conn.sendmsg(
            [b"stdio"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", *stdio))]
        )
    except OSError as e:
        raise Unanswered(f"the exec anchor's monitor went away ({e.strerror or e})") from None
    finally:
        conn.detach()


def stand_in(channel: int, binary: int, process, ready) -> None:
    """The exec as its caller sees it: says "go", learns the exec's pid (then `ready()`:
    the caller's execve-succeeded), then execs the anchor BINARY as `--stand-in`, which
    forwards every catchable signal to the exec and exits as it did. Never returns."""
    # Signals that come before the stand-in forwards them wait (the mask survives execve).
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    conn = socket.socket(fileno=channel)
    conn.send(b"go")
    answer = conn.recv(128).decode()
    if not answer.startswith("pid "):
        raise _failure(answer, process)
    from runtime import linux

    # While the channel is open the monitor keeps the exec unreaped: this pid is the exec's.
    pidfd = linux.pidfd_open(int(answer.split()[1]))
    _keep_only_cap_kill()
    ready()
    conn.detach()
    os.set_inheritable(channel, True)
    os.set_inheritable(pidfd, True)
    os.execve(binary, [BINARY_NAME, "--stand-in", str(channel), str(pidfd)], {})


def _keep_only_cap_kill() -> None:
    """The one capability the stand-in needs, kept across its execve (ambient): signalling
    the exec, whose uid is not its own (host root's, unmapped in a user namespace, is not
    root there, so execve would drop every capability)."""
    from runtime.security import capabilities
    from runtime.spec import Capabilities

    kill = ["CAP_KILL"]
    capabilities.drop(
        Capabilities(bounding=kill, effective=kill, inheritable=kill, permitted=kill, ambient=kill),
        capabilities.last_cap(),
    )
    from runtime import linux

    linux.set_no_new_privs()  # ambient capabilities pass execve all the same


def _failure(answer: str, process) -> BaseException:
    words = answer.split()
    if len(words) != 3 or words[0] != "error":
        return errors.FailedPrecondition(f"exec anchor: no answer ({answer or 'closed'})")
    code, stage = int(words[1]), words[2]
    name = process.args[0]
    if stage == "exec" and code in (2, 13) and "/" not in name:
        return errors.NotFound(f"{name!r}: executable file not found in $PATH")
    if stage == "exec" and code == 2:
        return errors.NotFound(f"{name}: no such executable in the container")
    where = process.cwd if stage == "cwd" else name
    return OSError(code, f"exec anchor: {stage}: {os.strerror(code)}", where)
