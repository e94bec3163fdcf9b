"""Seccomp argument checks and fds, probed from inside real containers.

One static C program (built once per source version) tries the argument-level
tricks a filter can miss: x32 numbers (nr | 0x40000000) and i386 `int 0x80`,
clone3 and clone with namespace flags plus high garbage bits, personality
flags, SOCK_RAW with SOCK_CLOEXEC/SOCK_NONBLOCK or high bits, other socket
families, TIOCSTI with high bits, TIOCLINUX, TIOCSETD, syscalls newer than the
profile (listmount, statmount, mseal), and lists every fd it holds beyond
stdio. Each line is BLOCKED or ESCAPED.
"""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile

import pytest

from integration.ids import tagged, unique_id
from tools.mkbundle import build_bundle

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/ioctl.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/sched.h>

static void report(const char *name, long rc, int err, int want_fail) {
    if (rc < 0) printf("%s %s errno %d\n", want_fail ? "BLOCKED" : "ERROR", name, err);
    else printf("%s %s rc %ld\n", want_fail ? "ESCAPED" : "OK", name, rc);
}

static int in_child(void (*fn)(void)) {
    pid_t pid = fork();
    if (pid == 0) { fn(); _exit(0); }
    int status; waitpid(pid, &status, 0);
    return status;
}
static void x32_getpid(void) { long r = syscall(39 | 0x40000000); printf("x32 rc %ld errno %d\n", r, errno); fflush(stdout); }
static void i386_getpid(void) { long r; __asm__ volatile ("int $0x80" : "=a"(r) : "a"(20) : "memory"); printf("i386 rc %ld\n", r); fflush(stdout); }

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "all";
    long r;
    if (!strcmp(what, "all") || !strcmp(what, "arch")) {
        int st = in_child(x32_getpid);
        printf("%s x32 status %d\n", WIFSIGNALED(st) ? "BLOCKED" : "ESCAPED", st);
        st = in_child(i386_getpid);
        printf("%s i386 status %d\n", WIFSIGNALED(st) ? "BLOCKED" : "ESCAPED", st);
    }
    errno = 0; r = syscall(SYS_clone3, NULL, 0); report("clone3", r, errno, 1);
    errno = 0; r = syscall(SYS_clone, (unsigned long)(CLONE_NEWUSER | SIGCHLD) | (1UL << 40), 0, 0, 0, 0);
    if (r == 0) _exit(0);
    report("clone_newuser_highbits", r, errno, 1);
    errno = 0; r = syscall(SYS_clone, (unsigned long)(CLONE_NEWNS | SIGCHLD), 0, 0, 0, 0);
    if (r == 0) _exit(0);
    report("clone_newns", r, errno, 1);
    errno = 0; r = syscall(SYS_personality, 0x0400000UL); report("personality_read_implies_exec", r, errno, 1);
    errno = 0; r = syscall(SYS_personality, 0x0040000UL); report("personality_addr_no_randomize", r, errno, 1);
    errno = 0; r = syscall(SYS_personality, (1UL << 32) | 0x0400000UL); report("personality_highbits", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, AF_INET, SOCK_RAW | SOCK_CLOEXEC, 1); report("sock_raw_cloexec", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, AF_INET, SOCK_RAW | SOCK_NONBLOCK, 1); report("sock_raw_nonblock", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, AF_INET | (1UL << 32), SOCK_RAW, 1); report("sock_raw_highfamily", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, AF_INET, SOCK_RAW | (1UL << 32), 1); report("sock_raw_hightype", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, AF_PACKET, SOCK_DGRAM, 0); report("af_packet_dgram", r, errno, 1);
    /* NETLINK_ROUTE (0) is granted, read-only (issue 14): the other protocols stay out,
     * also with garbage above the 32 bits the kernel reads of the protocol. */
    errno = 0; r = syscall(SYS_socket, AF_NETLINK, SOCK_RAW, 6); report("netlink_xfrm", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, AF_NETLINK, SOCK_DGRAM, 4); report("netlink_sock_diag_dgram", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, AF_NETLINK, SOCK_RAW, (1UL << 32) | 12); report("netlink_netfilter_highbits", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, AF_NETLINK, SOCK_DGRAM, 9); report("netlink_audit_dgram", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, 40 /*AF_VSOCK*/, SOCK_STREAM, 0); report("af_vsock", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, 38 /*AF_ALG*/, SOCK_SEQPACKET, 0); report("af_alg", r, errno, 1);
    errno = 0; r = syscall(SYS_socket, 5 /*AF_APPLETALK*/, SOCK_DGRAM, 0); report("af_appletalk", r, errno, 1);
    int pt = open("/dev/ptmx", O_RDWR | O_NOCTTY);
    if (pt >= 0) {
        char c = 'x';
        errno = 0; r = syscall(SYS_ioctl, pt, 0x5412UL | (1UL << 32), &c); report("tiocsti_highbits", r, errno, 1);
        errno = 0; r = syscall(SYS_ioctl, pt, 0x5412UL, &c); report("tiocsti", r, errno, 1);
        char sub[2] = {2, 0};
        errno = 0; r = syscall(SYS_ioctl, pt, 0x541CUL, sub); report("tioclinux", r, errno, 1);
        int ld = 21; /* N_GSM */
        errno = 0; r = syscall(SYS_ioctl, pt, 0x5423UL /*TIOCSETD*/, &ld); report("tiocsetd_gsm", r, errno, 1);
        close(pt);
    }
    errno = 0; r = syscall(1000, 0, 0); report("nr_1000", r, errno, 1);
    errno = 0; r = syscall(SYS_unshare, CLONE_NEWUSER); report("unshare_user", r, errno, 1);
    errno = 0; r = syscall(SYS_open_tree, -100, "/", 1); report("open_tree", r, errno, 1);
    errno = 0; r = syscall(SYS_fsopen, "tmpfs", 0); report("fsopen", r, errno, 1);
    errno = 0; r = syscall(SYS_kcmp, getpid(), 1, 0, 0, 0); report("kcmp", r, errno, 1);
    errno = 0; r = syscall(SYS_fanotify_init, 0, 0); report("fanotify_init", r, errno, 1);
    errno = 0; r = syscall(SYS_modify_ldt, 0, 0, 0); report("modify_ldt", r, errno, 1);
    errno = 0; r = syscall(SYS_memfd_secret, 0); report("memfd_secret", r, errno, 1);
    errno = 0; r = syscall(457 /*statmount*/, 0,0,0,0); report("statmount", r, errno, 1);
    errno = 0; r = syscall(458 /*listmount*/, 0,0,0,0); report("listmount", r, errno, 1);
    errno = 0; r = syscall(462 /*mseal*/, 0,0,0); report("mseal", r, errno, 1);
    errno = 0; r = syscall(SYS_prctl, 35 /*PR_SET_MM*/, 1, 0, 0, 0); report("prctl_set_mm", r, errno, 1);
    errno = 0; r = syscall(SYS_setgroups, 0, NULL); report("setgroups", r, errno, 1);
    /* fds */
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e; int dfd = dirfd(d);
    while ((e = readdir(d))) {
        int n = atoi(e->d_name);
        if (e->d_name[0] == '.' || n <= 2 || n == dfd) continue;
        char p[64], t[256] = {0}; snprintf(p, sizeof p, "/proc/self/fd/%d", n);
        readlink(p, t, sizeof t - 1);
        printf("ESCAPED leaked_fd %d -> %s\n", n, t);
    }
    return 0;
}
"""

CACHE = os.path.join(tempfile.gettempdir(), "zviz-audit-probes")


@pytest.fixture(scope="module")
def audit_bin() -> str:
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    path = os.path.join(CACHE, f"audit-{digest}")
    if not os.path.exists(path):
        gcc = shutil.which("gcc")
        if gcc is None:
            pytest.skip("gcc missing: the audit probe is a C program (apt-get install gcc)")
        os.makedirs(CACHE, exist_ok=True)
        source = f"{path}.{os.getpid()}.c"
        with open(source, "w") as f:
            f.write(SOURCE)
        tmp = f"{path}.{os.getpid()}.tmp"
        subprocess.run([gcc, "-static", "-O2", "-w", "-o", tmp, source], check=True)
        os.unlink(source)
        os.rename(tmp, path)
    return path


@pytest.fixture
def base():
    path = tempfile.mkdtemp(prefix=tagged("zviz-audit-sc") + "-")
    os.chmod(path, 0o755)  # the mapped container root must reach the bundle
    yield path
    shutil.rmtree(path, ignore_errors=True)


# What stops each trick (an errno name, or the signal that killed the child): anything
# else fails, so a trick that crashes (SIGSEGV) or meets another errno is not 'blocked'.
# Measured under both profiles on the project machine (kernel 6.18).
EXPECTED = {
    # seccomp's architecture check kills foreign-ABI calls (SECCOMP_RET_KILL_PROCESS).
    "x32": "SIGSYS",
    "i386": "SIGSYS",
    # ENOSYS, not EPERM: so that libc falls back to clone(), whose flags are filtered.
    "clone3": "ENOSYS",
    "clone_newuser_highbits": "EPERM",
    "clone_newns": "EPERM",
    "personality_read_implies_exec": "EPERM",
    "personality_addr_no_randomize": "EPERM",
    "personality_highbits": "EPERM",
    "sock_raw_cloexec": "EPERM",
    "sock_raw_nonblock": "EPERM",
    "sock_raw_highfamily": "EPERM",
    "sock_raw_hightype": "EPERM",
    "af_packet_dgram": "EPERM",
    "netlink_xfrm": "EPERM",
    "netlink_sock_diag_dgram": "EPERM",
    "netlink_netfilter_highbits": "EPERM",
    "netlink_audit_dgram": "EPERM",
    "af_vsock": "EPERM",
    "af_alg": "EPERM",
    "af_appletalk": "EPERM",
    "tiocsti_highbits": "EPERM",
    "tiocsti": "EPERM",
    # These two are the kernel's answers on a pty (no VT console; no N_GSM line
    # discipline here), given before or without the filter: they show the call did
    # not succeed, not that zviz stopped it.
    "tioclinux": "ENOTTY",
    "tiocsetd_gsm": "EINVAL",
    "nr_1000": "EPERM",
    "unshare_user": "EPERM",
    "open_tree": "EPERM",
    "fsopen": "EPERM",
    "kcmp": "EPERM",
    "fanotify_init": "EPERM",
    "modify_ldt": "EPERM",
    "memfd_secret": "EPERM",
    "statmount": "EPERM",
    "listmount": "EPERM",
    "mseal": "EPERM",
    "prctl_set_mm": "EPERM",
    "setgroups": "EPERM",
}


def blocked_by(rest: str) -> tuple[str, str]:
    """("x32", "SIGSYS") from "x32 status 31"; ("kcmp", "EPERM") from "kcmp errno 1"."""
    name, how, number = rest.split(" ")[:3]
    if how == "status":  # a wait status: the child was killed by a signal
        return name, signal.Signals(int(number) & 0x7F).name
    return name, errno.errorcode.get(int(number), f"errno {number}")


@pytest.mark.parametrize("profile", ["ci-runner", "hostile-tenant"])
def test_argument_tricks_are_blocked_and_no_fd_leaks(zviz_bin, audit_bin, base, profile):
    bundle = os.path.join(base, "bundle")
    build_bundle(bundle, args=["/audit"])
    shutil.copy2(audit_bin, os.path.join(bundle, "rootfs", "audit"))
    root = os.path.join(base, "root")
    cid = unique_id("zviz-audit")
    try:
        result = subprocess.run(
            [zviz_bin, "--root", root, "run", "--profile", profile, "--bundle", bundle, cid],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    finally:
        subprocess.run([zviz_bin, "--root", root, "delete", "-f", cid], capture_output=True)
    assert result.returncode == 0, result.stderr
    verdicts = {}
    for line in result.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("BLOCKED", "ESCAPED", "ERROR", "OK"):
            verdicts.setdefault(word, []).append(rest)
    assert "ESCAPED" not in verdicts, verdicts.get("ESCAPED")
    blocked = dict(blocked_by(rest) for rest in verdicts.get("BLOCKED", []))
    assert blocked == EXPECTED, (
        {name: blocked.get(name) for name in EXPECTED if blocked.get(name) != EXPECTED[name]},
        result.stdout,
    )
