/* Syscall costs: ns per call for getpid, clock_gettime, read, write, open+close.
 * Usage: sysbench ITERATIONS  -> one JSON object on stdout. Static, so it runs in any rootfs. */
#define _GNU_SOURCE
#include <fcntl.h>
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
    long n = argc > 1 ? atol(argv[1]) : 200000;
    int zero = open("/dev/zero", O_RDONLY), null = open("/dev/null", O_WRONLY);
    char c = 0;
    struct timespec ts;
    double t0, t[5];
    t0 = now(); for (long i = 0; i < n; i++) syscall(SYS_getpid); t[0] = (now() - t0) / n;
    t0 = now(); for (long i = 0; i < n; i++) clock_gettime(CLOCK_MONOTONIC, &ts); t[1] = (now() - t0) / n;
    t0 = now(); for (long i = 0; i < n; i++) if (read(zero, &c, 1) != 1) return 1; t[2] = (now() - t0) / n;
    t0 = now(); for (long i = 0; i < n; i++) if (write(null, &c, 1) != 1) return 1; t[3] = (now() - t0) / n;
    long m = n / 10;
    t0 = now();
    for (long i = 0; i < m; i++) { int fd = open("/etc/hostname", O_RDONLY); if (fd < 0) return 1; close(fd); }
    t[4] = (now() - t0) / m;
    printf("{\"getpid\": %.1f, \"clock_gettime\": %.1f, \"read\": %.1f, \"write\": %.1f, \"open_close\": %.1f}\n",
           t[0], t[1], t[2], t[3], t[4]);
    return 0;
}
