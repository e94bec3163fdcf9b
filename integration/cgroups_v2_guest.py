"""Guest side of integration/test_cgroups_v2_vm.py: runtime.cgroups on a pure cgroup v2 kernel.

Runs inside the QEMU guest (integration/cgroup2_vm.py) as a plain script: pytest costs
~20 s to start there. Each check records what the kernel did; the host test asserts.
Prints one line: RESULT <json>.
"""

import json
import os
import select
import signal
import sys
import time
import traceback

from runtime import cgroups
from runtime.errors import AlreadyExists, InvalidArgument

MiB = 1024 * 1024
results: dict = {}


def check(function):
    try:
        results[function.__name__] = function()
    except Exception:
        results[function.__name__] = {"error": traceback.format_exc()}
    return function


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


class Child:
    """A forked child that runs `body(out_fd)` once told to, so it can join a cgroup first."""

    def __init__(self, body):
        go_read, go_write = os.pipe()
        out_read, out_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(go_write)
                os.close(out_read)
                os.read(go_read, 1)
                body(out_write)
            finally:
                os._exit(0)
        os.close(go_read)
        os.close(out_write)
        self.pid, self._go, self.out = pid, go_write, out_read

    def go(self) -> "Child":
        os.write(self._go, b"g")
        return self

    def read(self, timeout: float = 60) -> str:
        if not select.select([self.out], [], [], timeout)[0]:
            return ""
        return os.read(self.out, 65536).decode()

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self._go)
        os.close(self.out)
        return os.waitstatus_to_exitcode(status)


def sleep_forever(_out: int) -> None:
    time.sleep(600)


@check
def limits_and_membership():
    cg = cgroups.for_container("zviz-vm-limits")
    cg.create()
    directory = cg.paths["unified"]
    notes = cg.apply(
        {
            "devices": [{"allow": False, "access": "rwm"}],
            "memory": {"limit": 64 * MiB, "swap": 96 * MiB, "reservation": 16 * MiB},
            "pids": {"limit": 20},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
            "unified": {"memory.high": str(60 * MiB)},
        }
    )
    files = {
        name: read(os.path.join(directory, name))
        for name in (
            "memory.max",
            "memory.swap.max",
            "memory.low",
            "memory.high",
            "pids.max",
            "cpu.weight",
            "cpu.max",
            "cpuset.cpus",
        )
    }

    def open_devices(out: int) -> None:
        opened = []
        for path in ("/dev/null", "/dev/kmsg"):
            try:
                os.close(os.open(path, os.O_RDONLY))
                opened.append(f"{path} open")
            except OSError as err:
                opened.append(f"{path} {err.errno}")
        os.write(out, "; ".join(opened).encode())
        time.sleep(600)

    child = Child(open_devices)
    cg.add_pid(child.pid)
    child.go()
    from runtime.cgroups import devices

    facts = {
        "devices_seen": child.read(),
        "device_programs": devices.attached_program_count(directory),
        "version": cg.version,
        "paths": cg.paths,
        "notes": notes,
        "files": files,
        "parent_subtree_control": read("/sys/fs/cgroup/zviz/cgroup.subtree_control"),
        "pids": cg.pids(),
        "child": child.pid,
        "child_cgroup": read(f"/proc/{child.pid}/cgroup"),
        "reloaded_pids": cgroups.load(cg.paths).pids(),
    }
    try:
        cgroups.for_container("zviz-vm-limits").create()
        facts["second_create"] = "succeeded"
    except AlreadyExists as err:
        facts["second_create"] = f"AlreadyExists: {err}"
    cg.destroy()
    facts["child_status"] = child.wait()
    facts["exists_after_destroy"] = os.path.exists(directory)
    return facts


@check
def oom_kill():
    cg = cgroups.for_container("zviz-vm-oom")
    cg.create()
    cg.apply({"memory": {"limit": 32 * MiB, "swap": 32 * MiB}})
    before = cg.oom_kill_count()
    watcher = cg.oom_watcher()

    def hog(out: int) -> None:
        data = b"x" * (256 * MiB)
        os.write(out, b"survived %d" % len(data))

    child = Child(hog)
    cg.add_pid(child.pid)
    status = child.go().wait()
    readable = bool(select.select([watcher], [], [], 30)[0])
    facts = {
        "before": before,
        "status": status,
        "watcher_readable": readable,
        "watcher_read": watcher.read() if readable else None,
        "count": cg.oom_kill_count(),
        "stats_oom_kill": cg.stats()["oom_kill"],
        "memory_events": read(os.path.join(cg.paths["unified"], "memory.events")),
    }
    watcher.close()
    cg.destroy()
    return facts


@check
def fork_limit_and_kill_all():
    cg = cgroups.for_container("zviz-vm-pids")
    cg.create()
    cg.apply({"pids": {"limit": 6}})

    def forker(out: int) -> None:
        made, error = 0, None
        for _ in range(20):
            try:
                pid = os.fork()
            except OSError as err:
                error = err.errno
                break
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            made += 1
        os.write(out, f"{made} {error}".encode())
        time.sleep(600)

    child = Child(forker)
    cg.add_pid(child.pid)
    made, error = child.go().read().split()
    facts = {
        "made": int(made),
        "errno": None if error == "None" else int(error),
        "stats_pids": cg.stats()["pids"],
        "procs": len(cg.procs_recursive()),
        # What the shim turns into pids-limit denial records (docs/denials.md).
        "limit_hits": cg.pids_limit_hits(),
        "limits": [cg.limit("pids"), cg.limit("memory")],
    }
    cg.kill_all(signal.SIGKILL)
    facts["status"] = child.wait()
    deadline = time.monotonic() + 30
    while cg.procs_recursive() and time.monotonic() < deadline:
        time.sleep(0.05)
    facts["procs_after_kill"] = cg.procs_recursive()
    cg.destroy()
    return facts


@check
def freeze_and_thaw():
    cg = cgroups.for_container("zviz-vm-freeze")
    cg.create()

    def ticker(out: int) -> None:
        while True:
            os.write(out, b"t")
            time.sleep(0.02)

    child = Child(ticker)
    cg.add_pid(child.pid)
    first = child.go().read()
    cg.freeze()
    facts = {"first": first, "frozen": cg.frozen()}
    while select.select([child.out], [], [], 1.0)[0]:
        os.read(child.out, 65536)  # written before the freeze took hold
    facts["silent_while_frozen"] = not select.select([child.out], [], [], 2.0)[0]
    cg.thaw()
    facts["frozen_after_thaw"] = cg.frozen()
    facts["ticks_after_thaw"] = child.read(30)
    cg.freeze()
    cg.destroy()  # a paused container must still be destroyable
    facts["status"] = child.wait()
    return facts


@check
def stats():
    cg = cgroups.for_container("zviz-vm-stats")
    cg.create()
    cg.apply({"memory": {"limit": 128 * MiB}, "pids": {"limit": 10}})

    def worker(out: int) -> None:
        data = b"x" * (16 * MiB)
        n = 0
        for i in range(300_000):
            n += i
        os.write(out, b"ready %d" % len(data))
        time.sleep(600)

    child = Child(worker)
    cg.add_pid(child.pid)
    ready = child.go().read()
    stats = cg.stats()
    stats["memory"].pop("stat")
    cg.destroy()
    child.wait()
    return {"ready": ready, "stats": stats}


@check
def invalid_values():
    facts = {}
    for label, resources in (
        ("cpus", {"cpu": {"cpus": "99"}}),
        ("quota", {"cpu": {"quota": 10}}),
        ("memory_high", {"unified": {"memory.high": "lots"}}),
        ("swap", {"memory": {"swap": 64 * MiB}}),
        ("realtime", {"cpu": {"realtimeRuntime": 1000}}),
    ):
        cg = cgroups.for_container(f"zviz-vm-bad-{label}")
        cg.create()
        try:
            cg.apply(resources)
            facts[label] = {"error": None}
        except InvalidArgument as err:
            facts[label] = {"error": str(err)}
        facts[label]["left_behind"] = os.path.exists(cg.paths["unified"])
        cg.destroy()
    return facts


@check
def containers_through_zviz():
    """Whole containers (`zviz run`) on v2: the module as the runtime drives it."""
    import subprocess

    from runtime.defaults import default_config
    from tools.mkbundle import build_bundle

    zviz = os.path.join(os.path.dirname(sys.executable), "zviz")

    def run(name: str, args: list[str], **resources) -> dict:
        config = default_config(args=args, terminal=False)
        config["linux"]["resources"].update(resources)
        bundle = build_bundle(f"/tmp/{name}", args=args, linux=config["linux"])
        done = subprocess.run(
            [zviz, "--root", "/run/zviz", "run", "--bundle", bundle, name],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return {"rc": done.returncode, "out": done.stdout, "err": done.stderr}

    def exec_into(name: str) -> dict:
        """`zviz exec` into a running container: the exec joins its cgroup by itself."""
        bundle = build_bundle(f"/tmp/{name}", args=["sleep", "60"])
        base = [zviz, "--root", "/run/zviz"]
        subprocess.run([*base, "create", "--bundle", bundle, name], check=True, timeout=60,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            subprocess.run([*base, "start", name], check=True, timeout=60)
            done = subprocess.run(
                [*base, "exec", name, "sh", "-c", "cat /proc/self/cgroup; cat /sys/fs/cgroup/cgroup.procs | wc -l"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            return {"rc": done.returncode, "out": done.stdout, "err": done.stderr}
        finally:
            subprocess.run([*base, "delete", "--force", name], timeout=60)

    return {
        "exec": exec_into("zviz-vm-exec"),
        "cgroup_inside": run("zviz-vm-run-cg", ["cat", "/proc/self/cgroup"]),
        "hog": run(
            "zviz-vm-run-hog",
            ["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
            memory={"limit": 32 * MiB},
        ),
        "fork": run(
            "zviz-vm-run-fork",
            ["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do sleep 2 & done; wait"],
            pids={"limit": 4},
        ),
    }


@check
def shared_checks():
    """The checks integration/test_cgroups.py runs on the host, run on this v2 kernel."""
    from integration import cgroup_checks
    from tools.blockdevs import absent_block_device, present_block_device

    def throttle(cg) -> str:
        device = present_block_device()
        if device is None:
            return "skipped: the guest has no block device"
        cgroup_checks.check_block_io_throttle(cg, device, absent_block_device())
        return "passed"

    def weight(cg) -> str:
        if cgroup_checks.offered_weight_file(cg) is None:
            return "refused: " + cgroup_checks.check_block_io_weight_is_refused(cg)
        return "applied: " + cgroup_checks.check_block_io_weight_applies(cg)

    facts = {}
    for label, run in (
        ("apply_writes_the_limits", cgroup_checks.check_apply_writes_the_limits),
        ("block_io_throttle", throttle),
        ("block_io_weight", weight),
    ):
        cg = cgroups.for_container(f"zviz-vm-shared-{label}")
        cg.create()
        try:
            facts[label] = run(cg) or "passed"
        except Exception:
            facts[label] = "failed: " + traceback.format_exc()
        finally:
            cg.destroy()
    return facts


@check
def nothing_left():
    return sorted(name for name in os.listdir("/sys/fs/cgroup") if "zviz" in name)


print("RESULT " + json.dumps(results), flush=True)
sys.exit(0)
