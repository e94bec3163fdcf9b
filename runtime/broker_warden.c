/* zviz-warden: the seccomp broker's warden (runtime/security/broker/warden.py).
 *
 * The broker forks its warden before it takes the container's listener, and the child
 * execs this program: a forked Python warden cost ~1.1 MiB private dirty (2.5 MiB PSS)
 * a container for a poll loop; this static program costs ~0.1 MiB.
 *
 * usage: zviz-warden LAYOUT TIMEOUT_MS [-- BROKER'S ARGV...]
 *                 (fds: 3 heartbeat pipe read end, 4 broker pidfd, 5 started pipe write end)
 *        zviz-warden --layout             (prints WARDEN_LAYOUT: `zviz node check` and the
 *                                          runtime tell a binary built from other source)
 *
 * LAYOUT must be WARDEN_LAYOUT in hex (the fds and arguments below): a binary built from
 * other source refuses the call, and the broker runs its Python warden instead. What
 * follows "--" is only shown: the broker's own command line (and its environment), as
 * the forked Python warden had them, so that ps and leak checks that find a container's
 * processes by their command line (its id, the containerd address) still find it. Once the
 * arguments are taken the warden closes 0, 1 and 2, writes "ok" on fd 5 and closes it
 * (the broker waits for that; end of file without it means no C warden): it holds
 * nothing but the heartbeat pipe and the broker's pidfd (never the listener: killing the
 * broker has to close it).
 *
 * No deadline before the first beat (between create and start the broker waits for the
 * listener, and no call can be pending before it serves), then TIMEOUT_MS between beats:
 * past it, SIGKILL to the broker through its pidfd (no pid reuse) and exit 0. End of file
 * on the pipe (the broker exited) exits 0 too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* "zvw1": bumped whenever the arguments or the fds change. */
#define WARDEN_LAYOUT 0x7A767731u
#define BEATS_FD 3
#define BROKER_PIDFD 4
#define STARTED_FD 5

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--layout") == 0) {
        printf("%x\n", WARDEN_LAYOUT);
        return 0;
    }
    char layout[16];
    snprintf(layout, sizeof layout, "%x", WARDEN_LAYOUT);
    char *end = NULL;
    long timeout_ms = argc >= 3 ? strtol(argv[2], &end, 10) : -1;
    if (argc < 3 || strcmp(argv[1], layout) != 0 || end == argv[2] || *end != '\0' ||
        timeout_ms <= 0 || (argc > 3 && strcmp(argv[3], "--") != 0)) {
        fprintf(stderr, "usage: zviz-warden %s TIMEOUT_MS [-- ...] (fds 3, 4, 5)\n", layout);
        return 2;
    }
    prctl(PR_SET_NAME, "zviz-warden", 0, 0, 0);
    /* The broker's signal mask and dispositions are not the warden's: SIGTERM and SIGINT
     * end it (as they did the Python warden); SIGCHLD stays ignored (it forks nothing),
     * SIGPIPE too (the one write, "ok", fails rather than kills). */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* Closed before "ok": once the broker reads it, the warden holds only its two fds. */
    close(0);
    close(1);
    close(2);
    if (write(STARTED_FD, "ok", 2) != 2)
        return 1; /* the broker went away: nothing to guard */
    close(STARTED_FD);

    struct pollfd beats = {.fd = BEATS_FD, .events = POLLIN};
    long long deadline = -1; /* none before the first beat */
    char buffer[4096];
    for (;;) {
        int wait_ms = -1;
        if (deadline >= 0) {
            long long left = deadline - now_ms();
            wait_ms = left > 0 ? (int)left : 0;
        }
        int ready = poll(&beats, 1, wait_ms);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (ready == 0) {
            syscall(SYS_pidfd_send_signal, BROKER_PIDFD, SIGKILL, NULL, 0);
            return 0;
        }
        ssize_t got = read(BEATS_FD, buffer, sizeof buffer);
        if (got == 0)
            return 0; /* the broker exited */
        if (got < 0 && errno != EAGAIN && errno != EINTR)
            return 1;
        deadline = now_ms() + timeout_ms;
    }
}
