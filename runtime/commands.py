"""The `zviz` commands: the runc-compatible command line, a thin face over runtime/container.py.

runtime/cli.py is the entry point (it first tries the `zviz run` fast path,
runtime/forkserver.py, before anything here is imported).

Keeps runc's commands, flags and output formats, so tools that drive runc (containerd's
runc shim through go-runc, Docker's --add-runtime, the OCI validation suite) can drive
zviz unchanged. Flags runc accepts that mean nothing here are accepted and ignored
(named in `_IGNORED`); flags zviz cannot honour fail with a clear error.

Every error is one line on stderr (and, with --log, one line in the log file in
--log-format, which go-runc reads back) and exit status 1; never a traceback
unless --debug.
"""

import argparse
import json
import os
import signal
import sys

from runtime import VERSION, errors
from runtime.log import Log
from runtime.state import DEFAULT_ROOT

OCI_VERSION = "1.2.0"

# Signals `zviz run` / `zviz exec` pass on to the process they wait for.
_FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
)


def parse_signal(text: str) -> int:
    """runc's signal syntax: 9, KILL, SIGKILL (any case)."""
    if text.isdigit():
        number = int(text)
        if 0 < number < 65:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        number = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if number is not None:
            return int(number)
    raise errors.InvalidArgument(f"unknown signal {text!r}")


def _parser(with_profile_commands: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zviz", description="zviz: an OCI runtime for untrusted code (runc-compatible CLI)"
    )
    parser.add_argument("--root", default=DEFAULT_ROOT, help="state directory (default /run/zviz)")
    parser.add_argument("--log", default=None, help="log file (default stderr)")
    parser.add_argument("--log-format", default="text", choices=("text", "json"))
    parser.add_argument("--debug", action="store_true")
    parser.add_argument(
        "--systemd-cgroup", action="store_true", help="not supported (cgroupfs only)"
    )
    parser.add_argument("--rootless", default="auto", help="accepted; zviz runs as root")
    parser.add_argument("--criu", default=None, help="accepted; checkpoint is not supported")
    parser.add_argument("-v", "--version", action="store_true")
    # The README's `zviz --profile=NAME run ...`: the same as run's and create's own
    # flags, which win when both are given (run_cli merges them).
    parser.add_argument("--profile", dest="global_profile", default=None, help="security profile")
    parser.add_argument(
        "--verbose", dest="global_verbose", action="store_true", help="log denied syscalls"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text)

    for name in ("run", "create"):
        p = command(name, "create and start a container" if name == "run" else "create a container")
        p.add_argument("id")
        p.add_argument(
            "bundle_arg", nargs="?", metavar="BUNDLE", help="bundle directory (or --bundle)"
        )
        p.add_argument("-b", "--bundle", default=None)
        p.add_argument("--console-socket", default=None)
        p.add_argument("--pid-file", default=None)
        p.add_argument("--no-pivot", action="store_true")
        p.add_argument("--no-new-keyring", action="store_true")
        p.add_argument("--preserve-fds", type=int, default=0)
        p.add_argument("--notify-socket", default=None)
        p.add_argument("--profile", default=None, help="zviz security profile")
        p.add_argument("--verbose", action="store_true", help="log denied syscalls")
        p.add_argument(
            "--allow-host-network",
            action="store_true",
            help="let a config.json without a network namespace share the host's",
        )
        if name == "run":
            p.add_argument("-d", "--detach", action="store_true")
            p.add_argument("--keep", action="store_true", help="keep the stopped container")
            p.add_argument("--no-subreaper", action="store_true")
            p.add_argument(
                "-t", "--tty", action="store_true", help="accepted; the caller's tty is used"
            )
        else:
            p.add_argument(
                "-d", "--detach", action="store_true", help="accepted; create always detaches"
            )

    p = command("start", "start a created container")
    p.add_argument("id")
    p = command("state", "print a container's OCI state")
    p.add_argument("id")
    p = command("kill", "send a signal to a container's PID 1")
    p.add_argument("-a", "--all", action="store_true")
    p.add_argument("id")
    p.add_argument("signal", nargs="?", default="SIGTERM")
    p = command("delete", "delete a container")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("id")
    p = command("list", "list containers")
    p.add_argument("-f", "--format", default="table", choices=("table", "json"))
    p.add_argument("-q", "--quiet", action="store_true")
    p = command("ps", "list a container's processes")
    p.add_argument("-f", "--format", default="table", choices=("table", "json"))
    p.add_argument("id")
    p.add_argument("ps_args", nargs=argparse.REMAINDER)
    p = command("exec", "run a process in a container")
    p.add_argument("-p", "--process", default=None)
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("--pid-file", default=None)
    p.add_argument("--console-socket", default=None)
    p.add_argument("--cwd", default=None)
    p.add_argument("-e", "--env", action="append", default=[])
    p.add_argument("-u", "--user", default=None)
    p.add_argument("-g", "--additional-gids", action="append", default=[])
    p.add_argument("--no-new-privs", action="store_true")
    p.add_argument("--cap", action="append", default=[])
    p.add_argument("--preserve-fds", type=int, default=0)
    p.add_argument("--ignore-paused", action="store_true")
    p.add_argument("id")
    p.add_argument("args", nargs=argparse.REMAINDER)
    for name in ("pause", "resume"):
        p = command(name, f"{name} all processes of a container (cgroup freezer)")
        p.add_argument("id")
    p = command("spec", "write a default config.json")
    p.add_argument("-b", "--bundle", default=".")
    p.add_argument("--rootless", action="store_true")
    command("features", "print the OCI features JSON")
    p = command("update", "update a container's resource limits")
    p.add_argument("-r", "--resources", default=None, help="linux.resources JSON file, - for stdin")
    p.add_argument("--memory", default=None)
    p.add_argument("--pids-limit", type=int, default=None)
    p.add_argument("id")
    p = command("events", "print a container's stats")
    p.add_argument("--stats", action="store_true")
    p.add_argument("--interval", default="5s")
    p.add_argument("id")
    p = command("audit", "print containers' denial records (docs/denials.md)")
    p.add_argument("id", nargs="?", default=None, help="one container (default: all)")
    p.add_argument("--follow", action="store_true", help="keep printing new records")
    p.add_argument("--since", default=None, help="RFC 3339 time, or a duration back: 10m")
    p.add_argument("--format", default="table", choices=("table", "json"))
    command("metrics", "denial counters of every container, Prometheus text format")
    for name in ("checkpoint", "restore"):
        p = command(name, "not supported by zviz")
        p.add_argument("rest", nargs=argparse.REMAINDER)
    if with_profile_commands:
        # Only when asked for: runtime.security costs ~25 ms of imports, which the
        # commands a shim runs per container (state, kill, delete) must not pay.
        from runtime.security.profile_cli import add_subparser as add_profile_commands

        add_profile_commands(sub)  # zviz profile list | show | check | diff | learn
        from runtime.node import add_subparser as add_node_commands

        add_node_commands(sub)  # zviz node check | install | uninstall
    else:
        command("profile", "security profiles: list | show | check | diff | learn")
        command("node", "this node as a containerd runtime host: check | install | uninstall")
    return parser


_PREBUILT: argparse.ArgumentParser | None = None


def prebuild_parser() -> None:
    """Build the parser now (the fork server does, once): it costs ~3 ms per command."""
    global _PREBUILT
    _PREBUILT = _parser()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line (exits with usage on bad syntax, as argparse does)."""
    wants_profiles = "profile" in argv or "node" in argv
    parser = _PREBUILT if _PREBUILT is not None and not wants_profiles else _parser(wants_profiles)
    args = parser.parse_args(argv)
    if args.command in ("run", "create"):
        args.profile = args.profile or args.global_profile
        args.verbose = args.verbose or args.global_verbose
    return args


def run_cli(argv: list[str], on_pid=None) -> int:
    """Parse `argv` and run the command; on_pid(pid) is told PID 1's pid by `run`."""
    args = parse_args(argv)
    args.on_pid = on_pid
    log = Log(args.log, args.log_format, args.debug)
    try:
        if args.version:
            print(f"zviz version {VERSION}\nspec: {OCI_VERSION}")
            return 0
        if args.systemd_cgroup:
            raise errors.NotImplementedByZviz("--systemd-cgroup: zviz drives cgroupfs only")
        if not args.command:
            raise errors.InvalidArgument("no command given (see zviz --help)")
        handler = _COMMANDS[args.command]
        return handler(args, log) or 0
    except errors.ZvizError as exc:
        log.error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the edge: report, don't dump a traceback
        if args.debug:
            raise
        log.error(f"internal error: {type(exc).__name__}: {exc}")
        return 1


def _load(args, log):
    from runtime.container import Container

    return Container.load(args.root, args.id, log)


def _bundle(args) -> str:
    bundle = args.bundle or args.bundle_arg or "."
    return os.path.abspath(bundle)


def cmd_create(args, log) -> int:
    return _create_detached(args, log, start=False)


def _create_detached(args, log, start: bool) -> int:
    """`create`, `run --detach`: a SIGINT, SIGTERM or SIGHUP while the container is made
    no longer ends this process half-way (its cgroups and state left behind): it is
    kept, and once create is done the container is deleted and the command ends
    128+signal, as if it had come before create began."""
    from runtime.container import Container

    signals = ForwardedSignals()  # forwarded to nobody: a detached container is not ours
    container = Container.create(
        args.root, args.id, _bundle(args), detach=True, **_create_options(args, log)
    )
    if start and signals.stop_signal() is None:
        container.start()
    stop = signals.stop_signal()
    if stop is not None:
        container.delete(force=True)
        return 128 + stop
    return 0


def _create_options(args, log) -> dict:
    """Container.create's keyword arguments from the flags `create` and `run` share."""
    return dict(
        profile=args.profile,
        verbose=args.verbose,
        console_socket=args.console_socket,
        pid_file=args.pid_file,
        preserve_fds=args.preserve_fds,
        no_pivot=args.no_pivot,
        allow_host_network=args.allow_host_network,
        notify_socket=args.notify_socket,
        log=log,
    )


def cmd_run(args, log) -> int:
    from runtime.container import Container

    common = _create_options(args, log)
    if args.detach:
        return _create_detached(args, log, start=True)
    # From before anything is made: a SIGTERM's default action during create would end
    # this process half-way, with the container's cgroups and state left behind.
    signals = getattr(args, "signals", None) or ForwardedSignals()
    container = Container.create(args.root, args.id, _bundle(args), detach=False, **common)
    try:
        signals.forward_to(container.pid, running=False)
        if args.on_pid is not None:
            args.on_pid(container.pid)
        if signals.stop_signal() is None:
            signals.starting()
            _start(container, signals)
        # else PID 1 got the signal before its workload ran and exits of it, as the
        # workload would have: the workload never starts.
        status = _wait_for(container.pid)
        signals.target_exited()
        code = container.record_exit(status, persist=args.keep)
        if container.oom_killed:
            sys.stderr.write(f"zviz: container {args.id}: OOM killed (memory limit reached)\n")
        return code
    finally:
        if not args.keep:
            container.delete(force=True)


def _start(container, signals: "ForwardedSignals") -> None:
    try:
        container.start()
    except errors.ZvizError:
        # A signal forwarded while PID 1 was being started ended it before its execve:
        # the run ends as the workload would have, not with a start error.
        if signals.stop_signal() is None and not signals.forwarded_terminating:
            raise


# The forwarded signals whose default action ends a process (the ones PID 1 exits of
# while it waits for start: runtime/spawn/init.py). One that comes while no workload runs
# (before start, after the exit) ends the run, or the learner, instead.
_TERMINATING = frozenset(
    (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
)


class ForwardedSignals:
    """`zviz run`, `exec` and `profile learn` pass _FORWARDED on to the process they wait
    for (as `runc run` does), from the moment this is made until that process exits;
    `create` and `run --detach` only keep them (there is nothing of theirs to pass to).

    Made before anything else is, so that no signal ends this process half-way (issue
    16: a SIGTERM during create left the cgroups and state behind; SIGINT's
    KeyboardInterrupt could skip a cleanup). A signal that comes while no workload runs
    (before it started, after it exited) is also kept in `missed`; those from before the
    process existed are sent to it once it does (as the fork-server clients do). A
    terminating one of them is `stop_signal()`: the caller ends, cleaning up, without
    starting more (run does not start the workload, the learner writes no profile).
    """

    def __init__(self):
        self._owner = os.getpid()
        self.pid = 0
        self.running = False
        self.missed: list[int] = []
        self.forwarded_terminating = False
        for sig in _FORWARDED:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig, _frame) -> None:
        if os.getpid() != self._owner:
            # A child forked with this handler (PID 1 before its own, the broker): the
            # default action, as before this was installed.
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        if not self.running:
            self.missed.append(sig)
        if self.pid:
            self.forwarded_terminating |= sig in _TERMINATING
            _send(self.pid, sig)

    def forward_to(self, pid: int, running: bool = True) -> None:
        """PID takes the signals from now on; those that came before it existed are sent.
        RUNNING: it is the workload (else `starting()` says when it becomes it)."""
        for sig in self.missed:
            _send(pid, sig)
        self.pid, self.running = pid, running

    def starting(self) -> None:
        self.running = True

    def target_exited(self) -> None:
        self.pid, self.running = 0, False

    def stop_signal(self) -> int | None:
        """The first terminating signal that came while no workload ran, else None."""
        return next((sig for sig in self.missed if sig in _TERMINATING), None)


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_for(pid: int) -> int:
    """Reap until `pid` exits (we are a subreaper: orphans land here too); its wait status."""
    while True:
        try:
            reaped, status = os.waitpid(-1, 0)
        except ChildProcessError:
            raise errors.FailedPrecondition(f"process {pid} is not ours to wait for") from None
        if reaped == pid:
            return status


def cmd_start(args, log) -> int:
    _load(args, log).start()
    return 0


def cmd_state(args, log) -> int:
    print(json.dumps(_load(args, log).state(), indent=2))
    return 0


def cmd_kill(args, log) -> int:
    _load(args, log).kill(parse_signal(args.signal), all=args.all)
    return 0


def cmd_delete(args, log) -> int:
    from runtime.container import Container

    try:
        container = Container.load(args.root, args.id, log)
    except errors.NotFound:
        if args.force:
            # A learner SIGKILLed before its container existed leaves its profile beside.
            from runtime import state

            state.remove_learning_profile(args.root, args.id)
            return 0  # runc: delete --force of a missing container succeeds
        raise
    container.delete(force=args.force)
    return 0


def cmd_list(args, log) -> int:
    from runtime.container import Container

    states = [c.state() for c in Container.list_all(args.root, log)]
    if args.quiet:
        for s in states:
            print(s["id"])
    elif args.format == "json":
        print(json.dumps(states))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [
            (s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"] or "root")
            for s in states
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return 0


def cmd_ps(args, log) -> int:
    pids = _load(args, log).pids()
    if args.format == "json":
        print(json.dumps(pids))
        return 0
    import subprocess

    ps_args = [a for a in args.ps_args if a != "--"] or ["-ef"]
    output = subprocess.run(["ps", *ps_args], capture_output=True, text=True, check=True).stdout
    lines = output.splitlines()
    if not lines:
        return 0
    header = lines[0]
    try:
        pid_column = header.split().index("PID")
    except ValueError:
        raise errors.InvalidArgument("ps output has no PID column") from None
    print(header)
    wanted = set(pids)
    for line in lines[1:]:
        fields = line.split()
        if (
            len(fields) > pid_column
            and fields[pid_column].isdigit()
            and int(fields[pid_column]) in wanted
        ):
            print(line)
    return 0


def cmd_exec(args, log) -> int:
    container = _load(args, log)
    if args.process:
        from runtime.spec import decode_json

        source = sys.stdin.read() if args.process == "-" else _read(args.process)
        process_config = decode_json(source, args.process)
    else:
        process_config = _process_from_flags(args, container)
    if container.status() == "paused" and not args.ignore_paused:
        raise errors.FailedPrecondition(f"container {args.id!r} is paused: cannot exec")
    detach = args.detach
    # Before the process exists: a signal meanwhile is sent to it once it does.
    signals = None if detach else ForwardedSignals()
    pid = container.exec(
        process_config,
        console_socket=args.console_socket,
        pid_file=args.pid_file,
        detach=detach,
        preserve_fds=args.preserve_fds,
    )
    if detach:
        return 0
    signals.forward_to(pid)
    if args.on_pid is not None:
        args.on_pid(pid)
    from runtime.state import exit_code_from_wait_status

    return exit_code_from_wait_status(_wait_for(pid))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise errors.InvalidArgument(f"--process {path}: {exc.strerror}") from None


def _process_from_flags(args, container) -> dict:
    """An OCI process from exec's flags, based on the container's own process."""
    args_list = [a for a in args.args if a != "--"] if args.args else []
    if not args_list:
        raise errors.InvalidArgument("exec: give the command to run, or --process FILE")
    from runtime.spec import decode_json

    with open(os.path.join(container.data["bundle"], "config.json"), "rb") as f:
        base = decode_json(f.read()).get("process") or {}
    process_config = dict(base)
    process_config["args"] = args_list
    process_config["terminal"] = bool(args.tty)
    if args.cwd:
        process_config["cwd"] = args.cwd
    if args.env:
        process_config["env"] = list(base.get("env") or []) + args.env
    if args.user:
        uid, _, gid = args.user.partition(":")
        process_config["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    if args.additional_gids:
        process_config.setdefault("user", {})["additionalGids"] = [
            int(g) for g in args.additional_gids
        ]
    if args.no_new_privs:
        process_config["noNewPrivileges"] = True
    if args.cap:
        caps = process_config.setdefault("capabilities", {})
        for key in ("bounding", "effective", "permitted"):
            caps[key] = sorted(set(caps.get(key) or []) | set(args.cap))
    return process_config


def cmd_pause(args, log) -> int:
    _load(args, log).pause()
    return 0


def cmd_resume(args, log) -> int:
    _load(args, log).resume()
    return 0


def cmd_spec(args, log) -> int:
    from runtime.defaults import default_config

    path = os.path.join(args.bundle, "config.json")
    if os.path.exists(path):
        raise errors.AlreadyExists(f"{path} exists: remove it first")
    with open(path, "w") as f:
        json.dump(default_config(), f, indent=2)
        f.write("\n")
    return 0


def cmd_features(args, log) -> int:
    from runtime.features import features

    print(json.dumps(features(), indent=2))
    return 0


def _set_resource(resources: dict, section: str, key: str, value) -> None:
    """A flag's value into --resources' object (a section that is no object is left for
    the validation to refuse by name)."""
    part = resources.setdefault(section, {})
    if isinstance(part, dict):
        part[key] = value


def cmd_update(args, log) -> int:
    container = _load(args, log)
    resources: dict = {}
    if args.resources:
        from runtime.spec import decode_json

        text = sys.stdin.read() if args.resources == "-" else _read(args.resources)
        resources = decode_json(text, "--resources") or {}
        if not isinstance(resources, dict):
            raise errors.InvalidArgument("--resources: must be a JSON object (linux.resources)")
    if args.memory is not None:
        try:
            memory = int(args.memory)
        except ValueError:
            raise errors.InvalidArgument(
                f"update: --memory: must be a number of bytes (or -1), got {args.memory!r}"
            ) from None
        _set_resource(resources, "memory", "limit", memory)
    if args.pids_limit is not None:
        _set_resource(resources, "pids", "limit", args.pids_limit)
    # Flags and --resources alike go through the spec's rules (Container.update).
    container.update(resources, "update")
    return 0


def cmd_events(args, log) -> int:
    import time

    container = _load(args, log)
    interval = float(args.interval.rstrip("s") or 5)
    while True:
        print(json.dumps({"type": "stats", "id": args.id, "data": container.stats()}), flush=True)
        if args.stats or container.status() == "stopped":
            return 0
        time.sleep(interval)


def cmd_audit(args, log) -> int:
    from runtime import denials

    try:
        since = denials.parse_time(args.since) if args.since else None
    except ValueError:
        raise errors.InvalidArgument(f"--since {args.since!r}: not a time or duration") from None
    return denials.audit(
        args.root, args.id, follow=args.follow, since=since, fmt=args.format, out=sys.stdout
    )


def cmd_metrics(args, log) -> int:
    from runtime import denials

    sys.stdout.write(denials.metrics(args.root))
    return 0


def cmd_profile(args, log) -> int:
    from runtime.security.profile_cli import run

    return run(args)


def cmd_node(args, log) -> int:
    from runtime.node import run

    return run(args)


def cmd_unsupported(args, log) -> int:
    raise errors.NotImplementedByZviz(f"{args.command} is not supported by zviz")


_COMMANDS = {
    "run": cmd_run,
    "create": cmd_create,
    "start": cmd_start,
    "state": cmd_state,
    "kill": cmd_kill,
    "delete": cmd_delete,
    "list": cmd_list,
    "ps": cmd_ps,
    "exec": cmd_exec,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "spec": cmd_spec,
    "features": cmd_features,
    "update": cmd_update,
    "events": cmd_events,
    "audit": cmd_audit,
    "metrics": cmd_metrics,
    "profile": cmd_profile,
    "node": cmd_node,
    "checkpoint": cmd_unsupported,
    "restore": cmd_unsupported,
}
