"""The escape probes: what each tries, the outcome pinned for it under each profile and
under runc, and the kernel interface it attacks (shared by the tests and the table).

Outcomes were measured on the project machine (kernel 6.18, cgroup v1, Landlock ABI 7):
an errno name, a signal name, NO_ERRNO for a check that found nothing to exploit, or
ESCAPED. A probe under zviz that ends any other way is an error, not a pass: a probe
that crashes (SIGSEGV) or meets a different errno has not shown that zviz stopped it.
"""

import os
import typing

# probe.c prints "no errno" for a check that found nothing to exploit (caps, proc_root).
NO_ERRNO = "no errno"
ESCAPED = "ESCAPED"

# The kernel answers ENOSYS for a syscall it was built without: the baseline (runc, no
# seccomp filter) meeting it means the attacked interface is missing on this kernel.
NOT_BUILT_IN = "ENOSYS"


class Interface(typing.NamedTuple):
    """What a probe attacks, named in the skip when this kernel lacks it."""

    name: str
    # Present on the host iff the kernel has the interface (None: a syscall, asked of
    # the runc baseline instead, which answers NOT_BUILT_IN without it).
    host_paths: tuple[str, ...] | None = None

    def missing_on_host(self) -> bool:
        return self.host_paths is not None and not any(map(os.path.exists, self.host_paths))


def syscall(name: str, config: str) -> Interface:
    return Interface(f"{name} syscall ({config})")


class Probe(typing.NamedTuple):
    technique: str
    # The outcome that shows the layer doing its job, per column (see module docstring).
    ci_runner: str
    hostile_tenant: str
    runc: str
    attacks: Interface | None = None

    def expected(self, profile: str | None) -> str:
        return {"ci-runner": self.ci_runner, "hostile-tenant": self.hostile_tenant}.get(
            profile, self.runc
        )


# Where the outcome is not the seccomp deny list's EPERM, the layer that answers:
# mknod under ci-runner: Landlock (EACCES; hostile-tenant denies mknod in seccomp);
# egress: a network namespace with only loopback (ECONNREFUSED; hostile-tenant too since
# it has inet sockets for its own loopback);
# netlink_route_change: the kernel (no CAP_NET_ADMIN over the network namespace);
# proc_pid_mem: Landlock (no write beneath /proc);
# proc_sys: the procfs mount's access check (EACCES); sys_write: read-only /sys (EROFS);
# proc_self_exe: the kernel refuses writes to a running executable (ETXTBSY);
# fork_bomb: the profile's pids limit (EAGAIN); memory_bomb: the OOM killer (SIGKILL).
PROBES = {
    "mount": Probe("mount a filesystem", "EPERM", "EPERM", "EPERM"),
    "umount": Probe("unmount /proc (uncover what it hides)", "EPERM", "EPERM", "EPERM"),
    "pivot_root": Probe("pivot_root out of the rootfs", "EPERM", "EPERM", "EPERM"),
    "chroot": Probe("chroot (classic chroot escape start)", "EPERM", "EPERM", "EPERM"),
    "unshare_user": Probe(
        "nested user namespace (unlocks namespace-root kernel attack surface)",
        "EPERM",
        "EPERM",
        ESCAPED,
        Interface("user namespaces", ("/proc/self/ns/user",)),
    ),
    "unshare_mount": Probe("new mount namespace", "EPERM", "EPERM", "EPERM"),
    "clone_newuser": Probe(
        "clone(CLONE_NEWUSER)",
        "EPERM",
        "EPERM",
        ESCAPED,
        Interface("user namespaces", ("/proc/self/ns/user",)),
    ),
    "setns": Probe("setns into another mount namespace", "EPERM", "EPERM", "EPERM"),
    "ptrace": Probe("ptrace attach", "EPERM", "EPERM", ESCAPED),
    "process_vm_writev": Probe("write another process's memory", "EPERM", "EPERM", ESCAPED),
    # runc's EPERM for kexec and module (no CAP_SYS_BOOT / CAP_SYS_MODULE) is inferred:
    # this kernel has neither (ENOSYS), so those tests skip here.
    "kexec": Probe(
        "kexec_load a new kernel", "EPERM", "EPERM", "EPERM", syscall("kexec_load", "CONFIG_KEXEC")
    ),
    "module": Probe(
        "load a kernel module",
        "EPERM",
        "EPERM",
        "EPERM",
        Interface("loadable modules (CONFIG_MODULES, /proc/modules)", ("/proc/modules",)),
    ),
    "bpf": Probe(
        "create a BPF map", "EPERM", "EPERM", "EPERM", syscall("bpf", "CONFIG_BPF_SYSCALL")
    ),
    "perf_event_open": Probe(
        "perf_event_open",
        "EPERM",
        "EPERM",
        ESCAPED,
        syscall("perf_event_open", "CONFIG_PERF_EVENTS"),
    ),
    "keyctl": Probe(
        "add a key to the kernel keyring",
        "EPERM",
        "EPERM",
        ESCAPED,
        syscall("add_key", "CONFIG_KEYS"),
    ),
    "userfaultfd": Probe(
        "userfaultfd (race-window widener in kernel exploits)",
        "EPERM",
        "EPERM",
        "EPERM",
        syscall("userfaultfd", "CONFIG_USERFAULTFD"),
    ),
    "open_by_handle_at": Probe(
        "open_by_handle_at (shocker)",
        "EPERM",
        "EPERM",
        "EPERM",
        syscall("open_by_handle_at", "CONFIG_FHANDLE"),
    ),
    "mknod": Probe("mknod a disk or /dev/mem and open it", "EACCES", "EPERM", "EPERM"),
    "raw_socket": Probe("raw IP socket", "EPERM", "EPERM", "EPERM"),
    "packet_socket": Probe("AF_PACKET socket", "EPERM", "EPERM", "EPERM"),
    # NETLINK_ROUTE is granted under every profile (read-only: `ip addr`, getifaddrs); the
    # other netlink protocols stay refused, changes through NETLINK_ROUTE too (the kernel:
    # no CAP_NET_ADMIN over the network namespace).
    "netlink_socket": Probe(
        "netlink socket other than NETLINK_ROUTE (netfilter)", "EPERM", "EPERM", ESCAPED
    ),
    "netlink_route_change": Probe(
        "add an address to lo over NETLINK_ROUTE", "EPERM", "EPERM", "EPERM"
    ),
    # Landlock grants /proc read only but for PID 1's own comm and oom_score_adj, one
    # rule per file: a rule on a /proc directory would open this route (issue 14
    # item 2, docs/security.md "Writes beneath /proc"; test_proc_self.py).
    "proc_pid_mem": Probe(
        "write a sibling's memory through /proc/<pid>/mem", "EACCES", "EACCES", ESCAPED
    ),
    "egress": Probe(
        "connect to a listener on the host's loopback",
        "ECONNREFUSED",
        "ECONNREFUSED",
        "ECONNREFUSED",
    ),
    "proc_sys": Probe("write /proc/sys/kernel/core_pattern", "EACCES", "EACCES", "EROFS"),
    # Not measured (this kernel has no sysrq): inferred from proc_sys, the same kind of
    # root-owned procfs file under a read-only bind, until a kernel with it runs the probe.
    "sysrq": Probe(
        "write /proc/sysrq-trigger",
        "EACCES",
        "EACCES",
        "EROFS",
        Interface("/proc/sysrq-trigger (CONFIG_MAGIC_SYSRQ)", ("/proc/sysrq-trigger",)),
    ),
    "sys_write": Probe(
        "write /sys (uevent_helper, else /sys/kernel/mm/ksm/run)",
        "EROFS",
        "EROFS",
        "EROFS",
        Interface(
            "/sys/kernel/uevent_helper or /sys/kernel/mm/ksm/run",
            ("/sys/kernel/uevent_helper", "/sys/kernel/mm/ksm/run"),
        ),
    ),
    "release_agent": Probe("cgroup v1 release_agent (CVE-2022-0492)", "EPERM", "EPERM", "EPERM"),
    "proc_self_exe": Probe(
        "overwrite /proc/self/exe (CVE-2019-5736)", "ETXTBSY", "ETXTBSY", "ETXTBSY"
    ),
    "io_uring": Probe(
        "io_uring_setup", "EPERM", "EPERM", ESCAPED, syscall("io_uring_setup", "CONFIG_IO_URING")
    ),
    "proc_root": Probe("reach another root via /proc/*/root", NO_ERRNO, NO_ERRNO, NO_ERRNO),
    "fork_bomb": Probe("fork bomb (2000 processes)", "EAGAIN", "EAGAIN", ESCAPED),
    "memory_bomb": Probe("memory bomb (profile limit + 512 MiB)", "SIGKILL", "SIGKILL", ESCAPED),
    "caps": Probe(
        "any capability left in CapEff/CapBnd beyond those the kernel confines to the "
        "user namespace (ci-runner's)",
        NO_ERRNO,
        NO_ERRNO,
        ESCAPED,
    ),
    "syslog": Probe("read the kernel log", "EPERM", "EPERM", "EPERM"),
    "clock_settime": Probe("set the host clock", "EPERM", "EPERM", "EPERM"),
    "tiocsti": Probe("TIOCSTI terminal injection", "EPERM", "EPERM", "ENOTTY"),
}

FORK_BOMB_PROCESSES = 2000


def probe_arg(name: str, profile: str | None, host_listener: str) -> str | None:
    from runtime.security.profiles import load_profile

    if name == "egress":
        return host_listener
    if name == "fork_bomb":
        return str(FORK_BOMB_PROCESSES)
    if name == "memory_bomb":
        limit = load_profile(profile or "ci-runner").memory_max or 0
        return str(limit // (1 << 20) + 512)
    return None
