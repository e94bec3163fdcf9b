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

Eligibility (else the client runs everything itself, the slow way): the client is
root, in the server's mount, pid, user, network and cgroup namespaces and in the same
cgroup (a relative cgroupsPath resolves the same), and asks for plain `run` (no
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
# order (decimal), then /proc/self/cgroup's text, NUL-joined.
SOCKET_NAME = ".zviz-run-%08x.sock"
COMPARED_NAMESPACES = ("mnt", "pid", "user", "net", "cgroup")
# The commands a worker serves: both wait for a process and pass its exit code on.
SERVED_COMMANDS = ("run", "exec")
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
# The request, one datagram: the install's three fields, cwd, argv[0], the arguments,
# NUL-separated, with the client's stdin, stdout and stderr (SCM_RIGHTS).
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
# The signals a client forwards to PID 1 once it knows its pid.
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


def _eligibility(argv: list[str]) -> tuple[str | None, bool]:
    """(why not, --debug given): why is None for a run or exec this fast path may serve,
    "" for another command line (nothing to say), else SAY_NOT_ELIGIBLE.

    A hand parse of the global flags: argparse and json would cost the ~10 ms this
    path exists to save.
    """
    debug = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in SERVED_COMMANDS:
            if any(os.environ.get(name) for name in UNSERVED_ENV) or os.geteuid() != 0:
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


def is_served(argv: list[str]) -> bool:
    """True for a `zviz run` or `zviz exec` this fast path may serve."""
    return _eligibility(argv)[0] is None


def _slow_path(debug: bool, why: str) -> None:
    """Say (with --debug) why this run goes the slow way: a protocol drift between a client
    and the server shows as a reason here, never only as a slower run."""
    if debug and why:
        sys.stderr.write(SLOW_PATH + why + "\n")
        sys.stderr.flush()


def try_run(argv: list[str]) -> int | None:
    """`zviz run` or `exec` through the fork server; None when the caller must do it."""
    why, debug = _eligibility(argv)
    if why is not None:
        _slow_path(debug, why)
        return None
    install = install_identity()
    path = socket_path((install, _namespaces_and_cgroup("self")))
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
            send_request(sock, install, os.getcwd(), sys.argv[0], argv, (0, 1, 2))
        except OSError as error:
            _slow_path(debug, SAY_SEND_FAILED + os.strerror(error.errno or 0))
            return None
        return _follow(sock, debug)
    finally:
        sock.close()


def _follow(sock, debug: bool) -> int | None:
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

    for name in FORWARDED_SIGNALS:
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
        os.makedirs(SERVER_DIR, mode=0o700, exist_ok=True)
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


def send_request(sock, install: tuple, cwd: str, argv0: str, argv: list[str], fds) -> None:
    """The one request a client sends: who it is, where it runs, what it runs, its stdio.

    NUL-separated: the install's three fields, cwd, argv[0], the arguments (the C
    client builds the same bytes: tests/test_forkserver_parity.py).
    """
    payload = b"\0".join(part.encode() for part in (*install, cwd, argv0, *argv))
    if len(payload) >= MAX_REQUEST:  # the server would read it cut short
        raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
    sock.sendmsg([payload], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("3i", *fds))])


def socket_path(identity: tuple) -> str:
    """One server per (install, namespaces, cgroups) identity: a client only ever reaches
    a server it is eligible for, running its own code, and a server in another cgroup
    or of another install never shadows its own.

    The name hashes (CRC-32) the NUL-joined install fields, namespace inode numbers
    (decimal) and /proc/<pid>/cgroup text: simple enough for the C client to match.
    """
    import zlib

    install, (namespace_ids, cgroup) = identity
    key = "\0".join((*install, *(str(i) for i in namespace_ids), cgroup)).encode()
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


def _loaded_sources(package: str) -> list[str]:
    files = (getattr(module, "__file__", None) for module in list(sys.modules.values()))
    return sorted(path for path in files if path and os.path.realpath(path).startswith(package))


def _namespaces_and_cgroup(pid: str) -> tuple:
    ids = tuple(os.stat(f"/proc/{pid}/ns/{name}").st_ino for name in COMPARED_NAMESPACES)
    with open(f"/proc/{pid}/cgroup") as f:
        return ids, f.read()


# Everything a run imports, also lazily (found by diffing sys.modules around a run).
# runtime.container brings every stage of runtime/spawn/ (tests/test_spawn_stages.py).
PRELOADED = (
    "runtime.cgroups",
    "runtime.cgroups.v1",
    "runtime.cgroups.v2",
    "runtime.container",
    "runtime.spec",
    "runtime.rootfs",
    "runtime.console",
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
    import socket  # the server may pay for the full module; the client must not

    from runtime.security.profiles import warm_cache

    warm_cache()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chdir("/")  # hold no client's directory; workers chdir to theirs
    mine = _namespaces_and_cgroup("self")
    install = install_identity()
    path = os.path.join(directory, os.path.basename(socket_path((install, mine))))
    package = os.path.dirname(os.path.realpath(__file__)) + os.sep
    stamps = _source_stamps(_loaded_sources(package))
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


def _serve_one(conn, identity: tuple, workers: set[int], cli, listener) -> None:
    conn.settimeout(5)
    creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    peer_pid, peer_uid, _ = struct.unpack("3i", creds)
    data, fds = _receive(conn)
    install, mine = identity
    fields = data.split(b"\0", 3)
    their_install, request = fields[:3], fields[3] if len(fields) == 4 else b""
    # The first failed check is the reason the client prints with --debug.
    if peer_uid != 0:
        refused = "client not root"
    elif len(fds) != REQUEST_FDS:
        refused = f"{len(fds)} descriptors, not {REQUEST_FDS}"
    elif their_install != [field.encode() for field in install]:
        refused = "another install"
    else:
        try:
            refused = "" if _namespaces_and_cgroup(str(peer_pid)) == mine else "other namespaces"
        except OSError:
            refused = "client gone"
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

    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    arg_start, arg_end = int(fields[45]), int(fields[46])  # stat fields 48 and 49
    room = arg_end - arg_start
    if room <= 1:
        return
    title = b"\0".join(a.encode() for a in argv)[: room - 1]
    ctypes.memmove(arg_start, title, len(title))
    ctypes.memset(arg_start + len(title), 0, room - len(title))


def _work(conn, data: bytes, fds: list[int], cli) -> int:
    """In the worker: become the client's `zviz run`, report the pid and the exit code."""
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    os.setsid()
    cwd, argv0, *argv = (part.decode() for part in data.split(b"\0"))
    _retitle([argv0, *argv])
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

    code = cli.main(argv, on_pid=on_pid)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        conn.send(f"{REPLY_EXIT} {code}".encode())
    except OSError:
        pass
    return 0


def build_client(bin_dir: str) -> str:
    """Make BIN_DIR/zviz the compiled client (runtime/forkserver_client.c); `make install` runs it.

    pip's `zviz` script moves to zviz-python, which the client execs for everything
    it does not serve itself. Returns what was done; without a C compiler the script
    stays where it is (correct, ~9 ms slower per run).
    """
    import shutil

    bin_dir = os.path.abspath(bin_dir)
    entry = os.path.join(bin_dir, "zviz")
    script = os.path.join(bin_dir, "zviz-python")
    with open(entry, "rb") as f:
        if f.read(2) == b"#!":  # pip's script (again, after a reinstall): keep it aside
            shutil.copy2(entry, script)
    if not os.path.exists(script):
        return f"{script} missing: reinstall the package (pip install -e .)"
    if compile_client(entry, script) is None:
        return "no C compiler: zviz stays the Python script"
    return f"{entry}: compiled client (falls back to {script})"


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def c_header(python: str, script: str, server_dir: str = SERVER_DIR) -> str:
    """The protocol (above) and this install's identity as the C client's header.

    PYTHON SCRIPT is the slow path the client execs (pip's entry); SERVER_DIR differs
    only for a test's private client.
    """
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
        "ZVIZ_SERVED_COMMANDS": strings(SERVED_COMMANDS),
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


def compile_client(output: str, script: str, server_dir: str = SERVER_DIR) -> str | None:
    """Compile the client into OUTPUT for this install, falling back to SCRIPT (pip's entry).

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
            f.write(c_header(interpreter, script, server_dir))
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
