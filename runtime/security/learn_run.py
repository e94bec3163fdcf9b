"""`zviz profile learn --base NAME [--out FILE] -- zviz run ...`: run a workload once in
a learning variant of audit mode and write the smallest profile extending NAME that lets
it run (docs/profiles.md, "Learning a profile"; the records -> profile part is learn.py).

The learning run is the `zviz run` asked for, in this process, under a profile of its own:
the base, fully merged, with
- `mode = "audit"`: seccomp refusals become SECCOMP_RET_LOG records and the broker's
  refusals audited records (the escape class and `egress_deny` stay refused);
- Landlock's writable set widened to the rootfs: every entry of the image but /dev,
  /proc, /sys and config.json's mount destinations (a directory holding one is opened
  up entry by entry), so that writes the base would refuse happen and can be seen.
  Volumes stay as config.json and the base grant them.

Where the observations come from, each narrowed to this container:
- seccomp: the kernel's audit records (the multicast group, read here: no shim reads them
  for `zviz run`), those of the container's audit session (its PID 1's, inherited by
  everything it starts and unchangeable from inside: runtime/denials.py);
- the broker: its records in the container's state directory (kept until read);
- writes: the rootfs compared before start and after exit (learn.snapshot): an entry's
  inode and ctime, a directory's entries; for an overlay rootfs its upper layer. Chosen
  over fanotify (it cannot say which directory an entry was made in without a mark per
  directory) as the simplest sound way: two walks of the image, a fraction of a second
  for a Debian image, and ctime cannot be set back from inside.
"""

import json
import os
import select
import signal
import sys
import tempfile
import threading
import time

from runtime import denials, state
from runtime.errors import InvalidArgument
from runtime.private_dir import makedirs_private
from runtime.security import learn
from runtime.security.profiles import _is_path, _load_merged, load_profile, profile_path

# Never opened up for the learning run: the runtime's mounts (their contents are not
# the rootfs's) and whatever config.json mounts.
NOT_ROOTFS = ("/dev", "/proc", "/sys")
# After the workload exits, the kernel's last records may still be on their way.
DRAIN_QUIET_SECONDS = 0.3
DRAIN_MAX_SECONDS = 3.0


def learn_command(base_name: str, out: str | None, command: list[str]) -> int:
    argv = list(command)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if argv and os.path.basename(argv[0]) == "ctr":
        from runtime.security.learn_ctr import learn_through_ctr

        return learn_through_ctr(base_name, out, argv)
    if not argv or os.path.basename(argv[0]) not in ("zviz", "zviz-python"):
        raise InvalidArgument(
            "profile learn: the command must be `zviz run ...` of a bundle or `ctr [...] run ...`"
        )
    from runtime import commands

    args = commands.parse_args(argv[1:])
    if args.command != "run":
        raise InvalidArgument(f"profile learn: `zviz {args.command}` is not `zviz run`")
    if args.detach:
        raise InvalidArgument("profile learn: --detach: learning reads the records at exit")
    if args.profile:
        raise InvalidArgument("profile learn: --profile: the learning run's profile is --base's")
    if not denials.enabled():
        raise InvalidArgument(f"profile learn: denial records are off ({denials.RECORDS_SWITCH})")
    if "log" not in _actions_logged():
        raise InvalidArgument(
            "profile learn: the kernel does not log SECCOMP_RET_LOG "
            "(/proc/sys/kernel/seccomp/actions_logged lacks log): syscalls cannot be learned"
        )
    base = load_profile(base_name)
    bundle = commands._bundle(args)
    config = _read_config(bundle)
    rootfs = config.get("root", {}).get("path", "rootfs")
    rootfs = os.path.normpath(os.path.join(bundle, rootfs))
    mounts = mount_destinations(config, rootfs)
    skip = tuple(dict.fromkeys(NOT_ROOTFS + mounts))

    # Before anything is made: a signal from here on is the workload's while it runs,
    # and ends the learning (cleaned up, no profile written) before and after that.
    signals = commands.ForwardedSignals()
    learning = _write_learning_profile(
        args.root, args.id, learning_profile(base_name, rootfs, skip, name=base.name)
    )
    keep, args.keep = args.keep, True
    created: list[bool] = []
    try:
        learned_profile = load_profile(learning)
        collector = SeccompCollector()
        seen: dict = {}
        from runtime import idmap

        # An overlay rootfs (containerd's snapshots; a bundle may have one too) is read
        # from its upper layer: the runtime mounts its own overlay over the same layers.
        upper = (idmap.overlay_layers(rootfs) or {}).get("upperdir")

        def on_pid(pid: int) -> None:
            # Created, not started: the rootfs is as the runtime made it, and the
            # workload has not run yet.
            created.append(True)
            seen["session"] = denials.session_of(pid)
            seen["dns"] = _watch_dns(pid)
            seen["before"] = learn.snapshot(rootfs, skip)
            if upper:
                seen["upper"] = learn.snapshot(upper, skip)

        args.profile, args.on_pid, args.signals = learning, on_pid, signals
        from runtime.log import Log

        log = Log(args.log, args.log_format, args.debug)
        collector.start()
        try:
            code = commands.cmd_run(args, log)
        finally:
            collector.finish()
            if seen.get("dns") is not None:
                seen["names"] = seen["dns"].stop()
            records = _state_records(args.root, args.id) if created else []
            # Only a container this run made: a create refused for an id in use must
            # not delete that other container.
            if created and not keep:
                _delete(args.root, args.id, log)
        if signals.stop_signal() is not None:
            return stopped(signals.stop_signal())
        if "before" not in seen:
            raise InvalidArgument("profile learn: the container did not start")
        if seen["session"] is None:
            print(
                "zviz profile learn: the container has no audit session: its seccomp "
                "records cannot be told from others', syscalls are not learned",
                file=sys.stderr,
            )
        else:
            records += collector.records(seen["session"], learned_profile)
        if collector.reader.lost:
            print(
                "zviz profile learn: the kernel dropped records while the node was busy "
                f"({collector.reader.lost} overruns): some syscalls may be missing, learn "
                "again",
                file=sys.stderr,
            )
        learned = learn.from_records(records, base)
        if "names" in seen:
            learned.names, learned.dns_servers = seen["names"].names, seen["names"].servers
        learned.writable = written_paths(rootfs, upper, skip, seen["before"], seen.get("upper"))
    finally:
        if not keep:  # kept, the container keeps it: it goes with its delete
            state.remove_learning_profile(args.root, args.id)

    name = os.path.basename(out).removesuffix(".toml") if out else f"{base.name}-learned"
    header = [
        f"Learned by `zviz profile learn --base {base_name}` on {denials.rfc3339(time.time())}",
        f"from: {' '.join(argv)} (exit status {code})",
        "It grants what that run did beyond the base: review it before use. A workload",
        "teaches its own needs: learn only from one you trust (docs/profiles.md).",
    ]
    text = learned_text(learned, base, base_name, name, header)
    if signals.stop_signal() is not None:
        return stopped(signals.stop_signal())
    return emit(text, out, f"the workload exited {code}" if code != 0 else None)


def stopped(sig: int) -> int:
    """`zviz profile learn`'s end when a signal came while no workload ran to take it."""
    print(
        f"zviz profile learn: {signal.Signals(sig).name} while no workload ran: "
        "stopped, no profile written",
        file=sys.stderr,
    )
    return 128 + sig


def _write_learning_profile(root: str, container_id: str, text: str) -> str:
    """The learning run's profile, where deleting the container removes it
    (state.learning_profile); a file already there is another learning run's."""
    path = state.learning_profile(root, container_id)
    makedirs_private(root)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise InvalidArgument(
            f"profile learn: {path} exists: {container_id} is learning already (or its "
            f"learner was killed: `zviz delete --force {container_id}` removes it)"
        ) from None
    with open(fd, "w") as f:
        f.write(text)
    return path


def emit(text: str, out: str | None, early_exit: str | None) -> int:
    """The learned profile to OUT (checked to load) or stdout; a warning when the
    workload ended early (`early_exit` says how). `zviz profile learn`'s exit code."""
    if out:
        # Whole or not at all: a learner killed while writing leaves no half profile
        # at OUT (at most this hidden temp file beside it, after a SIGKILL).
        fd, temp = tempfile.mkstemp(
            prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(os.path.abspath(out))
        )
        try:
            with open(fd, "w") as f:
                f.write(text)
            os.chmod(temp, 0o644)
            os.replace(temp, out)
        except BaseException:
            os.unlink(temp)
            raise
        load_profile(os.path.abspath(out))  # what was written must load: fail loudly if not
    else:
        sys.stdout.write(text)
    if early_exit:
        print(
            f"zviz profile learn: {early_exit}: the profile covers only what it did until then",
            file=sys.stderr,
        )
    return 0


def written_paths(rootfs, upper, skip, before, upper_before) -> set[str]:
    """The container paths the workload wrote, from the snapshots taken before it started
    (learn.snapshot of ROOTFS, and of its overlay's UPPER layer when it has one)."""
    if upper:
        written = learn.overlay_written(before, upper_before, learn.snapshot(upper, skip))
    else:
        written = learn.written_dirs(before, learn.snapshot(rootfs, skip))
    return {p for p in written if not any(learn.beneath(p, m) for m in skip)}


def learned_text(learned, base, base_name: str, name: str, header: list[str]) -> str:
    """The learned profile NAME extending BASE (chosen as BASE_NAME), as TOML."""
    base_ref = os.path.abspath(base_name) if _is_path(base_name) else base.ref
    return learn.to_toml(learn.plan(learned, base, base_ref, name), header)


def _watch_dns(pid: int):
    """DNS names of the container's network namespace (learn_dns.py), or None when it is
    the host's (nothing would tell the container's traffic from the node's)."""
    from runtime.security import learn_dns

    theirs, ours = f"/proc/{pid}/ns/net", "/proc/self/ns/net"
    try:
        if os.stat(theirs).st_ino == os.stat(ours).st_ino:
            return None
        return learn_dns.NamespaceWatch(theirs)
    except OSError as e:
        print(f"zviz profile learn: no DNS names: {e}", file=sys.stderr)
        return None


def mount_destinations(config: dict, rootfs: str) -> tuple[str, ...]:
    """config.json's mount destinations as written and as the runtime resolves them in the
    rootfs (a destination beneath an image's symlink lands at the link's target)."""
    from runtime.rootfs import secure_join

    found = []
    for mount in config.get("mounts") or ():
        destination = mount.get("destination") if isinstance(mount, dict) else None
        if not isinstance(destination, str) or not destination.startswith("/"):
            continue
        found.append(os.path.normpath(destination))
        resolved = os.path.relpath(secure_join(rootfs, destination), rootfs)
        found.append(os.path.normpath("/" + resolved))
    return tuple(dict.fromkeys(p for p in found if p != "/"))


def _actions_logged() -> list[str]:
    try:
        with open("/proc/sys/kernel/seccomp/actions_logged") as f:
            return f.read().split()
    except OSError:
        return []


def _read_config(bundle: str) -> dict:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"profile learn: {bundle}/config.json: {e}") from None


def opened_up(rootfs: str, skip: tuple[str, ...]) -> list[str]:
    """The container paths that make the rootfs writable for the learning run: each entry
    of the image not in or holding a path of SKIP; a directory holding one is opened up
    entry by entry. Symlinks get no rule (Landlock's loader follows none)."""
    paths = []
    stack = ["/"]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(rootfs, directory.lstrip("/"))))
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(directory, entry.name)
            if path in skip or entry.is_symlink():
                continue
            if any(learn.beneath(s, path) for s in skip):
                if entry.is_dir(follow_symlinks=False):
                    stack.append(path)
                continue
            paths.append(path)
    return sorted(paths)


def learning_profile(
    base_name: str, rootfs: str, skip: tuple[str, ...], name: str | None = None
) -> str:
    """The base, merged whole (a file of its own, in audit mode, with the rootfs opened
    up): no `extends`, so nothing of it can change under the run. NAME: the profile's
    name in its records (else the file's)."""
    data = _load_merged(profile_path(base_name), (), [])
    data.setdefault("profile", {})["mode"] = "audit"
    if name:
        data["profile"]["name"] = name
    landlock = data.setdefault("landlock", {})
    landlock["writable"] = list(
        dict.fromkeys(list(landlock.get("writable", [])) + opened_up(rootfs, skip))
    )
    lines = []
    for table, keys in data.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {learn._value(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def _state_records(root: str, container_id: str) -> list[dict]:
    records, _ = denials.read_lines(denials.path_in(os.path.join(root, container_id)))
    return records


def _delete(root: str, container_id: str, log) -> None:
    from runtime.container import Container
    from runtime.errors import ZvizError

    try:
        Container.load(root, container_id, log).delete(force=True)
    except ZvizError:
        pass  # never created, or already gone


class SeccompCollector:
    """The kernel's seccomp records of the node, read while the learning run lasts; each
    distinct (session, syscall, action) kept once (a loop of one call costs nothing)."""

    MAX_DISTINCT = 65536

    def __init__(self):
        try:
            self.reader = denials.KernelRecords()
        except denials.KernelRecordsUnavailable as e:
            raise InvalidArgument(f"profile learn: the kernel's records: {e}") from None
        self.seen: dict[tuple[int, int, int, int], dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="learn-records", daemon=True)
        self._last = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> None:
        """Read what the kernel still queues for the ended run, then stop."""
        self._last = max(self._last, time.monotonic() - DRAIN_QUIET_SECONDS / 2)
        deadline = time.monotonic() + DRAIN_MAX_SECONDS
        while time.monotonic() < deadline and time.monotonic() - self._last < DRAIN_QUIET_SECONDS:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join()
        self.reader.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.reader], [], [], 0.05)
            if not ready:
                continue
            for kind, text in self.reader.read():
                if kind == denials.AUDIT_SECCOMP:
                    self._keep(text)

    def _keep(self, text: str) -> None:
        when, fields = denials.parse_fields(text)
        try:
            key = (
                int(fields["ses"]),
                int(fields["syscall"]),
                int(fields.get("arch", "0"), 16),
                int(fields.get("code", "0"), 16),
            )
        except (KeyError, ValueError):
            return
        self._last = time.monotonic()
        if key not in self.seen and len(self.seen) < self.MAX_DISTINCT:
            self.seen[key] = {"comm": fields.get("comm", ""), "exe": fields.get("exe", "")}

    def records(self, session: int, profile) -> list[dict]:
        """The kept records of SESSION as denial records of PROFILE (the learning one)."""
        out = []
        for (ses, nr, arch, code), where in self.seen.items():
            if ses != session or code & denials.SECCOMP_RET_ACTION_FULL == 0x7FC00000:
                continue  # another's; or a mediated call the broker answered
            syscall = denials.syscall_name(nr, arch)
            verdict = denials.seccomp_verdict(code, profile, syscall)
            out.append({"source": "seccomp", "syscall": syscall, "verdict": verdict, **where})
        return out
