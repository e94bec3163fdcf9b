"""`zviz node install` with AppArmor active: Debian's 6.1 under QEMU (cgroup2_vm.py).

This machine's kernel runs no AppArmor; the guest's does (Debian builds it in and makes it
the default LSM). One boot: the wheel install's `zviz node install` (a temp containerd
config and bin directory; the profile in the guest's own /etc/apparmor.d, over the
read-only host root) parses and loads the profile into the guest's kernel, the kernel
attaches it to the installed shim and zviz, a container runs under it, a second install
changes nothing, `node check` reports it, and uninstall unloads it.

Not covered here: Ubuntu's kernel.apparmor_restrict_unprivileged_userns, an Ubuntu kernel
patch that Debian's kernel lacks (the profile's `userns` rule, written where the parser
is AppArmor 4's, is for it): tests/test_node_install.py covers that branch with a fake root.
"""

import json
import shutil

import pytest

from integration.cgroup2_vm import missing_requirements, run_in_v2_vm
from integration.wheel_install import installed

# One boot does it all (~2 min under TCG here, the wheel install aside): past the suite's
# default timeout on a busy machine.
pytestmark = pytest.mark.timeout(900)

GUEST_SCRIPT = r"""
import json, os, shutil, subprocess, sys, time

WHEEL_BIN = @WHEEL_BIN@
SECURITY = "/sys/kernel/security/apparmor"
facts = {}


def report():
    print("RESULT " + json.dumps(facts))


facts["enabled"] = open("/sys/module/apparmor/parameters/enabled").read().strip()
facts["lsm"] = open("/sys/kernel/security/lsm").read().strip()
if facts["enabled"] != "Y":
    report()
    sys.exit(0)

# The host's / is read-only here: the profile and install's state file go to guest tmpfs
# (the abi files the profile names are carried over first).
shutil.copytree("/etc/apparmor.d/abi", "/tmp/abi")
for directory in ("/etc/apparmor.d", "/var/lib"):
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", directory], check=True)
shutil.copytree("/tmp/abi", "/etc/apparmor.d/abi")
base = "/tmp/node-apparmor"
bin_dir = base + "/bin"
config = base + "/config.toml"
os.makedirs(base)
with open(config, "w") as f:
    f.write("version = 2\n")
env = {"PATH": WHEEL_BIN + ":/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
profile = "/etc/apparmor.d/zviz"
shim = bin_dir + "/containerd-shim-zviz-v2"
zviz = bin_dir + "/zviz"


def node(*args):
    argv = [WHEEL_BIN + "/zviz", "node", *args]
    if args[0] != "check":
        argv += ["--containerd-config", config, "--bin-dir", bin_dir]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", timeout=300)
    return {"rc": done.returncode, "out": done.stdout + done.stderr}


def loaded():
    with open(SECURITY + "/profiles") as f:
        return sorted(line for line in f.read().splitlines() if line.startswith("zviz-"))


def revision():
    # A read blocks until the policy changes since this open's last read (it starts at 0):
    # without waiting, "unread" is revision 0, no load since boot.
    fd = os.open(SECURITY + "/revision", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, 64).decode().strip()
    except BlockingIOError:
        return "0"
    finally:
        os.close(fd)


def mtimes():
    return {p: os.stat(p).st_mtime_ns for p in (profile, config, zviz, "/var/lib/zviz/node-install.json")}


def label_of_shim():
    # The installed shim link exec'd as containerd execs it (`-v`: print and exit); a
    # sitecustomize on its PYTHONPATH prints, from inside that process, its own label.
    hook = "/tmp/label-hook"
    os.makedirs(hook, exist_ok=True)
    with open(hook + "/sitecustomize.py", "w") as f:
        f.write("print('LABEL', open('/proc/self/attr/current').read().strip())\n")
    done = subprocess.run(
        [shim, "-v"], capture_output=True, text=True, env=dict(env, PYTHONPATH=hook), timeout=120
    )
    return [line for line in done.stdout.splitlines() if line.startswith("LABEL ")]


try:
    facts["revision_before"] = revision()
    facts["first"] = node("install")
    facts["loaded"] = loaded()
    facts["profile"] = open(profile).read()
    facts["realpaths"] = {"shim": os.path.realpath(shim), "zviz": os.path.realpath(zviz)}
    revision_after, mtimes_after = revision(), mtimes()
    facts["second"] = node("install")
    facts["second_changed_nothing"] = {
        "revision": [revision_after, revision()],
        "files": mtimes_after == mtimes(),
        "profile": open(profile).read() == facts["profile"],
    }
    facts["shim_label"] = label_of_shim()
    from tools.mkbundle import build_bundle

    bundle = build_bundle("/tmp/bundle", args=["cat", "/proc/self/attr/current"])
    done = subprocess.run(
        [zviz, "--root", "/run/zviz", "run", "--bundle", bundle, "apparmor-run"],
        capture_output=True, text=True, env=env, cwd="/", timeout=300,
    )
    facts["container"] = {"rc": done.returncode, "out": done.stdout, "err": done.stderr[-2000:]}
    # That run went the slow way and started a fork server under its label: the compiled
    # client's socket name (attr/current included) must reach it, so a later run is served.
    served = []
    for attempt in range(30):
        done = subprocess.run(
            [zviz, "--debug", "--root", "/run/zviz", "run", "--bundle", bundle, f"served-{attempt}"],
            capture_output=True, text=True, env=env, cwd="/", timeout=300,
        )
        served = [done.returncode, "slow path" not in done.stderr, done.stdout, done.stderr[-2000:]]
        if served[0] != 0 or served[1]:
            break
        time.sleep(0.5)
    facts["served"] = served
    from runtime.node import check

    facts["check_installed"] = check._apparmor("/").__dict__
    json_check = node("check", "--format", "json")
    facts["node_check"] = [
        c for c in json.loads(json_check["out"] or "{}").get("checks", []) if c["name"] == "apparmor"
    ]
    facts["uninstall"] = node("uninstall")
    facts["loaded_after_uninstall"] = loaded()
    facts["profile_after_uninstall"] = os.path.exists(profile)
    facts["check_uninstalled"] = check._apparmor("/").__dict__
except Exception as e:
    import traceback

    facts["error"] = traceback.format_exc()
report()
"""


@pytest.fixture(scope="module")
def guest():
    reason = missing_requirements()
    if reason:
        pytest.skip(f"no 6.1 guest: {reason}")
    if not shutil.which("apparmor_parser", path="/usr/sbin:/sbin"):
        pytest.skip("apparmor_parser missing (`make deps` installs apparmor)")
    install = installed()
    script = GUEST_SCRIPT.replace("@WHEEL_BIN@", repr(install.bin))
    rc, output = run_in_v2_vm(script, timeout=600)
    assert rc == 0, output[-4000:]
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-4000:]
    facts = json.loads(lines[-1][len("RESULT ") :])
    if facts["enabled"] != "Y":
        pytest.skip(f"the guest kernel runs no AppArmor (LSMs: {facts['lsm']})")
    assert "error" not in facts, facts["error"]
    facts["install"] = install
    return facts


def test_the_guest_kernel_runs_apparmor(guest):
    assert "apparmor" in guest["lsm"].split(",")


def test_install_loads_the_profiles_into_the_kernel_unconfined(guest):
    assert guest["first"]["rc"] == 0, guest["first"]["out"]
    assert "apparmor: loaded zviz-shim, zviz-zviz" in guest["first"]["out"]
    # flags=(unconfined): attached, with nothing confined
    assert guest["loaded"] == ["zviz-shim (unconfined)", "zviz-zviz (unconfined)"]
    # Debian 12's parser (3.0) knows no userns rule: the profile is written without it
    assert guest["profile"].startswith("abi <abi/3.0>,\n")
    assert "userns" not in guest["profile"]


def test_the_profiles_attach_to_the_wheel_installs_files(guest):
    realpaths = guest["realpaths"]
    # with a C compiler, both are the compiled fork-server clients, files in bin_dir
    # (each falls back to the wheel's Python entry, which its profile then runs)
    assert realpaths["shim"] == "/tmp/node-apparmor/bin/containerd-shim-zviz-v2"
    assert realpaths["zviz"] == "/tmp/node-apparmor/bin/zviz"
    assert f'profile zviz-shim "{realpaths["shim"]}" flags=(unconfined)' in guest["profile"]
    assert f'profile zviz-zviz "{realpaths["zviz"]}" flags=(unconfined)' in guest["profile"]
    # and the kernel attaches them: the shim client, exec'd by its path, runs in zviz-shim
    # (and so does the Python entry it falls back to for `-v`: the label is inherited)
    assert guest["shim_label"] == ["LABEL zviz-shim (unconfined)"]


def test_a_later_run_is_served_under_the_zviz_profile(guest):
    """The fork server compares and hashes the LSM label (runtime/forkserver.py
    INHERITED_FILES): the server the first run started has zviz's label, as the compiled
    client does, so the client reaches it and its worker's container has that label."""
    code, served, out, err = guest["served"]
    assert code == 0, err
    assert served, f"no run was served under AppArmor: {err}"
    assert out.strip() == "zviz-zviz (unconfined)"


def test_a_container_runs_under_the_zviz_profile(guest):
    container = guest["container"]
    assert container["rc"] == 0, container["err"]
    # the container's process inherited the label of the zviz that started it
    assert container["out"].strip() == "zviz-zviz (unconfined)"


def test_a_second_install_changes_nothing(guest):
    assert guest["second"]["rc"] == 0, guest["second"]["out"]
    assert "apparmor: unchanged and loaded: not reloaded" in guest["second"]["out"]
    unchanged = guest["second_changed_nothing"]
    before, after = unchanged["revision"]
    assert before == after  # no policy load at all: the kernel's policy revision stands
    assert unchanged["files"] and unchanged["profile"]


def test_node_check_reports_apparmor(guest):
    for check in (guest["check_installed"], *guest["node_check"]):
        assert check["status"] == "ok", check
        assert check["detail"].startswith("active; no kernel.apparmor_restrict_unprivileged_userns")
        assert (
            "zviz's profiles loaded: zviz-shim (unconfined), zviz-zviz (unconfined)"
            in (check["detail"])
        )
    assert len(guest["node_check"]) == 1
    assert guest["check_uninstalled"]["detail"].endswith("no zviz profile loaded")


def test_uninstall_unloads_and_removes_the_profile(guest):
    assert guest["uninstall"]["rc"] == 0, guest["uninstall"]["out"]
    assert guest["loaded_after_uninstall"] == []
    assert guest["profile_after_uninstall"] is False
