"""Suspicion (issue 10): the broker reads /proc/<pid>/... after its notification-id
check, so a caller that dies and whose pid is reused in between would lend the broker
another process's uid (and root). Reproduced with a real pid reuse: in a fresh pid
namespace, ns_last_pid hands the dead caller's pid to a process with another uid.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REUSE = r"""
import os, signal, struct, time
from runtime.security.broker import caller as broker_caller, core, verdict

def sleeper(uid):
    pid = os.fork()
    if pid == 0:
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        time.sleep(60)
        os._exit(0)
    for _ in range(200):  # until the uid change shows
        with open(f"/proc/{pid}/status") as f:
            if f"\t{uid}\t" in f.read():
                return pid
        time.sleep(0.01)
    raise SystemExit("sleeper did not change uid")

class ValidBroker:
    # The notification stayed valid until the check: the window is after it.
    profile = None
    copies = core.CopyBudget(0)
    def valid(self, note):
        return True

caller = sleeper(1234)
raw = core.NOTIF.pack(1, caller, 0, 42, 0, 0, 0, 0, 0, 0, 0, 0)
call = broker_caller.Call(ValidBroker(), core.Notification(raw))
os.kill(caller, signal.SIGKILL)
os.waitpid(caller, 0)
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(caller - 1))
other = sleeper(4321)
assert other == caller, (other, caller)
try:
    status = call.caller_status()
    print("LENT uid", status["Uid"][1])
except verdict.Denied as e:
    print("DENIED", e.reason)
finally:
    call.close()
    os.kill(other, signal.SIGKILL)
"""


def test_a_reused_pid_lends_the_broker_nothing():
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", REUSE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "DENIED caller vanished", result.stdout + result.stderr
