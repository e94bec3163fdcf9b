"""The `zviz run` fast path: a pre-imported server forks the container's supervisor.

A `zviz run` spends most of its time starting Python and importing the runtime
(spec, security, cgroups: ~50 ms) before it does any container work. The fork server
imports all of that once; a `zviz run` client then only connects, hands over its cwd,
argv and stdio (SCM_RIGHTS), and waits. The installed client is compiled
(runtime/forkserver_client.c, built by build_client: no interpreter start at all); the
Python one (try_run) is its fallback and the entry without a C compiler:

    zviz run (client) ──unix socket──▶ fork server ──fork──▶ worker = cmd_run()
         ◀── "pid N" (client forwards its signals to PID 1 itself)
         ◀── "exit CODE" (the client exits with it)

The worker is exactly `zviz run` (runtime/commands.cmd_run) with the client's cwd, argv
and stdio: it creates the container, is PID 1's subreaper and reaper, records the
exit status and deletes the container.

The same server serves the shim binary's `start` and `delete` (SHIM_ENTRY: containerd
runs each once per container and waits for it): the installed containerd-shim-zviz-v2
is this client compiled for that entry, and its worker is exactly shim.main's `start`
or `delete` with the client's cwd, argv, stdio and environment (docs/shim.md).

Eligibility (else the client runs everything itself, the slow way): the client is
root, in the server's mount, pid, user, network and cgroup namespaces and in the same
cgroup (a relative cgroupsPath resolves the same), has the server's inherited
attributes (capability sets, no_new_privs, seccomp, umask, rlimits, oom_score_adj,
nice, LSM label: INHERITED_STATUS_FIELDS, INHERITED_FILES, INHERITED_STAT_FIELDS; a
worker has the server's, and a confined client must never get an unconfined worker),
and asks for plain `run` (no
--detach, terminal, console socket, pid file or preserved fds), from the same install
(interpreter, runtime package directory and release: install_identity()), so a server
never runs another checkout's code. The socket lives in /run/zviz (0700) with mode
0600; the server also checks SO_PEERCRED.

The server exits after IDLE_S (20 s) without clients, removing its socket, and at the
first client after any of its loaded runtime sources changed on disk (that client
starts a fresh one). Set
ZVIZ_NO_FORKSERVER=1 to never use (or start) it; a run with ZVIZ_SECCOMP_CACHE or
ZVIZ_DENIAL_RECORDS set does not use it either (UNSERVED_ENV): the worker has the
server's environment, not the client's.
"""

import _signal
import _socket
import errno
import os
import struct
import sys

from runtime import procstat
from runtime.private_dir import makedirs_private

# --- the protocol ------------------------------------------------------------------------
#
# Everything the two clients (try_run here, runtime/forkserver_client.c) and the server
# must agree on is declared once, below; the C client gets it from the header c_header()
# generates when it is compiled (compile_client), so it holds no copy that could drift.
# tests/test_forkserver_parity.py drives both clients against one recording server.

# One server per machine, whatever --root a run names (the worker uses the run's own
# --root): /run/zviz is root's 0700 directory.
SERVER_DIR = "/run/zviz"
# Hashed (socket_path) from: the install's fields, the namespace inode numbers in this
# order (decimal), /proc/self/cgroup's text, then the inherited attributes below (the
# status lines, the files, the stat fields, each in its list's order), NUL-joined.
SOCKET_NAME = ".zviz-run-%08x.sock"
COMPARED_NAMESPACES = ("mnt", "pid", "user", "net", "cgroup")
# Everything else a process inherits that a worker would take from the server instead of
# its client. The server compares each with the peer's for every request (a difference:
# "fallback", and the client is its own supervisor, which is exactly right), and each is
# in the socket name, so a client that differs reaches (and starts) a server of its own.
# Read from /proc/<pid>/ (the peer's, or "self"); a missing line or unreadable file is
# empty. The whole line of /proc/<pid>/status ("Umask:\t0022"):
INHERITED_STATUS_FIELDS = (
    # Capabilities: a client that dropped some (from its bounding set too) must not have
    # its container made by a worker that holds them.
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    # no_new_privs: a worker without it could gain privileges the client gave up.
    "NoNewPrivs",
    # A seccomp filter the client runs under (the mode and how many filters are stacked).
    "Seccomp",
    "Seccomp_filters",
    # The files the runtime makes for itself follow it (--log, --pid-file, the shim's
    # log); the container does not (runtime/spawn/init.py workload_umask).
    "Umask",
)
# The whole text of these files:
INHERITED_FILES = (
    # Every rlimit: a workload without process.rlimits inherits them (containerd's
    # LimitNOFILE, a caller's `ulimit`).
    "limits",
    # A workload without process.oomScoreAdj inherits it.
    "oom_score_adj",
    # The LSM label (AppArmor, SELinux): a confined client's worker must be confined alike.
    # No LSM: EINVAL, empty.
    "attr/current",
)
# Fields of /proc/<pid>/stat, numbered as proc(5) does (runtime/procstat.py): the nice
# value, which a workload inherits.
INHERITED_STAT_FIELDS = (procstat.NICE,)
# getsockopt(SOL_SOCKET, SO_PEERPIDFD) (Linux 6.5): a pidfd of the connecting process,
# which the server checks is still alive after it read /proc/<pid>/, so that what it read
# was the peer's and not a process that took the pid after the peer exited. Older kernels:
# ENOPROTOOPT, and that race stays (the peer would have to exit between its request and
# the server's reads, and another root process of the same namespaces take its pid).
SO_PEERPIDFD = 77
# The entries a client may be. Each compiled client is built for one (compile_client's
# ENTRY), each Python entry passes its own to try_run; the request names it and the
# worker becomes that entry: `zviz` (runtime/cli.py main) or the shim binary
# containerd-shim-zviz-v2 (shim/main.py main), whose `start` and `delete` containerd runs
# once per container and waits for.
ZVIZ_ENTRY = "zviz"
SHIM_ENTRY = "shim"
ENTRIES = (ZVIZ_ENTRY, SHIM_ENTRY)
# The commands a `zviz` worker serves: both wait for a process and pass its exit code on.
SERVED_COMMANDS = ("run", "exec")
# The shim serves `start` and `delete` (containerd runs and waits for both once per
# container: `delete` whenever its connection to a daemon closes, also after a normal
# Delete), with no flag but its own string flags (shim.main's STRING_FLAGS, Go syntax:
# -x or --x, the value next or after "=") and these plain booleans. Anything else (-v,
# -info, the daemon itself, an unknown flag) is the Python entry's, silently: containerd
# reads start's and delete's output (stderr included) as their reply.
SHIM_SERVED_ACTIONS = ("start", "delete")
SHIM_SERVED_BOOLS = ("debug",)
# What pip's script is renamed to where the compiled client takes its name (`make install`):
# zviz-python, containerd-shim-zviz-v2-python (python_entry).
PYTHON_ENTRY_SUFFIX = "-python"
# A run with any of these set goes the slow way: the worker has the server's environment,
# not the client's, and a server started by such a run would keep the value for every
# later run (ZVIZ_SECCOMP_CACHE: the seccomp cache directory).
UNSERVED_ENV = ("ZVIZ_NO_FORKSERVER", "ZVIZ_SECCOMP_CACHE", "ZVIZ_DENIAL_RECORDS")
# After the command, any of these (also as --flag=value) means the slow way.
INELIGIBLE_FLAGS = (
    "-d",
    "--detach",
    "-t",
    "--tty",
    "--console-socket",
    "--pid-file",
    "--preserve-fds",
    "--help",
    "-h",
)
# runtime/commands.py's global options that take a separate value (`--root /r`).
GLOBAL_FLAGS_WITH_VALUE = ("--root", "--log", "--log-format", "--criu", "--rootless", "--profile")
# A global flag: the clients say on stderr why a run or exec takes the slow path.
DEBUG_FLAG = "--debug"
# The request, one datagram, NUL-separated: the install's three fields, the entry, cwd,
# the argument count (argv[0] included, decimal), argv[0], the arguments, then the
# client's environment (KEY=VALUE each), with its stdin, stdout and stderr (SCM_RIGHTS).
# A shim worker takes that environment as its own (containerd passes TTRPC_ADDRESS,
# GRPC_ADDRESS, NAMESPACE, ... and the daemon `start` launches inherits them); a `zviz`
# worker keeps the server's, as before (UNSERVED_ENV).
ENTRIES_TAKING_ENV = (SHIM_ENTRY,)
REQUEST_FDS = 3
MAX_REQUEST = 65536
# The replies, each one datagram: "pid N" (PID 1, the client forwards its signals to
# it), "exit CODE" (the client exits with it), "fallback REASON" (refused: the client
# runs the slow path) and "stale" (the server's code changed on disk and it stopped:
# the slow path, which starts a fresh server).
REPLY_PID = "pid"
REPLY_EXIT = "exit"
REPLY_FALLBACK = "fallback"
REPLY_STALE = "stale"
# What the clients print with --debug ("zviz: slow path: ..."); the same text from both.
SLOW_PATH = "zviz: slow path: "
SAY_NOT_ELIGIBLE = "not eligible (environment, user or flags)"
SAY_NO_SERVER = "no fork server answers"
SAY_REFUSED = "the fork server refused: "
SAY_STALE = "the fork server's code changed on disk"
SAY_SEND_FAILED = "cannot send the request: "
SAY_RECEIVE_FAILED = "no reply from the fork server: "
# The signals a `zviz` client forwards to PID 1 once it knows its pid. A shim client has
# no PID 1 and forwards nothing: a signal acts on it as on the Python entry's start or
# delete.
FORWARDED_SIGNALS = (
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGTERM",
    "SIGUSR1",
    "SIGUSR2",
    "SIGWINCH",
    "SIGCONT",
)

IDLE_S = 20.0
_TITLE_ROOM = " " * 2048


# --- client (runs before argparse/json are imported) ---------------------------------------


def _ineligible_client() -> bool:
    return any(os.environ.get(name) for name in UNSERVED_ENV) or os.geteuid() != 0


def _shim_eligibility(argv: list[str]) -> str | None:
    """None for a shim `start` or `delete` this fast path may serve, "" for another shim
    command line, SAY_NOT_ELIGIBLE for one it may not (never said: see SHIM_SERVED_ACTIONS)."""
    from shim.main import STRING_FLAGS

    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        name, equals, _ = argv[i].lstrip("-").partition("=")
        if name in STRING_FLAGS:
            i += 1 if equals else 2
        elif name in SHIM_SERVED_BOOLS and not equals:
            i += 1
        else:
            return ""
    if len(argv) != i + 1 or argv[i] not in SHIM_SERVED_ACTIONS:
        return ""
    return SAY_NOT_ELIGIBLE if _ineligible_client() else None


def _eligibility(argv: list[str], entry: str = ZVIZ_ENTRY) -> tuple[str | None, bool]:
    """(why not, --debug given): why is None for a command line this fast path may serve,
    "" for another command line (nothing to say), else SAY_NOT_ELIGIBLE.

    A hand parse of the global flags: argparse and json would cost the ~10 ms this
    path exists to save.
    """
    if entry == SHIM_ENTRY:
        return _shim_eligibility(argv), False
    debug = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in SERVED_COMMANDS:
            if _ineligible_client():
                return SAY_NOT_ELIGIBLE, debug
            rest = argv[i + 1 :]
            # A cluster of short flags (-dt) may hide -d or -t: the slow path parses it.
            # (exec: the command's own flags count too; the slow path is only slower.)
            if any(
                a.split("=", 1)[0] in INELIGIBLE_FLAGS
                or (len(a) > 2 and a.startswith("-") and not a.startswith("--"))
                for a in rest
            ):
                return SAY_NOT_ELIGIBLE, debug
            return None, debug
        if arg in GLOBAL_FLAGS_WITH_VALUE and i + 1 < len(argv):
            i += 2
            continue
        if not arg.startswith("-"):
            return "", debug  # another command
        debug = debug or arg == DEBUG_FLAG
        i += 1
    return "", debug


def is_served(argv: list[str], entry: str = ZVIZ_ENTRY) -> bool:
    """True for a `zviz run` or `exec`, or a shim `start` or `delete`, this fast path may
    serve."""
    return _eligibility(argv, entry)[0] is None


def _slow_path(debug: bool, why: str) -> None:
    """Say (with --debug) why this run goes the slow way: a protocol drift between a client
    and the server shows as a reason here, never only as a slower run."""
    if debug and why:
        sys.stderr.write(SLOW_PATH + why + "\n")
        sys.stderr.flush()


def try_run(argv: list[str], entry: str = ZVIZ_ENTRY) -> int | None:
    """`zviz run` or `exec` (or, for SHIM_ENTRY, the shim's `start` or `delete`) through the
    fork server; None when the caller must do it."""
    why, debug = _eligibility(argv, entry)
    if why is not None:
        _slow_path(debug, why)
        return None
    install = install_identity()
    path = socket_path((install, process_identity("self")))
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        _slow_path(debug, SAY_NO_SERVER)
        _start_server()
        return None
    try:
        try:
            request = (entry, os.getcwd(), [sys.argv[0], *argv], _environment())
            send_request(sock, install, request, (0, 1, 2))
        except OSError as error:
            _slow_path(debug, SAY_SEND_FAILED + os.strerror(error.errno or 0))
            return None
        return _follow(sock, debug, entry)
    finally:
        sock.close()


def _follow(sock, debug: bool, entry: str = ZVIZ_ENTRY) -> int | None:
    pid = 0
    # Signals that arrive before "pid N" (the container may already be running while
    # that message is in flight) are sent once the pid is known, never dropped.
    pending: list[int] = []

    def forward(sig, _frame):
        if not pid:
            pending.append(sig)
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for name in FORWARDED_SIGNALS if entry == ZVIZ_ENTRY else ():
        _signal.signal(getattr(_signal, name), forward)
    while True:
        try:
            message = sock.recv(4096)
        except OSError as error:
            if pid:
                message = b""  # the run began: it is not ours to repeat
            else:
                _slow_path(debug, SAY_RECEIVE_FAILED + os.strerror(error.errno or 0))
                return None
        if not message:
            sys.stderr.write("zviz: the run supervisor went away\n")
            return 1
        kind, _, value = message.decode(errors="replace").partition(" ")
        if kind == REPLY_PID:
            pid = int(value)
            while pending:
                forward(pending.pop(0), None)
        elif kind == REPLY_EXIT:
            return int(value)
        elif kind == REPLY_FALLBACK:
            _slow_path(debug, SAY_REFUSED + value)
            return None
        elif kind == REPLY_STALE:
            _slow_path(debug, SAY_STALE)
            _start_server()
            return None


def _start_server() -> None:
    """Start a server in the background (this run still goes the slow way)."""
    try:
        makedirs_private(SERVER_DIR)
        child = os.fork()
    except OSError:
        return
    if child == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                os.closerange(3, 1 << 16)
                # `-m` imports from the working directory first: start in the directory
                # holding this install's package, never a client's (another checkout).
                os.chdir(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
                # The blank argument reserves room for each worker's cmdline (see _retitle).
                os.execv(sys.executable, [sys.executable, "-m", "runtime.forkserver", _TITLE_ROOM])
        finally:
            os._exit(0)
    os.waitpid(child, 0)


# --- server ------------------------------------------------------------------------------


def install_identity() -> tuple[str, str, str]:
    """What decides the code a server runs: the interpreter, the runtime package and the release.

    A server started from one checkout must never run another checkout's `zviz run`
    (a CI clone under /tmp beside the main checkout): their socket names differ, and the server
    also compares these itself (the name is only a 32-bit hash). The compiled client
    (runtime/forkserver_client.c) has them built in.
    """
    from runtime import VERSION

    package = os.path.dirname(os.path.realpath(__file__))
    return (os.path.realpath(sys.executable), package, VERSION)


def _environment() -> list[bytes]:
    """The process's environment as the C client reads `environ`: KEY=VALUE, in order."""
    return [key + b"=" + value for key, value in os.environb.items()]


def send_request(sock, install: tuple, request: tuple, fds) -> None:
    """The one request a client sends: who it is, which entry, where it runs, what it
    runs, its environment and its stdio. REQUEST: (entry, cwd, argv, environment).

    NUL-separated as the protocol section says (the C client builds the same bytes:
    tests/test_forkserver_parity.py).
    """
    entry, cwd, argv, environment = request
    fields = [part.encode() for part in (*install, entry, cwd, str(len(argv)), *argv)]
    payload = b"\0".join(fields + list(environment))
    if len(payload) >= MAX_REQUEST:  # the server would read it cut short
        raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
    sock.sendmsg([payload], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("3i", *fds))])


def socket_path(identity: tuple) -> str:
    """One server per (install, namespaces, cgroups, inherited attributes) identity: a
    client only ever reaches a server it is eligible for, running its own code, and a
    server in another cgroup, of another install or with other inherited attributes never
    shadows its own.

    The name hashes (CRC-32) the NUL-joined install fields, namespace inode numbers
    (decimal), /proc/<pid>/cgroup text and inherited attributes (process_identity):
    simple enough for the C client to match.
    """
    import zlib

    install, (namespace_ids, cgroup, inherited) = identity
    texts = (*install, *(str(i) for i in namespace_ids), cgroup)
    key = b"\0".join((*(text.encode() for text in texts), *inherited))
    return os.path.join(SERVER_DIR, SOCKET_NAME % zlib.crc32(key))


def _source_stamps(paths) -> dict[str, tuple[int, int]]:
    """(mtime, size) of each source file: a changed one means the server's code is stale."""
    stamps = {}
    for path in paths:
        try:
            st = os.stat(path)
            stamps[path] = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamps[path] = (-1, -1)
    return stamps


def _loaded_sources(packages: tuple[str, ...]) -> list[str]:
    files = (getattr(module, "__file__", None) for module in list(sys.modules.values()))
    return sorted(path for path in files if path and os.path.realpath(path).startswith(packages))


_scripts_dir: str | None = None


def scripts_dir() -> str:
    """This install's bin directory (the venv's), where pip put zviz and the shim.

    sysconfig takes ~20 ms to answer the first time: the server asks before any client,
    so that a worker (a fork) has the answer already."""
    global _scripts_dir
    if _scripts_dir is None:
        import sysconfig

        _scripts_dir = sysconfig.get_path("scripts")
    return _scripts_dir


def process_identity(pid: str) -> tuple:
    """(namespace inode numbers, cgroup text, inherited attributes) of /proc/PID: what the
    server compares with its own and socket_path hashes."""
    ids = tuple(os.stat(f"/proc/{pid}/ns/{name}").st_ino for name in COMPARED_NAMESPACES)
    with open(f"/proc/{pid}/cgroup") as f:
        cgroup = f.read()
    return ids, cgroup, _inherited(pid)


def _inherited(pid: str) -> tuple[bytes, ...]:
    """The inherited attributes (INHERITED_STATUS_FIELDS, INHERITED_FILES,
    INHERITED_STAT_FIELDS) of /proc/PID as bytes, in that order."""
    with open(f"/proc/{pid}/status", "rb") as f:
        lines = {line.split(b":", 1)[0]: line for line in f.read().split(b"\n")}
    values = [lines.get(name.encode(), b"") for name in INHERITED_STATUS_FIELDS]
    for name in INHERITED_FILES:
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                values.append(f.read())
        except OSError:
            values.append(b"")
    fields = procstat.read(pid)
    values += [fields[number].encode() for number in INHERITED_STAT_FIELDS]
    return tuple(values)


def _inherited_names() -> tuple[str, ...]:
    """INHERITED's names in _inherited's order, for the reason a client is refused."""
    stat = tuple(f"stat field {number}" for number in INHERITED_STAT_FIELDS)
    return (*INHERITED_STATUS_FIELDS, *INHERITED_FILES, *stat)


def _peer_refusal(peer_pid: int, pidfd: int | None, mine: tuple) -> str:
    """Why the peer may not be served ("" when it may): its namespaces, cgroup and
    inherited attributes against the server's (MINE, read now)."""
    try:
        ids, cgroup, inherited = process_identity(str(peer_pid))
        if pidfd is not None:
            _signal.pidfd_send_signal(pidfd, 0)  # what we read was the peer's (SO_PEERPIDFD)
    except OSError:
        return "client gone"
    if (ids, cgroup) != mine[:2]:
        return "other namespaces"
    differ = [
        name for name, a, b in zip(_inherited_names(), inherited, mine[2], strict=True) if a != b
    ]
    return "other inherited attributes: " + ", ".join(differ) if differ else ""


def _peer_pidfd(conn) -> int | None:
    try:
        return conn.getsockopt(_socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        return None  # before Linux 6.5: see SO_PEERPIDFD


# Everything a run imports, also lazily (found by diffing sys.modules around a run).
# runtime.container brings every stage of runtime/spawn/ (tests/test_spawn_stages.py).
PRELOADED = (
    # PID 1 starts the exec anchor through subprocess (a vfork) only when its parent
    # has it imported (runtime/exec_anchor.py may_vfork).
    "subprocess",
    "runtime.cgroups",
    "runtime.cgroups.v1",
    "runtime.cgroups.v2",
    "runtime.container",
    "runtime.spec",
    "runtime.rootfs",
    "runtime.console",
    # The shim's `start` and `delete` (SHIM_ENTRY); shim.main re-reads the environment a
    # served one takes from its client. A delete after a dead daemon also unmounts the
    # rootfs (shim.mounts); its force-delete goes through shim.engine, which a worker
    # imports itself (~30 ms: asyncio): preloaded, it would make every fork ~0.4 ms
    # slower and the server 7 MiB bigger for a delete that follows only a daemon's death.
    "shim.main",
    "shim.manager",
    "shim.cleanup",
    "shim.mounts",
    "resource",
    "select",
    "shutil",
    "ipaddress",
    "locale",
    "fnmatch",
)


def serve(directory: str = SERVER_DIR) -> None:
    # Import everything a run needs once, before any client arrives.
    import importlib

    from runtime import cli, commands

    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    commands.prebuild_parser()
    scripts_dir()
    import socket  # the server may pay for the full module; the client must not

    from runtime.security.profiles import warm_cache

    warm_cache()
    makedirs_private(directory)
    os.chdir("/")  # hold no client's directory; workers chdir to theirs
    mine = process_identity("self")
    install = install_identity()
    path = os.path.join(directory, os.path.basename(socket_path((install, mine))))
    # Both packages whose code a worker runs: runtime (zviz) and shim (`start`, `delete`).
    runtime_package = os.path.dirname(os.path.realpath(__file__))
    packages = tuple(
        os.path.join(os.path.dirname(runtime_package), name) + os.sep
        for name in ("runtime", "shim")
    )
    stamps = _source_stamps(_loaded_sources(packages))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
        return  # another server already answers
    except OSError:
        pass
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    bound = os.stat(path).st_ino
    listener.listen(64)
    listener.settimeout(IDLE_S)
    workers: set[int] = set()

    def reap(_sig=None, _frame=None):
        while workers:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                workers.clear()
                return
            if pid == 0:
                return
            workers.discard(pid)

    _signal.signal(_signal.SIGCHLD, reap)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                reap()
                if not workers:
                    return
                continue
            try:
                # Code edited under a running server (a pull, a checkout): hand this
                # client back and stop, so that no run executes stale modules.
                if _source_stamps(stamps) != stamps:
                    _withdraw(listener, path, bound)
                    # Read the request first: unread data would reset the connection.
                    for fd in _receive(conn)[1]:
                        os.close(fd)
                    conn.send(REPLY_STALE.encode())
                    return
                # Renice, choom or prlimit of the server itself: its socket name no longer
                # says what its workers inherit. Hand back and stop (the next client starts
                # a server of its own).
                if process_identity("self") != mine:
                    _withdraw(listener, path, bound)
                    for fd in _receive(conn)[1]:
                        os.close(fd)
                    conn.send(f"{REPLY_FALLBACK} the server's own attributes changed".encode())
                    return
                _serve_one(conn, (install, mine), workers, cli, listener)
            except OSError:
                # This client hung up or stalled (EPIPE, a 5 s timeout) before its
                # answer: its loss alone, the server goes on serving the others.
                pass
            finally:
                conn.close()
    finally:
        _withdraw(listener, path, bound)


def _withdraw(listener, path: str, bound: int) -> None:
    """Stop listening; remove the socket unless a newer server has bound the name since."""
    listener.close()
    try:
        if os.stat(path).st_ino == bound:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _receive(conn) -> tuple[bytes, list[int]]:
    """A client's request and the descriptors it passed (ours to close)."""
    data, ancillary, _, _ = conn.recvmsg(MAX_REQUEST, _socket.CMSG_SPACE(REQUEST_FDS * 4))
    fds = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
    return data, fds


def _parse_request(fields: list[bytes]) -> tuple | None:
    """(entry, cwd, argv, environment) from the request's fields after the install's
    three; None when they do not follow the protocol."""
    if len(fields) < 4 or not fields[2].isdigit():
        return None
    entry, cwd, count = (field.decode() for field in fields[:3])
    argc = int(count)
    if entry not in ENTRIES or argc < 1 or len(fields) < 3 + argc:
        return None
    argv = [arg.decode() for arg in fields[3 : 3 + argc]]
    environment = dict(line.split(b"=", 1) for line in fields[3 + argc :] if b"=" in line)
    return entry, cwd, argv, environment


def _serve_one(conn, identity: tuple, workers: set[int], cli, listener) -> None:
    conn.settimeout(5)
    creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    peer_pid, peer_uid, _ = struct.unpack("3i", creds)
    pidfd = _peer_pidfd(conn)
    try:
        _serve_checked(conn, (peer_pid, peer_uid, pidfd), identity, workers, cli, listener)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _serve_checked(conn, peer: tuple, identity: tuple, workers: set[int], cli, listener) -> None:
    peer_pid, peer_uid, pidfd = peer
    data, fds = _receive(conn)
    install, mine = identity
    fields = data.split(b"\0")
    request = _parse_request(fields[3:])
    # The first failed check is the reason the client prints with --debug.
    if peer_uid != 0:
        refused = "client not root"
    elif len(fds) != REQUEST_FDS:
        refused = f"{len(fds)} descriptors, not {REQUEST_FDS}"
    elif fields[:3] != [field.encode() for field in install]:
        refused = "another install"
    elif request is None:
        refused = "malformed request"
    else:
        refused = _peer_refusal(peer_pid, pidfd, mine)
    if refused:
        for fd in fds:
            os.close(fd)
        conn.send(f"{REPLY_FALLBACK} {refused}".encode())
        return
    worker = os.fork()
    if worker == 0:
        code = 1
        try:
            listener.close()  # a long run must not keep the server's socket alive
            code = _work(conn, request, fds, cli)
        finally:
            os._exit(code)
    workers.add(worker)
    for fd in fds:
        os.close(fd)


def _retitle(argv: list[str]) -> None:
    """Make /proc/<worker>/cmdline the client's `zviz ... run ... ID`.

    ps, leak checks and tests find a container's supervisor (and its broker, forked
    from it) by that command line, as with a plain `zviz run`. The server's argv area
    (with _TITLE_ROOM reserved) is overwritten in place; longer command lines are cut.
    """
    import ctypes

    fields = procstat.read("self")
    arg_start, arg_end = int(fields[procstat.ARG_START]), int(fields[procstat.ARG_END])
    room = arg_end - arg_start
    if room <= 1:
        return
    title = b"\0".join(a.encode() for a in argv)[: room - 1]
    ctypes.memmove(arg_start, title, len(title))
    ctypes.memset(arg_start + len(title), 0, room - len(title))


def _work(conn, request: tuple, fds: list[int], cli) -> int:
    """In the worker: become the client's `zviz run` (or shim `start` or `delete`), report
    the pid and the exit code."""
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    os.setsid()
    entry, cwd, argv, environment = request
    _retitle(argv)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the client's stdio, owned by the client
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    os.chdir(cwd)
    conn.settimeout(None)

    def on_pid(pid: int) -> None:
        try:
            conn.send(f"{REPLY_PID} {pid}".encode())
        except OSError:
            pass

    if entry in ENTRIES_TAKING_ENV:
        os.environb.clear()
        os.environb.update(environment)
    if entry == SHIM_ENTRY:
        # Preloaded by the server; shim.main re-reads what shim.config took from the
        # server's environment at import (ZVIZ_SHIM_ROOT).
        from shim.main import main as shim_main

        sys.argv = argv  # where the daemon's Python entry is found (shim.manager)
        code = shim_main(argv[1:], served=True)
    else:
        code = cli.main(argv[1:], on_pid=on_pid)
    sys.stdout.flush()
    sys.stderr.flush()
    # The client's stdio goes back before the exit report: a reader of the client's output
    # to EOF (containerd reads a shim start's and delete's so) must not wait for this fork
    # of the server to tear its memory down (the kernel closes files after that).
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        conn.send(f"{REPLY_EXIT} {code}".encode())
    except OSError:
        pass
    return 0


# What each entry's compiled client is called in a bin directory (pip's script of that name
# moves aside to NAME + PYTHON_ENTRY_SUFFIX).
ENTRY_NAMES = {ZVIZ_ENTRY: "zviz", SHIM_ENTRY: "containerd-shim-zviz-v2"}


def python_entry(bin_dir: str, entry: str) -> str:
    """pip's script for ENTRY in BIN_DIR: moved aside where `make install` put the
    compiled client in its place."""
    name = os.path.join(bin_dir, ENTRY_NAMES[entry])
    aside = name + PYTHON_ENTRY_SUFFIX
    return aside if os.path.exists(aside) else name


def build_client(bin_dir: str) -> str:
    """Make BIN_DIR/zviz and BIN_DIR/containerd-shim-zviz-v2 the compiled clients
    (runtime/forkserver_client.c); `make install` runs it.

    pip's scripts move to zviz-python and containerd-shim-zviz-v2-python, which the
    clients exec for everything they do not serve themselves. Returns what was done;
    without a C compiler the scripts stay where they are (correct, ~10 ms slower).
    """
    import shutil

    bin_dir = os.path.abspath(bin_dir)
    done = []
    for entry, name in ENTRY_NAMES.items():
        client = os.path.join(bin_dir, name)
        script = client + PYTHON_ENTRY_SUFFIX
        with open(client, "rb") as f:
            if f.read(2) == b"#!":  # pip's script (again, after a reinstall): keep it aside
                shutil.copy2(client, script)
        if not os.path.exists(script):
            return f"{script} missing: reinstall the package (pip install -e .)"
        if compile_client(client, script, entry=entry) is None:
            return "no C compiler: zviz and the shim stay Python scripts"
        done.append(f"{client}: compiled client (falls back to {script})")
    return "\n".join(done)


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def c_header(python: str, script: str, server_dir: str = SERVER_DIR, entry=ZVIZ_ENTRY) -> str:
    """The protocol (above) and this install's identity as the C client's header.

    PYTHON SCRIPT is the slow path the client execs (pip's entry); ENTRY the one the
    client is; SERVER_DIR differs only for a test's private client.
    """
    from shim.main import STRING_FLAGS

    executable, package, version = install_identity()

    def strings(values) -> str:
        return ", ".join(_c_string(value) for value in values)

    defines = {
        "ZVIZ_PYTHON": _c_string(python),
        "ZVIZ_SCRIPT": _c_string(script),
        "ZVIZ_EXECUTABLE": _c_string(executable),
        "ZVIZ_PACKAGE": _c_string(package),
        "ZVIZ_VERSION": _c_string(version),
        "ZVIZ_SERVER_DIR": _c_string(server_dir),
        "ZVIZ_SOCKET_NAME": _c_string(SOCKET_NAME),
        "ZVIZ_COMPARED_NAMESPACES": strings(COMPARED_NAMESPACES),
        "ZVIZ_INHERITED_STATUS_FIELDS": strings(INHERITED_STATUS_FIELDS),
        "ZVIZ_INHERITED_FILES": strings(INHERITED_FILES),
        "ZVIZ_INHERITED_STAT_FIELDS": ", ".join(str(n) for n in INHERITED_STAT_FIELDS),
        "ZVIZ_ENTRY": _c_string(entry),
        "ZVIZ_SHIM_ENTRY": _c_string(SHIM_ENTRY),
        "ZVIZ_SERVED_COMMANDS": strings(SERVED_COMMANDS),
        "ZVIZ_SHIM_STRING_FLAGS": strings(STRING_FLAGS),
        "ZVIZ_SHIM_SERVED_BOOLS": strings(SHIM_SERVED_BOOLS),
        "ZVIZ_SHIM_SERVED_ACTIONS": strings(SHIM_SERVED_ACTIONS),
        "ZVIZ_UNSERVED_ENV": strings(UNSERVED_ENV),
        "ZVIZ_INELIGIBLE_FLAGS": strings(INELIGIBLE_FLAGS),
        "ZVIZ_GLOBAL_FLAGS_WITH_VALUE": strings(GLOBAL_FLAGS_WITH_VALUE),
        "ZVIZ_DEBUG_FLAG": _c_string(DEBUG_FLAG),
        "ZVIZ_REQUEST_FDS": str(REQUEST_FDS),
        "ZVIZ_MAX_REQUEST": str(MAX_REQUEST),
        "ZVIZ_REPLY_PID": _c_string(REPLY_PID),
        "ZVIZ_REPLY_EXIT": _c_string(REPLY_EXIT),
        "ZVIZ_REPLY_FALLBACK": _c_string(REPLY_FALLBACK),
        "ZVIZ_REPLY_STALE": _c_string(REPLY_STALE),
        "ZVIZ_SLOW_PATH": _c_string(SLOW_PATH),
        "ZVIZ_SAY_NOT_ELIGIBLE": _c_string(SAY_NOT_ELIGIBLE),
        "ZVIZ_SAY_NO_SERVER": _c_string(SAY_NO_SERVER),
        "ZVIZ_SAY_REFUSED": _c_string(SAY_REFUSED),
        "ZVIZ_SAY_STALE": _c_string(SAY_STALE),
        "ZVIZ_SAY_SEND_FAILED": _c_string(SAY_SEND_FAILED),
        "ZVIZ_SAY_RECEIVE_FAILED": _c_string(SAY_RECEIVE_FAILED),
        "ZVIZ_FORWARDED_SIGNALS": ", ".join(FORWARDED_SIGNALS),
    }
    lines = ["/* Generated by runtime/forkserver.py (c_header) when the client is compiled. */"]
    lines += [f"#define {name} {value}" for name, value in defines.items()]
    return "\n".join(lines) + "\n"


def compile_client(
    output: str, script: str, server_dir: str = SERVER_DIR, entry: str = ZVIZ_ENTRY
) -> str | None:
    """Compile ENTRY's client into OUTPUT for this install, falling back to SCRIPT (pip's entry).

    The install's paths are compiled in (the client starts no interpreter to learn
    them), so the client is built where the install is: by `make install` in a
    checkout, by `zviz node install` for an installed wheel. None without a C compiler.
    """
    import filecmp
    import shutil
    import subprocess
    import tempfile

    with open(script, "rb") as f:
        interpreter = f.readline()[2:].decode().strip()  # pip's "#!/.../python3"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = os.path.join(os.path.dirname(os.path.realpath(__file__)), "forkserver_client.c")
    built = output + ".new"
    with tempfile.TemporaryDirectory(prefix="zviz-client-") as generated:
        with open(os.path.join(generated, "forkserver_protocol.h"), "w") as f:
            f.write(c_header(interpreter, script, server_dir, entry))
        subprocess.run(
            [compiler, "-O2", "-Wall", "-Werror", "-I", generated, "-o", built, source],
            check=True,
        )
    if os.path.exists(output) and filecmp.cmp(built, output, shallow=False):
        os.unlink(built)  # the same client: a second install leaves it (and its mtime) alone
    else:
        os.replace(built, output)
    return output


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build-client"]:
        print(build_client(sys.argv[2]))
    else:
        serve()
