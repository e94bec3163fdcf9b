/* Probes for the broker's decisions (issue 10): run inside a zviz container.
 *
 * Each prints one line: "ESCAPED <what>" when the call reached what the profile
 * refuses, "BLOCKED <what>: errno N (...)" when it was refused, "OK <what>" or
 * "ERROR <what>: ..." for the controls. Kept apart from probe.c: these drive
 * sockets through the broker, probe.c drives the other layers.
 *
 *   udp_unspec MODE IP PORT      UDP to IP:PORT with sa_family = AF_UNSPEC, sent with
 *                                MODE = sendto | sendmsg | sendmmsg; a receiver bound
 *                                on IP:PORT in the same process tells if it arrived
 *   connect_any FAMILY PORT      TCP listener on the loopback (4: 127.0.0.1, 6: ::1),
 *                                then connect to the unspecified address (0.0.0.0 / ::)
 *   abstract NAME                connect to the abstract unix socket @NAME, retrying
 *                                while nobody listens (ECONNREFUSED) for 20 s
 *   abstract_dgram NAME          sendto the abstract unix datagram socket @NAME,
 *                                retrying while nobody is bound for 20 s
 *   abstract_own NAME            listen on @NAME, a child connects to it
 *   abstract_race NAME SECONDS   connect to @NAME over and over for SECONDS while a
 *                                child binds @NAME, holds it a moment and lets it go,
 *                                again and again (host root takes it in between):
 *                                ESCAPED when a connect reached host root's listener
 *   abstract_dgram_race NAME SECONDS MODE
 *                                the same for datagrams: send "container" to @NAME over
 *                                and over for SECONDS (MODE = sendto | sendmsg |
 *                                sendmmsg (two messages) | connect, the last a datagram
 *                                connect then an unaddressed send)
 *                                while a child binds a datagram socket to @NAME, reads
 *                                it a moment and lets it go; host root counts what it
 *                                receives (the test reads that side)
 *   sendmmsg_big IP PORT N SIZE  one sendmmsg of N messages of SIZE bytes each (all
 *                                from one buffer) to IP:PORT over UDP
 *   socket_proto TYPE PROTO      socket(AF_INET, TYPE, PROTO): a protocol whose ways out
 *                                the broker never sees (SCTP, UDP-Lite) must not open
 *   tcp_self IP PORT             TCP listener on IP:PORT and a client in the same process
 *                                connecting to it: "OK" once the client's bytes arrived
 *   tcp_serve IP PORT            TCP listener on IP:PORT (prints "LISTENING"), then the
 *                                first connection's line, for 30 s
 *   tcp_client IP PORT           connect to IP:PORT, retrying while nobody listens
 *                                (ECONNREFUSED) for 20 s, and send one line
 * IP may be IPv4 or IPv6 (tcp_*).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int blocked(const char *what) {
    int err = errno;
    printf("BLOCKED %s: errno %d (%s)\n", what, err, strerror(err));
    return 0;
}

static int udp_unspec(const char *mode, const char *ip, int port) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, ip, &to.sin_addr) != 1) {
        printf("ERROR udp_unspec: bad address %s\n", ip);
        return 2;
    }
    int receiver = socket(AF_INET, SOCK_DGRAM, 0);
    int have_receiver = bind(receiver, (struct sockaddr *)&to, sizeof to) == 0;
    int sender = socket(AF_INET, SOCK_DGRAM, 0);
    to.sin_family = AF_UNSPEC; /* udp_sendmsg takes it for AF_INET */
    char payload[] = "zviz-unspec";
    struct iovec iov = {payload, sizeof payload};
    struct msghdr msg = {.msg_name = &to, .msg_namelen = sizeof to, .msg_iov = &iov, .msg_iovlen = 1};
    struct mmsghdr mmsg = {.msg_hdr = msg};
    long sent;
    if (strcmp(mode, "sendto") == 0)
        sent = sendto(sender, payload, sizeof payload, 0, (struct sockaddr *)&to, sizeof to);
    else if (strcmp(mode, "sendmsg") == 0)
        sent = sendmsg(sender, &msg, 0);
    else
        sent = sendmmsg(sender, &mmsg, 1, 0);
    char what[128];
    snprintf(what, sizeof what, "udp_unspec %s %s:%d", mode, ip, port);
    if (sent < 0)
        return blocked(what);
    char got[64] = {0};
    struct pollfd p = {receiver, POLLIN, 0};
    if (have_receiver && poll(&p, 1, 1000) == 1 && recv(receiver, got, sizeof got, 0) > 0 &&
        strcmp(got, payload) == 0)
        printf("ESCAPED %s: datagram received\n", what);
    else
        printf("ESCAPED %s: sent %ld bytes (receiver %s)\n", what, sent,
               have_receiver ? "got nothing" : "not bound");
    return 0;
}

static int connect_any(int family, int port) {
    int listener = socket(family == 6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
    int client = socket(family == 6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage listen_at = {0}, any = {0};
    socklen_t len;
    if (family == 6) {
        struct sockaddr_in6 *l = (void *)&listen_at, *a = (void *)&any;
        l->sin6_family = a->sin6_family = AF_INET6;
        l->sin6_port = a->sin6_port = htons(port);
        l->sin6_addr = in6addr_loopback;
        a->sin6_addr = in6addr_any;
        len = sizeof(struct sockaddr_in6);
    } else {
        struct sockaddr_in *l = (void *)&listen_at, *a = (void *)&any;
        l->sin_family = a->sin_family = AF_INET;
        l->sin_port = a->sin_port = htons(port);
        l->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a->sin_addr.s_addr = htonl(INADDR_ANY);
        len = sizeof(struct sockaddr_in);
    }
    char what[64];
    snprintf(what, sizeof what, "connect_any %s port %d", family == 6 ? "[::]" : "0.0.0.0", port);
    if (bind(listener, (struct sockaddr *)&listen_at, len) || listen(listener, 4)) {
        printf("ERROR %s: listener: errno %d (%s)\n", what, errno, strerror(errno));
        return 2;
    }
    if (connect(client, (struct sockaddr *)&any, len))
        return blocked(what);
    printf("ESCAPED %s: connected to the loopback listener\n", what);
    return 0;
}

static socklen_t abstract_address(struct sockaddr_un *to, const char *name) {
    memset(to, 0, sizeof *to);
    to->sun_family = AF_UNIX;
    size_t n = strlen(name);
    if (n > sizeof to->sun_path - 1)
        n = sizeof to->sun_path - 1;
    memcpy(to->sun_path + 1, name, n);
    return offsetof(struct sockaddr_un, sun_path) + 1 + n;
}

static int abstract(const char *name) {
    struct sockaddr_un to;
    socklen_t len = abstract_address(&to, name);
    char what[160];
    snprintf(what, sizeof what, "abstract @%s", name);
    for (int tries = 0; tries < 400; tries++) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&to, len) == 0) {
            char got[64] = {0};
            struct pollfd p = {s, POLLIN, 0};
            if (poll(&p, 1, 2000) == 1)
                read(s, got, sizeof got - 1);
            got[strcspn(got, "\n")] = 0;
            printf("ESCAPED %s: connected, peer says \"%s\"\n", what, got);
            return 0;
        }
        if (errno != ECONNREFUSED)
            return blocked(what);
        close(s);
        usleep(50000);
    }
    printf("ERROR %s: nobody listened\n", what);
    return 2;
}

static int abstract_dgram(const char *name) {
    struct sockaddr_un to;
    socklen_t len = abstract_address(&to, name);
    char what[160];
    snprintf(what, sizeof what, "abstract_dgram @%s", name);
    int s = socket(AF_UNIX, SOCK_DGRAM, 0);
    for (int tries = 0; tries < 400; tries++) {
        if (sendto(s, "dgram\n", 6, 0, (struct sockaddr *)&to, len) == 6) {
            printf("ESCAPED %s: datagram sent\n", what);
            return 0;
        }
        if (errno != ECONNREFUSED)
            return blocked(what);
        usleep(50000);
    }
    printf("ERROR %s: nobody bound\n", what);
    return 2;
}

static int abstract_own(const char *name) {
    struct sockaddr_un at;
    socklen_t len = abstract_address(&at, name);
    int listener = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(listener, (struct sockaddr *)&at, len) || listen(listener, 4)) {
        printf("ERROR abstract_own: listener: errno %d (%s)\n", errno, strerror(errno));
        return 2;
    }
    pid_t child = fork();
    if (child == 0) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&at, len) == 0) {
            write(s, "own\n", 4);
            _exit(0);
        }
        printf("BLOCKED abstract_own @%s: errno %d (%s)\n", name, errno, strerror(errno));
        fflush(stdout);
        _exit(1);
    }
    struct pollfd p = {listener, POLLIN, 0};
    int status = 0;
    if (poll(&p, 1, 5000) == 1) {
        int conn = accept(listener, NULL, NULL);
        char got[8] = {0};
        read(conn, got, sizeof got - 1);
        if (strcmp(got, "own\n") == 0)
            printf("OK abstract_own @%s: connected to its own listener\n", name);
    }
    waitpid(child, &status, 0);
    return 0;
}

static int abstract_race(const char *name, int seconds) {
    struct sockaddr_un at;
    socklen_t len = abstract_address(&at, name);
    pid_t rebinder = fork();
    if (rebinder == 0) {
        /* The hostile half: the broker's check sees the name held by the container,
         * then the name is free for host root to take before the connect. */
        for (;;) {
            int held = socket(AF_UNIX, SOCK_STREAM, 0);
            if (bind(held, (struct sockaddr *)&at, len) == 0 && listen(held, 64) == 0)
                usleep(300);
            close(held);
            usleep(100);
        }
    }
    long connects = 0, host = 0, own = 0, refused = 0, denied = 0;
    time_t end = time(NULL) + seconds;
    while (time(NULL) < end) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        connects++;
        if (connect(s, (struct sockaddr *)&at, len) == 0) {
            char got[16] = {0};
            struct pollfd p = {s, POLLIN, 0};
            if (poll(&p, 1, 200) == 1)
                read(s, got, sizeof got - 1);
            if (strncmp(got, "host-root", 9) == 0)
                host++;
            else
                own++;
        } else if (errno == ECONNREFUSED) {
            refused++;
        } else {
            denied++;
        }
        close(s);
    }
    kill(rebinder, SIGKILL);
    waitpid(rebinder, NULL, 0);
    printf("%s abstract_race @%s: %ld connects, %ld reached host root, %ld own, %ld refused, "
           "%ld denied\n",
           host ? "ESCAPED" : "BLOCKED", name, connects, host, own, refused, denied);
    return 0;
}

static double monotonic_seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec + now.tv_nsec / 1e9;
}

static int abstract_dgram_race(const char *name, int seconds, const char *mode) {
    struct sockaddr_un at;
    socklen_t len = abstract_address(&at, name);
    int counts[2];
    if (pipe(counts)) {
        printf("ERROR abstract_dgram_race: pipe: errno %d\n", errno);
        return 2;
    }
    time_t end = time(NULL) + seconds;
    pid_t rebinder = fork();
    if (rebinder == 0) {
        /* The container's own receiver: holds the name a moment, then lets it go for
         * host root to take before the broker's send. */
        long received = 0;
        while (time(NULL) < end) {
            int held = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK, 0);
            if (bind(held, (struct sockaddr *)&at, len) == 0) {
                double until = monotonic_seconds() + 0.0003;
                do {
                    char got[16];
                    if (recv(held, got, sizeof got, 0) > 0)
                        received++;
                } while (monotonic_seconds() < until);
            }
            close(held);
            usleep(100);
        }
        write(counts[1], &received, sizeof received);
        _exit(0);
    }
    close(counts[1]);
    long sends = 0, sent = 0, refused = 0, denied = 0;
    int unconnected = socket(AF_UNIX, SOCK_DGRAM, 0);
    while (time(NULL) < end) {
        sends++;
        int ok;
        if (strcmp(mode, "sendto") == 0) {
            ok = sendto(unconnected, "container\n", 10, MSG_DONTWAIT, (struct sockaddr *)&at,
                        len) == 10;
        } else if (strcmp(mode, "sendmsg") == 0) {
            struct iovec data = {"container\n", 10};
            struct msghdr msg = {.msg_name = &at, .msg_namelen = len, .msg_iov = &data,
                                 .msg_iovlen = 1};
            ok = sendmsg(unconnected, &msg, MSG_DONTWAIT) == 10;
        } else if (strcmp(mode, "sendmmsg") == 0) {
            /* Two messages to the name in one call: the broker decides each. */
            struct iovec data = {"container\n", 10};
            struct mmsghdr msgs[2];
            memset(msgs, 0, sizeof msgs);
            for (int i = 0; i < 2; i++) {
                msgs[i].msg_hdr.msg_name = &at;
                msgs[i].msg_hdr.msg_namelen = len;
                msgs[i].msg_hdr.msg_iov = &data;
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            ok = sendmmsg(unconnected, msgs, 2, MSG_DONTWAIT) > 0;
        } else {
            int s = socket(AF_UNIX, SOCK_DGRAM, 0);
            ok = connect(s, (struct sockaddr *)&at, len) == 0 &&
                 send(s, "container\n", 10, MSG_DONTWAIT) == 10;
            int err = errno;
            close(s);
            errno = err;
        }
        if (ok)
            sent++;
        else if (errno == ECONNREFUSED || errno == EAGAIN)
            refused++;
        else
            denied++;
    }
    long own = 0;
    if (read(counts[0], &own, sizeof own) != sizeof own)
        own = -1;
    waitpid(rebinder, NULL, 0);
    printf("DONE abstract_dgram_race %s @%s: %ld sends, %ld sent, %ld own, %ld refused, "
           "%ld denied\n",
           mode, name, sends, sent, own, refused, denied);
    return 0;
}

static int sendmmsg_big(const char *ip, int port, int count, long size) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &to.sin_addr);
    char *buffer = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(buffer, 'z', size);
    struct iovec iov = {buffer, size};
    struct mmsghdr *msgs = calloc(count, sizeof *msgs);
    for (int i = 0; i < count; i++) {
        msgs[i].msg_hdr.msg_name = &to;
        msgs[i].msg_hdr.msg_namelen = sizeof to;
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    int sent = sendmmsg(s, msgs, count, 0);
    if (sent < 0)
        printf("DONE sendmmsg_big: errno %d (%s)\n", errno, strerror(errno));
    else
        printf("DONE sendmmsg_big: %d sent\n", sent);
    return 0;
}

static int socket_proto(int type, int protocol) {
    int s = socket(AF_INET, type, protocol);
    if (s < 0)
        printf("BLOCKED socket_proto %d/%d: errno %d (%s)\n", type, protocol, errno, strerror(errno));
    else
        printf("ESCAPED socket_proto %d/%d: opened\n", type, protocol);
    return 0;
}

/* An IPv4 or IPv6 address and port as a sockaddr; 0 if IP is neither. */
static socklen_t inet_sockaddr(const char *ip, int port, struct sockaddr_storage *at) {
    memset(at, 0, sizeof *at);
    struct sockaddr_in *in4 = (struct sockaddr_in *)at;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)at;
    if (inet_pton(AF_INET, ip, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons(port);
        return sizeof *in4;
    }
    if (inet_pton(AF_INET6, ip, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(port);
        return sizeof *in6;
    }
    return 0;
}

static int step_blocked(const char *what, const char *ip, int port, const char *step) {
    int err = errno;
    printf("BLOCKED %s %s:%d: %s: errno %d (%s)\n", what, ip, port, step, err, strerror(err));
    return 1;
}

/* A listening socket on IP:PORT, or -1 after printing which step was refused. */
static int tcp_listener(const char *what, const char *ip, int port) {
    struct sockaddr_storage at;
    socklen_t len = inet_sockaddr(ip, port, &at);
    if (len == 0) {
        printf("ERROR %s: bad address %s\n", what, ip);
        return -1;
    }
    int s = socket(at.ss_family, SOCK_STREAM, 0);
    if (s < 0)
        return step_blocked(what, ip, port, "socket"), -1;
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&at, len) != 0)
        return step_blocked(what, ip, port, "bind"), -1;
    if (listen(s, 8) != 0)
        return step_blocked(what, ip, port, "listen"), -1;
    return s;
}

/* The line the first connection to LISTENER sends, within TIMEOUT_MS; 0 if none. */
static int accept_line(int listener, int timeout_ms, char *got, size_t size) {
    struct pollfd p = {listener, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1)
        return 0;
    int conn = accept(listener, NULL, NULL);
    if (conn < 0)
        return 0;
    memset(got, 0, size);
    size_t have = 0;
    while (have < size - 1 && !strchr(got, '\n')) {
        ssize_t n = read(conn, got + have, size - 1 - have);
        if (n <= 0)
            break;
        have += n;
    }
    close(conn);
    return have > 0;
}

static int tcp_self(const char *ip, int port) {
    int listener = tcp_listener("tcp_self", ip, port);
    if (listener < 0)
        return 1;
    struct sockaddr_storage at;
    socklen_t len = inet_sockaddr(ip, port, &at);
    int client = socket(at.ss_family, SOCK_STREAM, 0);
    if (connect(client, (struct sockaddr *)&at, len) != 0)
        return step_blocked("tcp_self", ip, port, "connect");
    write(client, "own\n", 4);
    char got[16];
    if (accept_line(listener, 5000, got, sizeof got) && strcmp(got, "own\n") == 0) {
        printf("OK tcp_self %s:%d: its client's bytes arrived\n", ip, port);
        return 0;
    }
    printf("ERROR tcp_self %s:%d: connected, but nothing arrived\n", ip, port);
    return 1;
}

static int tcp_serve(const char *ip, int port) {
    int listener = tcp_listener("tcp_serve", ip, port);
    if (listener < 0)
        return 1;
    printf("LISTENING tcp_serve %s:%d\n", ip, port);
    char got[128];
    if (accept_line(listener, 30000, got, sizeof got)) {
        printf("OK tcp_serve %s:%d: got %s", ip, port, got);
        return 0;
    }
    printf("ERROR tcp_serve %s:%d: nobody connected\n", ip, port);
    return 1;
}

static int tcp_client(const char *ip, int port) {
    struct sockaddr_storage at;
    socklen_t len = inet_sockaddr(ip, port, &at);
    if (len == 0) {
        printf("ERROR tcp_client: bad address %s\n", ip);
        return 2;
    }
    struct timespec pause = {0, 100 * 1000 * 1000};
    for (int tries = 0; tries < 200; tries++) {
        int s = socket(at.ss_family, SOCK_STREAM, 0);
        if (s < 0)
            return step_blocked("tcp_client", ip, port, "socket");
        if (connect(s, (struct sockaddr *)&at, len) == 0) {
            write(s, "from-the-other-container\n", 25);
            close(s);
            printf("OK tcp_client %s:%d: sent\n", ip, port);
            return 0;
        }
        if (errno != ECONNREFUSED)
            return step_blocked("tcp_client", ip, port, "connect");
        close(s);
        nanosleep(&pause, NULL);
    }
    return step_blocked("tcp_client", ip, port, "connect");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 5 && strcmp(argv[1], "udp_unspec") == 0)
        return udp_unspec(argv[2], argv[3], atoi(argv[4]));
    if (argc == 4 && strcmp(argv[1], "connect_any") == 0)
        return connect_any(atoi(argv[2]), atoi(argv[3]));
    if (argc == 3 && strcmp(argv[1], "abstract") == 0)
        return abstract(argv[2]);
    if (argc == 3 && strcmp(argv[1], "abstract_dgram") == 0)
        return abstract_dgram(argv[2]);
    if (argc == 3 && strcmp(argv[1], "abstract_own") == 0)
        return abstract_own(argv[2]);
    if (argc == 4 && strcmp(argv[1], "abstract_race") == 0)
        return abstract_race(argv[2], atoi(argv[3]));
    if (argc == 5 && strcmp(argv[1], "abstract_dgram_race") == 0)
        return abstract_dgram_race(argv[2], atoi(argv[3]), argv[4]);
    if (argc == 6 && strcmp(argv[1], "sendmmsg_big") == 0)
        return sendmmsg_big(argv[2], atoi(argv[3]), atoi(argv[4]), atol(argv[5]));
    if (argc == 4 && strcmp(argv[1], "socket_proto") == 0)
        return socket_proto(atoi(argv[2]), atoi(argv[3]));
    if (argc == 4 && strcmp(argv[1], "tcp_self") == 0)
        return tcp_self(argv[2], atoi(argv[3]));
    if (argc == 4 && strcmp(argv[1], "tcp_serve") == 0)
        return tcp_serve(argv[2], atoi(argv[3]));
    if (argc == 4 && strcmp(argv[1], "tcp_client") == 0)
        return tcp_client(argv[2], atoi(argv[3]));
    fprintf(stderr, "usage: see the comment at the top of broker_probe.c\n");
    return 2;
}
