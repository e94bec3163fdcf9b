"""Guest side of test_kernel_gaps.py: Landlock rights on a kernel that lacks them (ABI 2).

Runs inside the QEMU guest (integration/cgroup2_vm.py, Debian's 6.1 kernel) as a plain
script. A profile asking for truncate (Landlock ABI 3) without may_lack must refuse to
start; the same profile allowing it must run. Prints one line: RESULT <json>.
"""

import json
import os
import subprocess
import sys
import traceback

from runtime.security import landlock
from tools.mkbundle import build_bundle

ZVIZ = os.path.join(os.path.dirname(sys.executable), "zviz")
# Not /tmp: a profile file is read only from a directory no other user may write.
PROFILES = "/run/kernel-gaps-profiles"
results: dict = {"abi": landlock.abi_version()}


def profile_file(name: str, may_lack: list[str]) -> str:
    path = os.path.join(PROFILES, f"{name}.toml")
    with open(path, "w") as f:
        f.write(
            f'[profile]\nname = "{name}"\nextends = "ci-runner"\n'
            f"[landlock]\nmay_lack = {json.dumps(may_lack)}\n"
        )
    return path


def run(name: str, profile: str) -> dict:
    bundle = build_bundle(f"/tmp/{name}", args=["sh", "-c", "echo workload ran"])
    done = subprocess.run(
        [ZVIZ, "--root", "/run/zviz", "run", "--profile", profile, "--bundle", bundle, name],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    subprocess.run([ZVIZ, "--root", "/run/zviz", "delete", "-f", name], capture_output=True)
    return {"rc": done.returncode, "out": done.stdout, "err": done.stderr}


try:
    os.makedirs(PROFILES, mode=0o755, exist_ok=True)
    os.chmod(PROFILES, 0o755)
    strict = profile_file("gaps-strict", [])
    allowing = profile_file("gaps-allowing", ["truncate", "device_ioctl", "scope"])
    results["refused"] = run("gaps-refused", strict)
    results["allowed"] = run("gaps-allowed", allowing)
    shown = subprocess.run(
        [ZVIZ, "profile", "check", strict], capture_output=True, text=True, timeout=120
    )
    results["check"] = {"rc": shown.returncode, "out": shown.stdout, "err": shown.stderr}
    listed = subprocess.run([ZVIZ, "profile", "list"], capture_output=True, text=True, timeout=120)
    results["list"] = {"rc": listed.returncode, "out": listed.stdout, "err": listed.stderr}
except Exception:
    results["error"] = traceback.format_exc()

print("RESULT " + json.dumps(results), flush=True)
sys.exit(0)
