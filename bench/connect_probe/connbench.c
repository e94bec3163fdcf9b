/* One connect to a loopback listener, timed: socket + connect + accept + close, N times.
 * Only connect is mediated by zviz's broker (mode "none" in a shared namespace); the rest
 * is the same work in every runtime. Prints {"connect_ns": the mean ns per iteration}. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) ||
        listen(listener, 64) || getsockname(listener, (struct sockaddr *)&addr, &len)) {
        perror("listener");
        return 1;
    }
    double start = now_ns();
    for (int i = 0; i < n; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (c < 0 || connect(c, (struct sockaddr *)&addr, sizeof addr)) {
            perror("connect");
            return 1;
        }
        int a = accept(listener, NULL, NULL);
        if (a < 0) {
            perror("accept");
            return 1;
        }
        close(a);
        close(c);
    }
    printf("{\"connect_ns\": %.0f}\n", (now_ns() - start) / n);
    return 0;
}
