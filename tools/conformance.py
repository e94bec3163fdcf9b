"""The OCI runtime conformance suite (opencontainers/runtime-tools' validation programs) run
against zviz and runc side by side: `make conformance` (`python -m tools.conformance`).

Each validation program is a TAP producer that drives a runtime through the runtime-spec
command line (create/start/state/kill/delete) named by $RUNTIME, on a bundle it unpacks
from rootfs-amd64.tar.gz in its working directory, with `runtimetest` copied in as the
container's process. tools/gotools.py builds them (RUNTIME_TOOLS). Here each runtime is a
small wrapper script giving it a state root of its own (never the host's default), every
program runs once per runtime, one at a time (the cgroup programs of both runtimes use
the same fixed cgroup paths), and a table says per program `ok`/`not ok` with the number
of TAP assertions ok out of those reported.

A program passes when it exits 0, reports at least one assertion and none `not ok`.
Per-program output (TAP and stderr) is kept in the log directory for reading why.
"""

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tools import gotools

ZVIZ_BINARY = os.path.join(os.path.dirname(sys.executable), "zviz")
RUNTIMES = ("zviz", "runc")
PROGRAM_TIMEOUT_S = 120
RUNTIMETEST = "runtimetest"
# The cgroups the suite's programs name (deepest first), relative to each hierarchy.
SUITE_CGROUPS = (
    "testdir/cgrouptest/container",
    "testdir/cgrouptest",
    "testdir",
    "cgrouptest",
)


@dataclasses.dataclass
class Result:
    program: str
    runtime: str
    returncode: int | None  # None: killed at the timeout
    ok: int
    not_ok: int
    skipped: int
    seconds: float
    output: str
    # zviz's errors and what its profile changed in the program's configs (its --debug
    # log): why a program fails where the suite asks for what a profile forbids.
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.not_ok == 0 and self.ok > 0

    @property
    def assertions(self) -> int:
        return self.ok + self.not_ok

    def cell(self) -> str:
        state = "ok" if self.passed else "not ok"
        if self.returncode is None:
            state = "timeout"
        return f"{state} {self.ok}/{self.assertions}"


_TAP_LINE = re.compile(r"^(not ok|ok)\b(.*)$")


def parse_tap(text: str) -> tuple[int, int, int]:
    """(ok, not ok, skipped) among the top-level TAP result lines of `text`."""
    ok = not_ok = skipped = 0
    for line in text.splitlines():
        match = _TAP_LINE.match(line)
        if match is None:
            continue
        if match.group(1) == "not ok":
            not_ok += 1
        elif "# skip" in match.group(2).lower():
            skipped += 1
        else:
            ok += 1
    return ok, not_ok, skipped


def programs() -> list[str]:
    """The validation programs built in the cache, by name."""
    bin_dir = gotools.RUNTIME_TOOLS.bin_dir
    data = set(gotools.RUNTIME_TOOLS.data_files) | {RUNTIMETEST}
    return sorted(
        name
        for name in os.listdir(bin_dir)
        if name not in data and os.access(os.path.join(bin_dir, name), os.X_OK)
    )


class Suite:
    """A working directory with one wrapper per runtime; `run` runs a program under one."""

    def __init__(self, workdir: str, profile: str | None = None, zviz: str = ZVIZ_BINARY):
        self.workdir = workdir
        self.rundir = os.path.join(workdir, "run")
        self.logdir = os.path.join(workdir, "logs")
        self.tmpdir = os.path.join(workdir, "bundles")
        for path in (self.rundir, self.logdir, self.tmpdir):
            os.makedirs(path, exist_ok=True)
        bin_dir = gotools.RUNTIME_TOOLS.bin_dir
        for name in (RUNTIMETEST, *gotools.RUNTIME_TOOLS.data_files):
            # Copies, not symlinks: the programs copy runtimetest into the container's
            # rootfs with a copy that keeps a symlink a symlink (to a host path).
            shutil.copy2(os.path.join(bin_dir, name), os.path.join(self.rundir, name))
        runc = shutil.which("runc") or "runc"
        profile_flags = f" --profile {profile}" if profile else ""
        self.state_roots = {name: os.path.join(workdir, f"state-{name}") for name in RUNTIMES}
        self.zviz_log = os.path.join(workdir, "zviz.log")
        commands = {
            "zviz": f"{zviz} --root {self.state_roots['zviz']} --debug --log {self.zviz_log}"
            f" --log-format json{profile_flags}",
            "runc": f"{runc} --root {self.state_roots['runc']}",
        }
        self.wrappers = {}
        for name, command in commands.items():
            wrapper = os.path.join(workdir, f"{name}-runtime")
            with open(wrapper, "w") as f:
                f.write(f'#!/bin/sh\nexec {command} "$@"\n')
            os.chmod(wrapper, 0o755)
            self.wrappers[name] = wrapper

    def run(self, program: str, runtime: str, timeout: float = PROGRAM_TIMEOUT_S) -> Result:
        binary = os.path.join(gotools.RUNTIME_TOOLS.bin_dir, program)
        log_start = os.path.getsize(self.zviz_log) if os.path.exists(self.zviz_log) else 0
        env = dict(os.environ, RUNTIME=self.wrappers[runtime], TMPDIR=self.tmpdir)
        started = time.monotonic()
        # A session of its own: at the timeout the program and whatever it started go.
        proc = subprocess.Popen(
            [binary],
            cwd=self.rundir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            returncode = None
        seconds = time.monotonic() - started
        self._delete_leftovers(runtime)
        with open(os.path.join(self.logdir, f"{program}.{runtime}.tap"), "w") as f:
            f.write(output)
        ok, not_ok, skipped = parse_tap(output)
        notes = self._zviz_notes(log_start) if runtime == "zviz" else []
        return Result(program, runtime, returncode, ok, not_ok, skipped, seconds, output, notes)

    def _zviz_notes(self, start: int) -> list[str]:
        """The distinct profile changes and errors zviz logged since offset `start`."""
        if not os.path.exists(self.zviz_log):
            return []
        with open(self.zviz_log) as f:
            f.seek(start)
            lines = f.read().splitlines()
        notes: list[str] = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            message = entry.get("msg", "")
            if entry.get("level") == "error" or message.startswith("profile "):
                if message not in notes:
                    notes.append(message)
        return notes

    def _delete_leftovers(self, runtime: str) -> None:
        """Containers a program left (it failed before its own delete), deleted by id."""
        root = self.state_roots[runtime]
        if not os.path.isdir(root):
            return
        for container_id in os.listdir(root):
            if os.path.isdir(os.path.join(root, container_id)):
                subprocess.run(
                    [self.wrappers[runtime], "delete", "--force", container_id],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
        # A container without a mount namespace (linux_ns_itype asks for one) gets its
        # mounts in this, the host's, namespace under runc, which leaves them behind:
        # they go before the bundle directories do, so no removal walks into them.
        unmount_below(self.tmpdir)
        # The programs' bundles are in TMPDIR: those a failed program left go too.
        for name in os.listdir(self.tmpdir):
            shutil.rmtree(os.path.join(self.tmpdir, name), ignore_errors=True)

    @staticmethod
    def remove_suite_cgroups() -> None:
        """The suite's fixed cgroups (runtime-tools' cgroups.AbsCgroupPath and
        RelCgroupPath): the runtimes remove the container's own, not the parents."""
        for hierarchy in ["/sys/fs/cgroup", *sorted(glob.glob("/sys/fs/cgroup/*/"))]:
            for path in SUITE_CGROUPS:
                try:
                    os.rmdir(os.path.join(hierarchy, path))
                except OSError:
                    pass  # absent, or still in use: never forced


def unmount_below(directory: str) -> None:
    with open("/proc/self/mountinfo") as f:
        mountpoints = [line.split()[4] for line in f]
    below = [m for m in mountpoints if m.startswith(directory.rstrip("/") + "/")]
    for mountpoint in sorted(below, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)


def table(results: dict[str, dict[str, Result]], runtimes: tuple[str, ...]) -> str:
    width = max(len(p) for p in results) if results else 10
    lines = [f"{'program':<{width}}  " + "  ".join(f"{r:<16}" for r in runtimes)]
    for program, by_runtime in results.items():
        cells = "  ".join(f"{by_runtime[r].cell():<16}" for r in runtimes)
        lines.append(f"{program:<{width}}  {cells}")
    totals = []
    for runtime in runtimes:
        done = [by_runtime[runtime] for by_runtime in results.values()]
        passed = sum(r.passed for r in done)
        ok = sum(r.ok for r in done)
        totals.append(f"{runtime}: {passed} of {len(done)} programs pass, {ok} assertions ok")
    lines.append("; ".join(totals))
    if "zviz" in runtimes and "runc" in runtimes:
        behind = [
            by_runtime["zviz"]
            for by_runtime in results.values()
            if by_runtime["runc"].passed and not by_runtime["zviz"].passed
        ]
        if behind:
            lines.append("passed by runc, not by zviz (what zviz said, what its profile changed):")
        for result in behind:
            lines.append(f"  {result.program}:")
            lines.extend(f"    {note}" for note in result.notes or ["(nothing logged)"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("programs", nargs="*", help="validation programs (default: all)")
    parser.add_argument("--runtime", action="append", choices=RUNTIMES, help="default: both")
    parser.add_argument("--profile", help="zviz's profile (default: zviz's default)")
    parser.add_argument("--logs", help="keep each program's TAP output in this directory")
    args = parser.parse_args(argv)
    go = gotools.go_binary()
    if go is None and not os.path.isdir(gotools.RUNTIME_TOOLS.bin_dir):
        print(f"conformance: {gotools.missing_reason(gotools.RUNTIME_TOOLS)}")
        return 1
    if go is not None:
        os.makedirs(gotools.CACHE_ROOT, exist_ok=True)
        gotools.build(gotools.RUNTIME_TOOLS, go)
    print(f"conformance: {gotools.version_line(gotools.RUNTIME_TOOLS)}")
    runtimes = tuple(args.runtime or RUNTIMES)
    selected = args.programs or programs()
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="zviz-conformance-")
    try:
        suite = Suite(workdir, profile=args.profile)
        results: dict[str, dict[str, Result]] = {}
        for program in selected:
            # Interleaved, program by program, so a machine's slow minute hits both.
            results[program] = {runtime: suite.run(program, runtime) for runtime in runtimes}
            cells = "  ".join(f"{r}: {results[program][r].cell()}" for r in runtimes)
            print(f"  {program}: {cells}", flush=True)
        if args.logs:
            shutil.copytree(suite.logdir, args.logs, dirs_exist_ok=True)
    finally:
        unmount_below(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        Suite.remove_suite_cgroups()
    print(table(results, runtimes))
    print(f"conformance: {len(selected)} programs in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
