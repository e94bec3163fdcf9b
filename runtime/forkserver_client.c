/* The compiled `zviz` and `containerd-shim-zviz-v2` entries: the client half of
 * runtime/forkserver.py in C, built once per entry (ZVIZ_ENTRY).
 *
 * A Python client spends ~9 ms starting the interpreter before it can connect to the
 * fork server; this one connects within a millisecond. It does only what
 * forkserver.try_run does: recognise a plain `zviz run` or `exec` (or a shim `start` or
 * `delete`),
 * compute the same socket name (socket_path), send the same request (send_request)
 * with its stdio and environment, forward signals to PID 1 and exit with the
 * worker's code. Anything else
 * (another command, no server, the server refuses or is stale) execs the
 * Python entry, ZVIZ_PYTHON ZVIZ_SCRIPT ARGS..., which does everything as before
 * (starting a server when none answers); with --debug it says why first.
 *
 * Every name, list, layout and reply both clients must agree on comes from
 * forkserver_protocol.h, which runtime/forkserver.py (c_header) generates from its
 * protocol section when it compiles this file (compile_client, run by `make install`
 * and `zviz node install`), with the install identity: ZVIZ_EXECUTABLE, ZVIZ_PACKAGE,
 * ZVIZ_VERSION. tests/test_forkserver_parity.py drives this client and the Python one
 * against one recording server. */

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

#include "forkserver_protocol.h"

static volatile sig_atomic_t pid1;
static int debug; /* --debug among the global flags: say why the slow path */

/* forkserver._slow_path, then the Python entry. WHY is NULL or "" for nothing to say. */
static void fall_back(char **argv, const char *why, const char *detail) {
    if (debug && why && *why)
        fprintf(stderr, "%s%s%s\n", ZVIZ_SLOW_PATH, why, detail ? detail : "");
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

extern char **environ;

static const char *const served_commands[] = {ZVIZ_SERVED_COMMANDS, NULL};
static const char *const shim_string_flags[] = {ZVIZ_SHIM_STRING_FLAGS, NULL};
static const char *const shim_served_bools[] = {ZVIZ_SHIM_SERVED_BOOLS, NULL};
static const char *const shim_served_actions[] = {ZVIZ_SHIM_SERVED_ACTIONS, NULL};
static const char *const ineligible[] = {ZVIZ_INELIGIBLE_FLAGS, NULL};
static const char *const unserved_env[] = {ZVIZ_UNSERVED_ENV, NULL};
static const char *const with_value[] = {ZVIZ_GLOBAL_FLAGS_WITH_VALUE, NULL};

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

/* forkserver._ineligible_client */
static int ineligible_client(void) {
    for (int k = 0; unserved_env[k]; k++) {
        const char *value = getenv(unserved_env[k]);
        if (value && *value)
            return 1;
    }
    return geteuid() != 0;
}

/* forkserver._shim_eligibility */
static const char *shim_eligibility(int argc, char **argv) {
    int i = 1;
    while (i < argc && argv[i][0] == '-' && argv[i][1]) {
        const char *name = argv[i];
        while (*name == '-')
            name++;
        int has_value = strchr(name, '=') != NULL;
        if (listed(name, shim_string_flags, 1))
            i += has_value ? 1 : 2;
        else if (!has_value && listed(name, shim_served_bools, 0))
            i++;
        else
            return "";
    }
    if (i != argc - 1 || !listed(argv[i], shim_served_actions, 0))
        return "";
    return ineligible_client() ? ZVIZ_SAY_NOT_ELIGIBLE : NULL;
}

/* forkserver._eligibility: NULL when served, "" for another command line, else why not. */
static const char *eligibility(int argc, char **argv) {
    if (strcmp(ZVIZ_ENTRY, ZVIZ_SHIM_ENTRY) == 0)
        return shim_eligibility(argc, argv);
    for (int i = 1; i < argc; i++) {
        if (listed(argv[i], served_commands, 0)) {
            if (ineligible_client())
                return ZVIZ_SAY_NOT_ELIGIBLE;
            for (int j = i + 1; j < argc; j++) {
                if (listed(argv[j], ineligible, 1))
                    return ZVIZ_SAY_NOT_ELIGIBLE;
                /* a cluster of short flags (-dt) may hide -d or -t */
                if (argv[j][0] == '-' && argv[j][1] && argv[j][1] != '-' && argv[j][2])
                    return ZVIZ_SAY_NOT_ELIGIBLE;
            }
            return NULL;
        }
        if (listed(argv[i], with_value, 0) && i + 1 < argc) {
            i++;
            continue;
        }
        if (argv[i][0] != '-')
            return "";
        if (strcmp(argv[i], ZVIZ_DEBUG_FLAG) == 0)
            debug = 1;
    }
    return "";
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
    if (used + len + 1 > ZVIZ_MAX_REQUEST)
        return ZVIZ_MAX_REQUEST + 1;
    memcpy(buf + used, text, len);
    return used + len;
}

/* The whole of /proc/self/NAME into BUF (at most SIZE bytes): its length, -1 when it
 * cannot be read (forkserver._inherited counts such a file as empty). */
static ssize_t read_proc(const char *name, char *buf, size_t size) {
    char path[128];
    snprintf(path, sizeof path, "/proc/self/%s", name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t used = 0;
    for (;;) {
        ssize_t n = read(fd, buf + used, size - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            close(fd);
            return -1;
        }
        if (n == 0 || (used += (size_t)n) == size)
            break;
    }
    close(fd);
    return used < size ? (ssize_t)used : -1; /* a file that did not fit: no key */
}

/* forkserver._inherited("self"), each value NUL-prefixed after KEY[0, USED); the new
 * length, or ZVIZ_MAX_REQUEST + 1 when it does not fit. */
static size_t append_inherited(char *key, size_t used) {
    static const char *const status_fields[] = {ZVIZ_INHERITED_STATUS_FIELDS, NULL};
    static const char *const files[] = {ZVIZ_INHERITED_FILES, NULL};
    static const int stat_fields[] = {ZVIZ_INHERITED_STAT_FIELDS};
    static char text[16384];
    ssize_t len = read_proc("status", text, sizeof text - 1);
    if (len < 0)
        return ZVIZ_MAX_REQUEST + 1;
    text[len] = '\0';
    for (int i = 0; status_fields[i]; i++) { /* the whole line, or nothing */
        size_t name_len = strlen(status_fields[i]);
        const char *line = text, *found = "";
        size_t found_len = 0;
        while (*line) {
            const char *end = strchr(line, '\n');
            size_t line_len = end ? (size_t)(end - line) : strlen(line);
            if (line_len > name_len && line[name_len] == ':' &&
                strncmp(line, status_fields[i], name_len) == 0) {
                found = line;
                found_len = line_len;
                break;
            }
            line += line_len + (end != NULL);
        }
        used = append(key, used, "", 1);
        used = append(key, used, found, found_len);
    }
    for (int i = 0; files[i]; i++) {
        used = append(key, used, "", 1);
        len = read_proc(files[i], text, sizeof text);
        if (len > 0)
            used = append(key, used, text, (size_t)len);
    }
    len = read_proc("stat", text, sizeof text - 1);
    if (len < 0)
        return ZVIZ_MAX_REQUEST + 1;
    text[len] = '\0';
    for (size_t i = 0; i < sizeof stat_fields / sizeof stat_fields[0]; i++) {
        const char *field = strrchr(text, ')');
        if (!field)
            return ZVIZ_MAX_REQUEST + 1;
        field++; /* whitespace-separated from here on, field 3 (the state) first */
        for (int number = 3;; number++) {
            field += strspn(field, " \n");
            if (!*field)
                return ZVIZ_MAX_REQUEST + 1;
            if (number == stat_fields[i])
                break;
            field += strcspn(field, " \n");
        }
        size_t field_len = strcspn(field, " \n");
        used = append(key, used, "", 1);
        used = append(key, used, field, field_len);
    }
    return used;
}

/* forkserver.socket_path(install, process_identity("self")) */
static int socket_name(char *path, size_t size) {
    static const char *const names[] = {ZVIZ_COMPARED_NAMESPACES, NULL};
    static char key[ZVIZ_MAX_REQUEST + 2];
    size_t used = 0;
    const char *install[] = {ZVIZ_EXECUTABLE, ZVIZ_PACKAGE, ZVIZ_VERSION};
    for (int i = 0; i < 3; i++) {
        used = append(key, used, install[i], strlen(install[i]) + 1);
    }
    for (int i = 0; names[i]; i++) {
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
        if (used >= ZVIZ_MAX_REQUEST) {
            close(fd);
            return -1;
        }
        ssize_t n = read(fd, key + used, ZVIZ_MAX_REQUEST - used);
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
    used = append_inherited(key, used);
    if (used > ZVIZ_MAX_REQUEST)
        return -1;
    char name[64];
    snprintf(name, sizeof name, ZVIZ_SOCKET_NAME, crc32(0, (const unsigned char *)key, used));
    snprintf(path, size, "%s/%s", ZVIZ_SERVER_DIR, name);
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

/* The reply's kind: MESSAGE is KIND alone or KIND, a space and a value. */
static const char *reply(const char *message, const char *kind) {
    size_t len = strlen(kind);
    if (strncmp(message, kind, len) != 0)
        return NULL;
    if (message[len] == ' ')
        return message + len + 1;
    return message[len] == '\0' ? message + len : NULL;
}

int main(int argc, char **argv) {
    const char *why = eligibility(argc, argv);
    if (why)
        fall_back(argv, why, NULL);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (socket_name(addr.sun_path, sizeof addr.sun_path) != 0)
        fall_back(argv, ZVIZ_SAY_NO_SERVER, " (cannot read this process's namespaces)");
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
        fall_back(argv, ZVIZ_SAY_NO_SERVER, NULL); /* the Python entry starts a server */

    /* forkserver.send_request: install fields, entry, cwd, argument count, argv[0], the
     * arguments, the environment; each field NUL-terminated, the last one's NUL dropped */
    static char request[ZVIZ_MAX_REQUEST + 2];
    char cwd[4096], count[16];
    if (!getcwd(cwd, sizeof cwd))
        fall_back(argv, ZVIZ_SAY_SEND_FAILED, strerror(errno));
    snprintf(count, sizeof count, "%d", argc);
    const char *fixed[] = {ZVIZ_EXECUTABLE, ZVIZ_PACKAGE, ZVIZ_VERSION, ZVIZ_ENTRY, cwd, count};
    size_t used = 0;
    for (int i = 0; i < 6; i++)
        used = append(request, used, fixed[i], strlen(fixed[i]) + 1);
    for (int i = 0; i < argc; i++)
        used = append(request, used, argv[i], strlen(argv[i]) + 1);
    for (char **variable = environ; *variable; variable++)
        used = append(request, used, *variable, strlen(*variable) + 1);
    if (used > ZVIZ_MAX_REQUEST)
        fall_back(argv, ZVIZ_SAY_SEND_FAILED, strerror(EMSGSIZE));
    used--; /* the separator after the last field */
    int fds[ZVIZ_REQUEST_FDS];
    for (int i = 0; i < ZVIZ_REQUEST_FDS; i++)
        fds[i] = i; /* stdin, stdout, stderr */
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
        fall_back(argv, ZVIZ_SAY_SEND_FAILED, strerror(errno));

    static const int forwarded[] = {ZVIZ_FORWARDED_SIGNALS};
    struct sigaction action = {.sa_handler = forward};
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        if (strcmp(ZVIZ_ENTRY, ZVIZ_SHIM_ENTRY) != 0) /* a shim start or delete has no PID 1 */
            sigaction(forwarded[i], &action, NULL);

    for (;;) {
        char message[4096];
        const char *value;
        ssize_t n = recv(sock, message, sizeof message - 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n < 0 && pid1 == 0) /* as try_run: an error before the run began */
                fall_back(argv, ZVIZ_SAY_RECEIVE_FAILED, strerror(errno));
            fputs("zviz: the run supervisor went away\n", stderr);
            return 1;
        }
        message[n] = '\0';
        if ((value = reply(message, ZVIZ_REPLY_PID))) {
            pid1 = atoi(value);
            flush_pending();
        }
        else if ((value = reply(message, ZVIZ_REPLY_EXIT)))
            return atoi(value);
        else if ((value = reply(message, ZVIZ_REPLY_FALLBACK))) {
            close(sock);
            fall_back(argv, ZVIZ_SAY_REFUSED, value);
        }
        else if (reply(message, ZVIZ_REPLY_STALE)) {
            close(sock);
            fall_back(argv, ZVIZ_SAY_STALE, NULL);
        }
    }
}
