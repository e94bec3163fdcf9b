"""The escape probes and the argument each takes (shared by the tests and the table)."""

# probe name -> (what it tries, CVE or technique)
PROBES = {
    "mount": "mount a filesystem",
    "umount": "unmount /proc (uncover what it hides)",
    "pivot_root": "pivot_root out of the rootfs",
    "chroot": "chroot (classic chroot escape start)",
    "unshare_user": "nested user namespace (unlocks namespace-root kernel attack surface)",
    "unshare_mount": "new mount namespace",
    "clone_newuser": "clone(CLONE_NEWUSER)",
    "setns": "setns into another mount namespace",
    "ptrace": "ptrace attach",
    "process_vm_writev": "write another process's memory",
    "kexec": "kexec_load a new kernel",
    "module": "load a kernel module",
    "bpf": "create a BPF map",
    "perf_event_open": "perf_event_open",
    "keyctl": "add a key to the kernel keyring",
    "userfaultfd": "userfaultfd (race-window widener in kernel exploits)",
    "open_by_handle_at": "open_by_handle_at (shocker)",
    "mknod": "mknod a disk or /dev/mem and open it",
    "raw_socket": "raw IP socket",
    "packet_socket": "AF_PACKET socket",
    "netlink_socket": "netlink socket (kernel routing interface)",
    "egress": "connect to a listener on the host's loopback",
    "proc_sys": "write /proc/sys/kernel/core_pattern",
    "sysrq": "write /proc/sysrq-trigger (absent on this kernel: ENOENT)",
    "sys_write": "write /sys (uevent_helper, else /sys/kernel/mm/ksm/run)",
    "release_agent": "cgroup v1 release_agent (CVE-2022-0492)",
    "proc_self_exe": "overwrite /proc/self/exe (CVE-2019-5736)",
    "io_uring": "io_uring_setup",
    "proc_root": "reach another root via /proc/*/root",
    "fork_bomb": "fork bomb (2000 processes)",
    "memory_bomb": "memory bomb (profile limit + 512 MiB)",
    "caps": "any capability left in CapEff/CapBnd",
    "syslog": "read the kernel log",
    "clock_settime": "set the host clock",
    "tiocsti": "TIOCSTI terminal injection",
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
