"""Cold start of several commits' shims side by side, interleaved with runc: is a change slower?

    python -m bench.commits [--runs N] REV [REV ...]      # e.g. HEAD~20 HEAD

Comparing two separate `bench shim` runs says little on a machine whose speed drifts by
10% between minutes; this puts every revision into one run. Each REV is checked out
(detached `git worktree`, removed afterwards) and served by a wrapper named
`containerd-shim-zviz<N>-v2` (runtime `io.containerd.zviz<N>.v2`) that runs that tree's
shim with this checkout's interpreter and venv: a revision whose dependencies differ
from this venv's is not measurable this way. It runs each revision's Python entry, never
a compiled client: since the shim's `start` is served by the fork server (docs/shim.md),
this compares the revisions' daemons and unserved starts, not what a node runs. Each runtime has its own ctr namespace, so
each revision has its own shim daemon. Then `ctr run --rm IMAGE ID /bin/true`, RUNS
rounds, one run of every runtime per round; median and quartile per runtime, as ratios
of runc's median. The first run of each (image unpack, the daemon's start) is not counted.

Not part of `make bench` (it needs revisions to compare). It is how the fifth session's
"cold-start regression" was settled: interleaved, its starting commit was slower than
its end, not faster (README, "Measured here").
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from tools.containerd import PrivateContainerd
from tools.mkimage import DEFAULT_REF, build_image

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNC = "io.containerd.runc.v2"

WRAPPER = """#!{python}
import os, sys
sys.path.insert(0, {tree!r})
os.environ["PYTHONPATH"] = {tree!r}  # the daemon `start` spawns runs `-m shim.main`
from shim.main import main
sys.exit(main())
"""


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", CHECKOUT, *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def _run_once(containerd, runtime: str, namespace: str, container_id: str) -> float:
    started = time.perf_counter()
    result = containerd.ctr(
        "run", "--rm", "--runtime", runtime, DEFAULT_REF, container_id, "/bin/true",
        check=False, timeout=120, namespace=namespace,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"ctr run --runtime {runtime} failed: {result.stderr.strip()}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.commits")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("revisions", nargs="+")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="zviz-bench-commits-")
    shim_dir = os.path.join(workdir, "bin")
    os.makedirs(shim_dir)
    trees = []
    runtimes: dict[str, tuple[str, str]] = {}  # label -> (runtime, ctr namespace)
    containerd = None
    try:
        for n, revision in enumerate(args.revisions):
            commit = _git("rev-parse", "--short", revision)
            tree = os.path.join(workdir, f"tree{n}")
            _git("worktree", "add", "--detach", tree, commit)
            trees.append(tree)
            wrapper = os.path.join(shim_dir, f"containerd-shim-zviz{n}-v2")
            with open(wrapper, "w") as f:
                f.write(WRAPPER.format(python=sys.executable, tree=tree))
            os.chmod(wrapper, 0o755)
            runtimes[f"{revision} ({commit})"] = (f"io.containerd.zviz{n}.v2", f"commits{n}")
        runtimes["runc"] = (RUNC, "commits-runc")
        containerd = PrivateContainerd(debug=False, shim_dir=shim_dir).start()
        archive = os.path.join(workdir, "busybox.tar")
        build_image(archive, DEFAULT_REF)
        for _, namespace in runtimes.values():
            containerd.import_image(archive, namespace=namespace)
        for runtime, namespace in runtimes.values():
            _run_once(containerd, runtime, namespace, "warm-up")
        times: dict[str, list[float]] = {label: [] for label in runtimes}
        for i in range(args.runs):
            for label, (runtime, namespace) in runtimes.items():
                times[label].append(_run_once(containerd, runtime, namespace, f"run-{i}"))
        base = statistics.median(times["runc"])
        print(
            f"cold start: ctr run --rm {DEFAULT_REF} ID /bin/true, {args.runs} interleaved rounds"
        )
        for label, values in times.items():
            ordered = sorted(values)
            median = statistics.median(values)
            print(
                f"{label:<28} median {median * 1000:7.1f} ms  {median / base:5.2f}x runc"
                f"   quartiles {ordered[len(ordered) // 4] * 1000:.1f}–"
                f"{ordered[3 * len(ordered) // 4] * 1000:.1f} ms"
            )
    finally:
        if containerd is not None:
            containerd.stop()  # also removes each namespace's cgroup parent
        for tree in trees:
            subprocess.run(["git", "-C", CHECKOUT, "worktree", "remove", "--force", tree])
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
