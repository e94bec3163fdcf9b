/* The compiled `zviz` entry: the client half of runtime/forkserver.py in C.
 *
 * A Python client spends ~9 ms starting the interpreter before it can connect to the
 * fork server; this one connects within a millisecond. It does only what
 * forkserver.try_run does: recognise a plain `zviz run` or `exec` (is_served), compute the
 * same socket name (socket_path), send the same request (send_request) with its stdio,
 * forward signals to PID 1 and exit with the container's code. Anything else
 * (another command, no server, the server answers "fallback" or "stale") execs the
 * Python entry, ZVIZ_PYTHON ZVIZ_SCRIPT ARGS..., which does everything as before
 * (starting a server when none answers).
 *
 * Built by `make install` (python -m runtime.forkserver --build-client) with the
 * install identity compiled in: ZVIZ_EXECUTABLE, ZVIZ_PACKAGE, ZVIZ_VERSION. */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define SERVER_DIR "/run/zviz"
#define MAX_REQUEST 65536

static volatile sig_atomic_t pid1;

static void fall_back(char **argv) {
    char *args[4096];
    int n = 0;
    args[n++] = ZVIZ_PYTHON;
    args[n++] = ZVIZ_SCRIPT;
    for (int i = 1; argv[i] && n < 4095; i++)
        args[n++] = argv[i];
    args[n] = NULL;
    execv(ZVIZ_PYTHON, args);
    fprintf(stderr, "zviz: cannot run %s: %s\n", ZVIZ_PYTHON, strerror(errno));
    _exit(1);
}

static const char *const ineligible[] = {
    "-d", "--detach", "-t", "--tty", "--console-socket", "--pid-file", "--preserve-fds",
    "--help", "-h", NULL};
/* forkserver.UNSERVED_ENV */
static const char *const unserved_env[] = {"ZVIZ_NO_FORKSERVER", "ZVIZ_SECCOMP_CACHE", "ZVIZ_DENIAL_RECORDS", NULL};
static const char *const with_value[] = {
    "--root", "--log", "--log-format", "--criu", "--rootless", "--profile", NULL};

static int listed(const char *arg, const char *const *list, int up_to_equals) {
    size_t len = strlen(arg);
    if (up_to_equals) {
        const char *eq = strchr(arg, '=');
        if (eq)
            len = (size_t)(eq - arg);
    }
    for (int i = 0; list[i]; i++)
        if (strlen(list[i]) == len && strncmp(list[i], arg, len) == 0)
            return 1;
    return 0;
}

/* forkserver.is_served */
static int is_served(int argc, char **argv) {
    for (int i = 0; unserved_env[i]; i++) {
        const char *value = getenv(unserved_env[i]);
        if (value && *value)
            return 0;
    }
    if (geteuid() != 0)
        return 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "run") == 0 || strcmp(argv[i], "exec") == 0) {
            for (int j = i + 1; j < argc; j++) {
                if (listed(argv[j], ineligible, 1))
                    return 0;
                /* a cluster of short flags (-dt) may hide -d or -t */
                if (argv[j][0] == '-' && argv[j][1] && argv[j][1] != '-' && argv[j][2])
                    return 0;
            }
            return 1;
        }
        if (listed(argv[i], with_value, 0) && i + 1 < argc) {
            i++;
            continue;
        }
        if (argv[i][0] != '-')
            return 0;
    }
    return 0;
}

static uint32_t crc32(uint32_t crc, const unsigned char *data, size_t len) {
    crc = ~crc;
    while (len--) {
        crc ^= *data++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static size_t append(char *buf, size_t used, const char *text, size_t len) {
    if (used + len + 1 > MAX_REQUEST)
        return MAX_REQUEST + 1;
    memcpy(buf + used, text, len);
    return used + len;
}

/* forkserver.socket_path(install, _namespaces_and_cgroup("self")) */
static int socket_name(char *path, size_t size) {
    static const char *const names[] = {"mnt", "pid", "user", "net", "cgroup"};
    static char key[MAX_REQUEST + 2];
    size_t used = 0;
    const char *install[] = {ZVIZ_EXECUTABLE, ZVIZ_PACKAGE, ZVIZ_VERSION};
    for (int i = 0; i < 3; i++) {
        used = append(key, used, install[i], strlen(install[i]) + 1);
    }
    for (int i = 0; i < 5; i++) {
        char ns[64], number[32];
        struct stat st;
        snprintf(ns, sizeof ns, "/proc/self/ns/%s", names[i]);
        if (stat(ns, &st) != 0)
            return -1;
        int len = snprintf(number, sizeof number, "%llu", (unsigned long long)st.st_ino);
        used = append(key, used, number, (size_t)len + 1);
    }
    int fd = open("/proc/self/cgroup", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    for (;;) {
        if (used >= MAX_REQUEST) {
            close(fd);
            return -1;
        }
        ssize_t n = read(fd, key + used, MAX_REQUEST - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            close(fd);
            return -1;
        }
        if (n == 0)
            break;
        used += (size_t)n;
    }
    close(fd);
    snprintf(path, size, SERVER_DIR "/.zviz-run-%08x.sock",
             crc32(0, (const unsigned char *)key, used));
    return 0;
}

/* A signal that arrives before the server has told us PID 1's pid is kept here and sent
 * once the pid is known: under load the container can already be running (and print
 * "ready") while our "pid N" message is still in flight, and a dropped SIGTERM would
 * leave the caller waiting forever. Single-threaded: the handler runs between two of
 * main's instructions, so it either sees pid1 set or leaves its flag for the flush. */
static volatile sig_atomic_t pending[NSIG];

static void forward(int sig) {
    int saved = errno;
    if (pid1 > 0)
        kill(pid1, sig);
    else
        pending[sig] = 1;
    errno = saved;
}

static void flush_pending(void) {
    for (int sig = 1; sig < NSIG; sig++) {
        if (pending[sig]) {
            pending[sig] = 0;
            kill(pid1, sig);
        }
    }
}

int main(int argc, char **argv) {
    if (!is_served(argc, argv))
        fall_back(argv);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (socket_name(addr.sun_path, sizeof addr.sun_path) != 0)
        fall_back(argv);
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
        fall_back(argv); /* the Python entry starts a server */

    /* forkserver.send_request: install fields, cwd, argv[0], the arguments */
    static char request[MAX_REQUEST + 2];
    char cwd[4096];
    if (!getcwd(cwd, sizeof cwd))
        fall_back(argv);
    const char *fixed[] = {ZVIZ_EXECUTABLE, ZVIZ_PACKAGE, ZVIZ_VERSION, cwd, argv[0]};
    size_t used = 0;
    for (int i = 0; i < 5; i++)
        used = append(request, used, fixed[i], strlen(fixed[i]) + (i < 4 || argc > 1));
    for (int i = 1; i < argc; i++)
        used = append(request, used, argv[i], strlen(argv[i]) + (i + 1 < argc));
    if (used > MAX_REQUEST)
        fall_back(argv);
    int fds[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = request, .iov_len = used};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof control};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0)
        fall_back(argv);

    static const int forwarded[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2,
                                    SIGWINCH, SIGCONT};
    struct sigaction action = {.sa_handler = forward};
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        sigaction(forwarded[i], &action, NULL);

    for (;;) {
        char message[4096];
        ssize_t n = recv(sock, message, sizeof message - 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n < 0 && pid1 == 0)
                fall_back(argv); /* as try_run: an OSError before the run began */
            fputs("zviz: the run supervisor went away\n", stderr);
            return 1;
        }
        message[n] = '\0';
        if (strncmp(message, "pid ", 4) == 0) {
            pid1 = atoi(message + 4);
            flush_pending();
        }
        else if (strncmp(message, "exit ", 5) == 0)
            return atoi(message + 5);
        else if (strcmp(message, "fallback") == 0 || strcmp(message, "stale") == 0) {
            close(sock);
            fall_back(argv);
        }
    }
}
