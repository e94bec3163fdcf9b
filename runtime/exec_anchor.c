/* zviz-anchor: the process an exec is forked from, inside the container.
 *
 * PID 1 forks it after its security layers are applied and execs this program through
 * an fd it opened before pivot_root, so it holds PID 1's Landlock domain, seccomp
 * filter, ids, capabilities, no_new_privs, cgroup and namespaces. An exec it forks is in
 * PID 1's Landlock domain, not a sibling of it: it may open /proc/1/fd/N and read
 * /proc/1/environ as the same user could under runc (docs/architecture.md, "An exec and
 * PID 1's Landlock domain").
 *
 * usage: zviz-anchor SOCKET_FD EXPECTED_UID OUTSIDE_PIDNS PARENT_PID
 *        zviz-anchor --stand-in CHANNEL_FD PIDFD
 *        zviz-anchor --layout      (prints ANCHOR_MAGIC: `zviz node check` tells a binary
 *                                   built from other source, whose requests would fail)
 *
 * SOCKET_FD: a bound SOCK_DGRAM unix socket (its path is in the container's state dir,
 * outside the container's root) with SO_PASSCRED set by the runtime. Only datagrams
 * whose sender appears here as EXPECTED_UID (host root as this user namespace sees it)
 * and, when OUTSIDE_PIDNS is 1, with pid 0 (outside this pid namespace) are served.
 *
 * A request is one datagram: struct request, then NUL-terminated strings: cwd, argc
 * argument strings, envc environment strings; SCM_RIGHTS carries one fd: the reply
 * channel (a SOCK_SEQPACKET end). The anchor forks a monitor per request and goes back
 * to waiting. The monitor says "ready" at once (the runtime gives up on an anchor that
 * does not: the workload may have stopped it, and then nothing has run), receives
 * "stdio" with stdin, stdout and stderr (SCM_RIGHTS: they travel only to a monitor that
 * answered, so a stopped anchor's queue holds no end of the exec's output pipes), waits
 * for "go", forks the exec and answers, each one message: "pid N" (the exec's pid in
 * this pid namespace, once its execve succeeded) or "error ERRNO STAGE", then "exit
 * STATUS" (a wait status). It keeps the exec unreaped until the channel closes, so the
 * pid stays the exec's while the runtime opens a pidfd of it. The channel closing
 * before the exec exited kills the exec.
 *
 * Every syscall the anchor makes is one the strictest built-in profile (hostile-tenant)
 * allows: no accept, getsockopt, execveat or pidfd_open.
 *
 * --stand-in: the runtime's process the caller knows as the exec (outside every layer
 * of the container's, host root), once the exec runs: forwards every catchable signal
 * to PIDFD (the exec) and exits as the exec did when "exit STATUS" comes on CHANNEL_FD,
 * a signal death re-raised on itself. The runtime execs it so that a running exec costs
 * a static C process rather than a fork of the Python caller.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

/* "zva2": the second layout (stdio after "ready"). An anchor built from other source
 * drops a request with another magic unanswered: the runtime falls back at once. */
#define ANCHOR_MAGIC 0x7a766132u
#define FLAG_TERMINAL 1u
#define FLAG_UMASK 2u
#define REQUEST_FDS 1
#define STDIO_FDS 3
#define MAX_REQUEST (256 * 1024)
#define MAX_STRINGS 8192
/* What runc and the runtime search when the exec's env has no PATH. */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

struct request {
    uint32_t magic;
    uint32_t flags;
    uint32_t umask;
    uint32_t argc;
    uint32_t envc;
};

static char buffer[MAX_REQUEST + 1];

static void close_from(int low) {
    syscall(SYS_close_range, (unsigned)low, ~0u, 0u);
}

static void say(int channel, const char *text) {
    /* A reply the runtime no longer reads changes nothing here. */
    ssize_t ignored = write(channel, text, strlen(text));
    (void)ignored;
}

/* Child of the monitor: becomes the exec. Reports (stage, errno) on REPORT if it cannot. */
static void become_exec(int report, const struct request *req, int stdio[3], char *cwd,
                        char **argv, char **envp) {
    const char *stage = "signals";
    sigset_t none;
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL); /* SIGKILL, SIGSTOP and the invalid ones just fail */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    stage = "terminal";
    if (req->flags & FLAG_TERMINAL) {
        if (setsid() < 0 || ioctl(stdio[0], TIOCSCTTY, 0) < 0)
            goto fail;
    }
    stage = "stdio";
    /* The received fds may have any numbers, 0-2 included: out of the way first. */
    int high[3];
    for (int i = 0; i < 3; i++) {
        high[i] = fcntl(stdio[i], F_DUPFD_CLOEXEC, 10);
        if (high[i] < 0)
            goto fail;
    }
    for (int i = 0; i < 3; i++) {
        if (dup2(high[i], i) < 0)
            goto fail;
    }
    if (req->flags & FLAG_UMASK)
        umask(req->umask);
    stage = "cwd";
    if (chdir(cwd) < 0)
        goto fail;
    stage = "exec";
    /* Everything but stdio and the report pipe (CLOEXEC) goes at execve. */
    syscall(SYS_close_range, 3u, ~0u, 4u /* CLOSE_RANGE_CLOEXEC */);
    if (strchr(argv[0], '/')) {
        execve(argv[0], argv, envp);
        goto fail;
    }
    /* PATH from the exec's own environment, as runc looks it up. */
    const char *path = DEFAULT_PATH;
    for (char **e = envp; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0)
            path = *e + 5;
    int saved = ENOENT;
    static char candidate[4096];
    while (1) {
        const char *end = strchrnul(path, ':');
        size_t dir_len = end - path;
        const char *dir = dir_len ? path : ".";
        if (!dir_len)
            dir_len = 1;
        if (dir_len + 1 + strlen(argv[0]) < sizeof candidate) {
            memcpy(candidate, dir, dir_len);
            candidate[dir_len] = '/';
            strcpy(candidate + dir_len + 1, argv[0]);
            execve(candidate, argv, envp);
            if (errno == EACCES)
                saved = EACCES; /* as execvp: a later ENOENT does not hide it */
            else if (errno != ENOENT && errno != ENOTDIR)
                saved = errno;
        }
        if (!*end)
            break;
        path = end + 1;
    }
    errno = saved;
fail:;
    char text[64];
    int n = snprintf(text, sizeof text, "%d %s", errno, stage);
    ssize_t ignored = write(report, text, n);
    (void)ignored;
    _exit(127);
}

static void on_child(int sig) {
    (void)sig; /* only interrupts ppoll */
}

/* The "stdio" message: its three fds into STDIO; -1 if it is not that (the runtime gave up). */
static int receive_stdio(int channel, int stdio[STDIO_FDS]) {
    char word[8];
    struct iovec iov = {word, sizeof word};
    union {
        char space[CMSG_SPACE(sizeof(int) * STDIO_FDS)];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof control.space;
    ssize_t n;
    do
        n = recvmsg(channel, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    int got = 0;
    for (struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&msg) : NULL; c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *fds = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (got < STDIO_FDS)
                stdio[got++] = fds[i];
            else
                close(fds[i]);
        }
    }
    if (n == 5 && memcmp(word, "stdio", 5) == 0 && got == STDIO_FDS &&
        !(msg.msg_flags & MSG_CTRUNC))
        return 0;
    for (int i = 0; i < got; i++)
        close(stdio[i]);
    return -1;
}

/* The monitor of one request: answers "ready", takes the stdio, waits for "go", forks
 * the exec, answers, waits. */
static void monitor(int channel, const struct request *req, char *cwd, char **argv, char **envp) {
    int stdio[STDIO_FDS];
    say(channel, "ready");
    if (receive_stdio(channel, stdio) < 0)
        _exit(0); /* the runtime gave up on this anchor: nothing runs */
    char word[8];
    ssize_t n = read(channel, word, sizeof word);
    if (n != 2 || memcmp(word, "go", 2) != 0)
        _exit(0); /* the runtime gave up before start */

    struct sigaction action = {0};
    action.sa_handler = on_child;
    sigaction(SIGCHLD, &action, NULL);
    sigset_t chld, old;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, &old);

    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0) {
        char text[64];
        snprintf(text, sizeof text, "error %d fork", errno);
        say(channel, text);
        _exit(0);
    }
    pid_t exec_pid = fork();
    if (exec_pid < 0) {
        char text[64];
        snprintf(text, sizeof text, "error %d fork", errno);
        say(channel, text);
        _exit(0);
    }
    if (exec_pid == 0) {
        close(channel);
        close(report[0]);
        become_exec(report[1], req, stdio, cwd, argv, envp);
    }
    close(report[1]);
    for (int i = 0; i < 3; i++)
        close(stdio[i]);
    char failure[64];
    ssize_t got;
    do
        got = read(report[0], failure, sizeof failure - 1);
    while (got < 0 && errno == EINTR);
    close(report[0]);
    if (got > 0) {
        failure[got] = 0;
        char text[96];
        snprintf(text, sizeof text, "error %s", failure);
        waitpid(exec_pid, NULL, 0);
        say(channel, text);
        _exit(0);
    }
    char text[64];
    snprintf(text, sizeof text, "pid %d", (int)exec_pid);
    say(channel, text);

    sigset_t waiting = old;
    sigdelset(&waiting, SIGCHLD);
    while (1) {
        siginfo_t info = {0};
        if (waitid(P_PID, exec_pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid) {
            int status = info.si_code == CLD_EXITED   ? (info.si_status & 0xff) << 8
                         : info.si_code == CLD_DUMPED ? (info.si_status | 0x80)
                                                      : info.si_status;
            snprintf(text, sizeof text, "exit %d", status);
            say(channel, text);
            /* Reaped only once the runtime let the channel go (it holds a pidfd). */
            struct pollfd done = {channel, POLLIN, 0};
            while (poll(&done, 1, -1) > 0 && read(channel, word, sizeof word) > 0)
                ;
            waitpid(exec_pid, NULL, 0);
            _exit(0);
        }
        struct pollfd fds = {channel, POLLIN, 0};
        int ready = ppoll(&fds, 1, NULL, &waiting);
        if (ready > 0) {
            n = read(channel, word, sizeof word);
            if (n <= 0) {
                /* The runtime's stand-in is gone (killed): so is the exec. */
                kill(exec_pid, SIGKILL);
                waitpid(exec_pid, NULL, 0);
                _exit(0);
            }
        }
    }
}

/* The strings of a request: cwd, then argv, then envp, each NUL-terminated. */
static int split(char *data, size_t size, const struct request *req, char **cwd, char ***argv,
                 char ***envp) {
    if (req->argc < 1 || req->argc > MAX_STRINGS || req->envc > MAX_STRINGS)
        return -1;
    char **list = calloc(req->argc + req->envc + 2, sizeof(char *));
    if (!list)
        return -1;
    size_t want = 1 + req->argc + req->envc, found = 0;
    char *p = data, *end = data + size;
    while (p < end && found < want) {
        char *nul = memchr(p, 0, end - p);
        if (!nul)
            break;
        if (found == 0)
            *cwd = p;
        else if (found <= req->argc)
            list[found - 1] = p;
        else
            list[found] = p; /* argv's NULL sits at index argc */
        found++;
        p = nul + 1;
    }
    if (found != want || p != end) {
        free(list);
        return -1;
    }
    *argv = list;
    *envp = list + req->argc + 1;
    return 0;
}

static int exec_pidfd = -1;

static void forward(int sig) {
    int saved = errno;
    syscall(SYS_pidfd_send_signal, exec_pidfd, sig, NULL, 0);
    errno = saved;
}

static int stand_in(int channel, int pidfd) {
    prctl(PR_SET_DUMPABLE, 0);
    prctl(PR_SET_NAME, "zviz-exec");
    exec_pidfd = pidfd;
    /* It waits on the channel: whatever mode the runtime's socket had. */
    fcntl(channel, F_SETFL, fcntl(channel, F_GETFL) & ~O_NONBLOCK);
    struct sigaction action = {0};
    action.sa_handler = forward;
    action.sa_flags = SA_RESTART;
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP && sig != SIGCHLD)
            sigaction(sig, &action, NULL); /* glibc's reserved ones just fail */
    /* The runtime blocked them until now: what came meanwhile is forwarded here. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    char answer[64];
    ssize_t n;
    do
        n = read(channel, answer, sizeof answer - 1);
    while (n < 0 && errno == EINTR);
    if (n <= 5 || memcmp(answer, "exit ", 5) != 0)
        return 255; /* the monitor was killed: the exec's status is lost */
    answer[n] = 0;
    int status = atoi(answer + 5);
    close(channel); /* the monitor reaps the exec now */
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        signal(sig, SIG_DFL);
        sigset_t just;
        sigemptyset(&just);
        sigaddset(&just, sig);
        sigprocmask(SIG_UNBLOCK, &just, NULL);
        kill(getpid(), sig);
        return 128 + sig; /* a signal whose default is not to terminate */
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 255;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "--stand-in") == 0)
        return stand_in(atoi(argv[2]), atoi(argv[3]));
    if (argc == 2 && strcmp(argv[1], "--layout") == 0) {
        printf("%#x\n", ANCHOR_MAGIC);
        return 0;
    }
    if (argc != 5)
        return 2;
    int sock = atoi(argv[1]);
    uid_t expected_uid = (uid_t)strtoul(argv[2], NULL, 10);
    int outside_pidns = atoi(argv[3]);
    pid_t parent = (pid_t)atoi(argv[4]);

    /* Not dumpable: the workload runs as the same user and must not write this
     * process's memory through /proc/<pid>/mem, nor reach its fds. */
    prctl(PR_SET_DUMPABLE, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        return 0; /* PID 1 died before PDEATHSIG was set */
    prctl(PR_SET_NAME, "zviz-anchor");
    if (sock > 0)
        syscall(SYS_close_range, 0u, (unsigned)sock - 1, 0u);
    close_from(sock + 1);
    signal(SIGCHLD, SIG_IGN); /* monitors are reaped by the kernel */
    signal(SIGPIPE, SIG_IGN);

    while (1) {
        struct request req;
        struct iovec iov[2] = {{&req, sizeof req}, {buffer, MAX_REQUEST}};
        union {
            char space[CMSG_SPACE(sizeof(int) * REQUEST_FDS) + CMSG_SPACE(sizeof(struct ucred))];
            struct cmsghdr align;
        } control;
        struct msghdr msg = {0};
        msg.msg_iov = iov;
        msg.msg_iovlen = 2;
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof control.space;
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        int fds[REQUEST_FDS] = {-1}, nfds = 0, trusted = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET)
                continue;
            if (c->cmsg_type == SCM_RIGHTS) {
                int count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                int *got = (int *)CMSG_DATA(c);
                for (int i = 0; i < count; i++) {
                    if (nfds < REQUEST_FDS)
                        fds[nfds++] = got[i];
                    else
                        close(got[i]);
                }
            } else if (c->cmsg_type == SCM_CREDENTIALS) {
                struct ucred cred;
                memcpy(&cred, CMSG_DATA(c), sizeof cred);
                trusted = cred.uid == expected_uid && (!outside_pidns || cred.pid == 0);
            }
        }
        int valid = trusted && nfds == REQUEST_FDS && !(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) &&
                    (size_t)n >= sizeof req && req.magic == ANCHOR_MAGIC;
        char *cwd = NULL, **exec_argv = NULL, **envp = NULL;
        if (valid)
            valid = split(buffer, n - sizeof req, &req, &cwd, &exec_argv, &envp) == 0;
        if (valid) {
            pid_t pid = fork();
            if (pid == 0) {
                close(sock);
                signal(SIGCHLD, SIG_DFL);
                monitor(fds[0], &req, cwd, exec_argv, envp);
                _exit(0);
            }
            if (pid < 0) {
                char text[64];
                snprintf(text, sizeof text, "error %d fork", errno);
                say(fds[0], text);
            }
        }
        free(exec_argv);
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
    }
}
