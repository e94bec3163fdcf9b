/* The cost of one call a profile denies, and of one it allows (bench/denials.py).
 * Usage: denybench ALLOWED DENIED  -> one JSON object on stdout, ns per call:
 *   allowed   getppid (every profile allows it)
 *   seccomp   unshare(CLONE_NEWNET): ci-runner's seccomp filter denies it (EPERM); a
 *             container without CAP_SYS_ADMIN (runc's default) gets EPERM from the
 *             capability check instead, with no filter involved
 *   landlock  open(O_CREAT) of a file in /etc: outside ci-runner's writable paths,
 *             Landlock answers EACCES; elsewhere it succeeds (and is closed)
 * and the errno each denied call returned (0: it succeeded). Static: runs in any rootfs. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    long allowed = argc > 1 ? atol(argv[1]) : 1000000;
    long denied = argc > 2 ? atol(argv[2]) : 20000;
    double t0 = now();
    for (long i = 0; i < allowed; i++) syscall(SYS_getppid);
    double t1 = now();
    int seccomp_errno = 0;
    for (long i = 0; i < denied; i++)
        if (syscall(SYS_unshare, CLONE_NEWNET) < 0) seccomp_errno = errno;
    double t2 = now();
    int landlock_errno = 0;
    for (long i = 0; i < denied; i++) {
        int fd = open("/etc/zviz-denybench", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        if (fd < 0) landlock_errno = errno;
        else close(fd);
    }
    double t3 = now();
    unlink("/etc/zviz-denybench");
    printf("{\"allowed\": %.1f, \"seccomp\": %.1f, \"landlock\": %.1f, "
           "\"seccomp_errno\": %d, \"landlock_errno\": %d}\n",
           (t1 - t0) / allowed, (t2 - t1) / denied, (t3 - t2) / denied, seccomp_errno,
           landlock_errno);
    return 0;
}
