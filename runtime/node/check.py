"""`zviz node check`: can this node run zviz, and enforce its default profile?

One line per check, as kata-check users expect: ok, warn (zviz runs, with less) or fail
(the default profile cannot be enforced here: exit 1). Each probe asks the kernel
itself, never a version table. The Landlock and broker verdicts are kernel_gaps.decide's
(runtime/security/kernel_gaps.py), the one place they are decided.
"""

import ctypes
import errno
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

from runtime import linux
from runtime.node import containerd as containerd_config

OK, WARN, FAIL = "ok", "warn", "fail"
# cgroup controllers the runtime drives (runtime/cgroups): limits and accounting
V1_CONTROLLERS = ("memory", "pids", "cpu", "devices", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")
USERNS_SYSCTL = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
SECCOMP_GET_NOTIF_SIZES = 3


@dataclass
class Check:
    name: str
    status: str
    detail: str


def run_checks(profile_name: str | None, containerd_config_path: str) -> list[Check]:
    from runtime.security import kernel_gaps, landlock, seccomp
    from runtime.security.profiles import DEFAULT_PROFILE, load_profile

    profile = load_profile(profile_name or DEFAULT_PROFILE)
    checks = [Check("kernel", OK, f"Linux {os.uname().release}")]
    abi = landlock.abi_version()
    notify = _seccomp_user_notification()
    wait_killable_recv = seccomp.wait_killable_recv_supported() if notify else False
    gaps = kernel_gaps.decide(profile, abi, wait_killable_recv)
    checks.append(_landlock(profile, abi, [g for g in gaps if g.table == "landlock"]))
    checks.append(_notify(profile, notify, [g for g in gaps if g.table == "broker"]))
    checks.append(_pidfd_getfd(profile))
    checks += _user_namespaces()
    checks.append(_apparmor("/"))
    checks.append(_idmapped_overlay(_containerd_root(containerd_config_path)))
    checks.append(_cgroups())
    checks += _containerd(containerd_config_path)
    checks += [_fast_path(*fast_path) for fast_path in FAST_PATHS]
    checks.append(_exec_anchor())
    checks.append(_broker_warden())
    checks.append(_denial_records(abi))
    return checks


def _denial_records(abi: int) -> Check:
    """Whether this node turns denials into records (docs/denials.md); never a failure:
    enforcement does not depend on it."""
    from runtime import denials
    from runtime.security import seccomp

    if not denials.enabled():
        return Check("denial-records", WARN, f"switched off ({denials.RECORDS_SWITCH})")
    if not seccomp.kernel_logs_denials(listener=False):
        return Check(
            "denial-records", WARN, f"{seccomp.ACTIONS_LOGGED} lacks errno: no seccomp records"
        )
    try:
        denials.KernelRecords().close()
    except denials.KernelRecordsUnavailable as e:
        return Check("denial-records", WARN, f"seccomp records cannot be read: {e}")
    notes = ["seccomp denials and broker refusals"]
    if not seccomp.kernel_logs_denials(listener=True):
        notes.append("not the seccomp denials of profiles with a broker (user_notif logged)")
    missing = denials.landlock_records_missing(abi)
    if not missing:
        notes.append("Landlock denials (audit is enabled)")
    elif abi >= 7 and "disabled" in missing:
        notes.append(
            "no Landlock denials: audit is disabled (`auditctl -e 1`, or audit=1 on the "
            "kernel command line, records them; what that costs: docs/denials.md)"
        )
    else:
        notes.append(f"no Landlock denials ({missing})")
    return Check("denial-records", OK, "; ".join(notes))


def _landlock(profile, abi: int, gaps: list) -> Check:
    """GAPS: kernel_gaps.decide's Landlock verdicts."""
    from runtime.security import kernel_gaps

    if abi < 1:
        status = FAIL if profile.landlock_required else WARN
        return Check("landlock", status, f"no Landlock; profile {profile.name} requires it")
    refused = kernel_gaps.refusal(profile, gaps, abi)
    if refused:
        return Check("landlock", FAIL, f"ABI {abi}: {refused}")
    lacking = [g.feature for g in gaps if g.asked and not g.granted]
    if lacking:
        return Check(
            "landlock",
            WARN,
            f"ABI {abi}: profile {profile.name} runs without {', '.join(lacking)} (its may_lack)",
        )
    return Check("landlock", OK, f"ABI {abi}: every right profile {profile.name} asks for")


def _seccomp_user_notification() -> bool:
    """SECCOMP_GET_NOTIF_SIZES answers where the kernel has user notification (5.0)."""
    sizes = (ctypes.c_uint16 * 3)()
    try:
        linux.raw_syscall(
            "seccomp", ctypes.c_uint(SECCOMP_GET_NOTIF_SIZES), ctypes.c_uint(0), ctypes.byref(sizes)
        )
        return True
    except OSError:
        return False


def _notify(profile, notify: bool, gaps: list) -> Check:
    """GAPS: kernel_gaps.decide's broker verdicts."""
    from runtime.security import kernel_gaps

    if not notify:
        needed = profile.needs_broker(False)
        return Check(
            "seccomp-notify",
            FAIL if needed else WARN,
            "no seccomp user notification: the broker cannot mediate"
            + (f" (profile {profile.name} needs it)" if needed else ""),
        )
    refused = kernel_gaps.refusal(profile, gaps, 0)  # broker gaps: the ABI is not named
    if refused:
        return Check("seccomp-notify", FAIL, refused)
    suffix = (
        "" if all(g.granted for g in gaps) else " (no WAIT_KILLABLE_RECV: the profile may lack it)"
    )
    return Check("seccomp-notify", OK, "user notification available" + suffix)


def _pidfd_getfd(profile) -> Check:
    try:
        linux.pidfd_getfd(-1, 0)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            needed = profile.needs_broker(False)
            return Check(
                "pidfd_getfd",
                FAIL if needed else WARN,
                "missing (Linux 5.6): the broker cannot take a container's socket",
            )
    return Check("pidfd_getfd", OK, "available")


def _user_namespaces() -> list[Check]:
    checks = []
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = None
    if limit == 0:
        checks.append(Check("userns", FAIL, "user.max_user_namespaces is 0"))
    else:
        error = _in_child(lambda: linux.unshare(linux.CLONE_NEWUSER))
        if error:
            checks.append(Check("userns", FAIL, f"cannot create a user namespace: {error}"))
        else:
            checks.append(Check("userns", OK, "user namespaces can be created"))
    return checks


def _apparmor(root: str) -> Check:
    """AppArmor as it bears on zviz: whether it restricts user namespaces, and whether the
    profile `zviz node install` loads is in the kernel. ROOT: the tests' stand-in for /.

    The restriction is Ubuntu's kernel patch (kernel.apparmor_restrict_unprivileged_userns);
    other kernels with AppArmor (Debian's, on by default) have no such sysctl.
    """
    from runtime.node import install

    paths = install.Paths(root, None, None)
    if not install.apparmor_enabled(paths):
        return Check("apparmor", OK, "not active in this kernel: nothing restricts zviz")
    loaded = install.loaded_apparmor_profiles(paths)
    ours = sorted(name for name in loaded or () if name.startswith(install.APPARMOR_NAME_PREFIX))
    if loaded is None:
        profiles = "loaded profiles unknown (securityfs not mounted)"
    elif ours:
        profiles = "zviz's profiles loaded: " + ", ".join(f"{n} ({loaded[n]})" for n in ours)
    else:
        profiles = "no zviz profile loaded"
    try:
        with open(paths.under(USERNS_SYSCTL)) as f:
            restricted = f.read().strip() == "1"
    except OSError:
        return Check(
            "apparmor",
            OK,
            "active; no kernel.apparmor_restrict_unprivileged_userns (an Ubuntu kernel "
            f"patch): user namespaces are not restricted; {profiles}",
        )
    if not restricted:
        return Check(
            "apparmor", OK, f"kernel.apparmor_restrict_unprivileged_userns = 0; {profiles}"
        )
    if ours:
        return Check(
            "apparmor", OK, f"kernel.apparmor_restrict_unprivileged_userns = 1; {profiles}"
        )
    return Check(
        "apparmor",
        WARN,
        f"kernel.apparmor_restrict_unprivileged_userns = 1 and {profiles}: `zviz node install` "
        "installs the AppArmor profile that allows zviz's user namespaces",
    )


def _containerd_root(config_path: str) -> str | None:
    """Where containerd keeps its snapshots (its `root`), when that directory exists."""
    try:
        _text, data = containerd_config.read_config(config_path)
    except containerd_config.ConfigRefused:
        data = {}
    root = data.get("root", "/var/lib/containerd")
    return root if isinstance(root, str) and os.path.isdir(root) else None


def _idmapped_overlay(directory: str | None) -> Check:
    """An id-mapped overlay, as zviz builds over containerd's snapshots (runtime/idmap.py).

    Tried on the filesystem containerd's snapshots live on (its root directory), since
    id-mapping support is per filesystem (tmpfs has it only from Linux 6.3).
    """
    if os.geteuid() != 0:
        return Check("idmapped-overlay", WARN, "not root: not tried")
    from runtime import idmap

    work = tempfile.mkdtemp(prefix="zviz-node-check-", dir=directory)
    where = f"on the filesystem of {directory or os.path.dirname(work)}"
    try:
        for name in ("lower", "upper", "work", "merged"):
            os.mkdir(os.path.join(work, name))
        with open(os.path.join(work, "lower", "file"), "w"):
            pass
        userns_holder = _hold_user_namespace(100000)
        if isinstance(userns_holder, str):
            return Check("idmapped-overlay", FAIL, userns_holder)
        pid, userns = userns_holder
        try:

            def mount_and_stat():
                # In a private mount namespace: the mount dies with the child.
                linux.unshare(linux.CLONE_NEWNS)
                linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
                layers = {
                    "lowerdir": [os.path.join(work, "lower")],
                    "upperdir": os.path.join(work, "upper"),
                    "workdir": os.path.join(work, "work"),
                    "options": [],
                }
                tree = idmap._idmapped_overlay(layers, userns, 100000, 100000)
                merged = os.path.join(work, "merged")
                linux.move_mount(tree, "", linux.AT_FDCWD, merged, linux.MOVE_MOUNT_F_EMPTY_PATH)
                owner = os.stat(os.path.join(merged, "file")).st_uid
                if owner != 100000:
                    raise OSError(errno.EINVAL, f"file shows uid {owner}, not 100000")

            error = _in_child(mount_and_stat)
        finally:
            os.close(userns)
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if error:
        # zviz still runs (runtime/idmap.py logs it), but a container's root cannot
        # write an image's files: they show as unmapped.
        return Check(
            "idmapped-overlay",
            WARN,
            f"{where}: id-mapped overlay failed ({error}): containers' root sees image "
            "files as nobody's and cannot write them",
        )
    return Check("idmapped-overlay", OK, f"{where}: id-mapped overlay layers work")


def _hold_user_namespace(host_id: int):
    """(pid, userns fd) of a child holding a user namespace mapping 0 to HOST_ID; or an error."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            linux.unshare(linux.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.pause()
        finally:
            os._exit(0)
    os.close(ready_w)
    ok = os.read(ready_r, 1)
    os.close(ready_r)
    try:
        if not ok:
            raise OSError(errno.EPERM, "the child could not create a user namespace")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 {host_id} 65536\n")
        return pid, os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return f"cannot map a user namespace: {e}"


def _in_child(action) -> str | None:
    """Run ACTION in a forked child (namespaces it enters stay there); its error, or None."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_fd)
            action()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(write_fd, str(e).encode()[:1000])
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return message or f"exit status {status}"
    return None


def _cgroups() -> Check:
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            have = set(f.read().split())
        missing = [c for c in V2_CONTROLLERS if c not in have]
        version = "v2 (unified)"
    else:
        try:
            have = set(os.listdir("/sys/fs/cgroup"))
        except OSError:
            return Check("cgroups", FAIL, "no /sys/fs/cgroup")
        missing = [c for c in V1_CONTROLLERS if c not in have]
        version = "v1" + (" (hybrid)" if "unified" in have else "")
    if missing:
        return Check("cgroups", WARN, f"{version}: missing {', '.join(missing)}: those limits fail")
    needed = V2_CONTROLLERS if version.startswith("v2") else V1_CONTROLLERS
    return Check("cgroups", OK, f"{version}: {', '.join(needed)}")


def _containerd(config_path: str) -> list[Check]:
    version = containerd_config.containerd_version()
    if version is None:
        return [Check("containerd", WARN, "not found on PATH: only `zviz run` is usable")]
    checks = [Check("containerd", OK, f"version {version}")]
    try:
        found, why = containerd_config.registered(config_path)
    except containerd_config.ConfigRefused as e:
        return checks + [Check("containerd-config", WARN, str(e))]
    checks.append(
        Check(
            "containerd-config",
            OK if found else WARN,
            why if found else f"{why}: run `zviz node install`",
        )
    )
    return checks


# Each compiled fork-server client node check reports: (check name, program, what its
# Python entry costs each time).
FAST_PATHS = (
    ("fast-path", "zviz", "every `zviz run` starts Python"),
    (
        "shim-fast-path",
        "containerd-shim-zviz-v2",
        "every container's shim `start` and `delete` start Python",
    ),
)


def _fast_path(name: str = "fast-path", program: str = "zviz", cost: str = "") -> Check:
    """Whether PROGRAM on PATH is the compiled fork-server client (runtime/forkserver.py)."""
    from runtime.node.install import scripts_dir

    path = shutil.which(program) or os.path.join(scripts_dir(), program)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return Check(name, WARN, f"{path}: {e.strerror}: run `zviz node install`")
    if magic == b"\x7fELF":
        return Check(name, OK, f"{path} is the compiled client")
    return Check(
        name,
        WARN,
        f"{path} is the Python entry: {cost or 'it starts Python'} (the slow path, "
        "~10 ms more); `zviz node install` compiles the client when a C compiler is present",
    )


def _exec_anchor() -> Check:
    """Whether execs will reach PID 1 (`kubectl exec ... > /proc/1/fd/1`): the exec anchor
    built for this install's request layout (runtime/exec_anchor.py). Never a failure:
    execs work without it, in a Landlock domain of their own."""
    from runtime import exec_anchor

    return _static_program(
        "exec-anchor",
        exec_anchor,
        exec_anchor.MAGIC,
        "execs run in PID 1's Landlock domain (they can write /proc/1/fd/1 and read"
        " /proc/1/environ)",
        "execs get a Landlock domain of their own and cannot write /proc/1/fd/1 or read"
        " /proc/1/environ",
    )


def _broker_warden() -> Check:
    """Whether each seccomp broker's warden is the static program (~0.1 MiB) rather than
    a fork of the broker (~1 MiB): runtime/security/broker/warden.py. Never a failure:
    the Python warden does the same."""
    from runtime.security.broker import warden

    return _static_program(
        "broker-warden",
        warden,
        warden.LAYOUT,
        "each seccomp broker's warden is this static program",
        "each seccomp broker forks a Python warden (~1 MiB more a container)",
    )


def _static_program(label: str, program, layout: int, with_it: str, without_it: str) -> Check:
    """PROGRAM (a module with binary_path) built for LAYOUT: OK, else a warning."""
    from runtime import static_programs

    path = program.binary_path()
    if not os.path.exists(path):
        problem = f"no {path}"
    elif static_programs.built_layout(path) != layout:
        problem = f"{path} is built from another version's source"
    else:
        return Check(label, OK, f"{path}: {with_it}")
    return Check(label, WARN, f"{problem}: {without_it}; {static_programs.BUILD_HINT}")


def report(checks: list[Check], fmt: str) -> str:
    if fmt == "json":
        import json

        return json.dumps({"checks": [asdict(c) for c in checks], "ok": passed(checks)}, indent=2)
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.status:4}  {c.name:{width}}  {c.detail}" for c in checks)


def passed(checks: list[Check]) -> bool:
    return not any(c.status == FAIL for c in checks)
