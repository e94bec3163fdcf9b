/* What programs write about themselves beneath /proc (issue 14 item 2), run as a
 * container's PID 1: one line per write, "<what> ok" or "<what> <ERRNO NAME>".
 * Not an escape probe: every write here is the program's own business, and runc
 * allows each. integration/security/test_proc_self.py reads the lines. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *what, int err) {
    printf("%s %s\n", what, err ? strerrorname_np(err) : "ok");
}

/* flags: O_TRUNC as a shell's `echo x > /proc/self/comm` opens, 0 as glibc's
 * pthread_setname_np does. */
static int write_to(const char *path, const char *text, int flags) {
    int fd = open(path, O_WRONLY | O_CLOEXEC | flags);
    if (fd < 0) return errno;
    int err = write(fd, text, strlen(text)) < 0 ? errno : 0;
    close(fd);
    return err;
}

static int read_int(const char *path, int *value) {
    FILE *f = fopen(path, "re");
    if (!f) return errno;
    int n = fscanf(f, "%d", value);
    fclose(f);
    return n == 1 ? 0 : EIO;
}

/* Raising needs no capability; the read-back proves the kernel took it (ERANGE: not). */
static int raise_oom_score_adj(const char *path) {
    int before = 0, after = 0, err = read_int(path, &before);
    if (err) return err;
    int wanted = before < 900 ? before + 100 : 1000;
    char text[16];
    snprintf(text, sizeof text, "%d", wanted);
    if ((err = write_to(path, text, O_TRUNC))) return err;
    if ((err = read_int(path, &after))) return err;
    return after == wanted ? 0 : ERANGE;
}

static void *idle(void *arg) {
    (void)arg;
    pause();
    return NULL;
}

/* "again": after the writes, wait for SIGUSR1 (the host drops the dentry cache
 * meanwhile), then write again: the rules must outlive procfs's dentries. */
static volatile sig_atomic_t go;
static void on_usr1(int sig) {
    (void)sig;
    go = 1;
}
static void again(void) {
    signal(SIGUSR1, on_usr1);
    printf("waiting\n");
    for (int i = 0; i < 600 && !go; i++) usleep(50000);
    report("again_own_comm", write_to("/proc/self/comm", "named-again", O_TRUNC));
    report("again_own_oom_score_adj_raise", raise_oom_score_adj("/proc/self/oom_score_adj"));
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("pid %d\n", getpid());
    char path[64], name[32] = {0};
    report("own_comm", write_to("/proc/self/comm", "named-pid1", O_TRUNC));
    snprintf(path, sizeof path, "/proc/self/task/%d/comm", gettid());
    report("own_thread_comm", write_to(path, "main-thread", 0));
    pthread_getname_np(pthread_self(), name, sizeof name);
    printf("comm_now %s\n", name);
    report("own_oom_score_adj_raise", raise_oom_score_adj("/proc/self/oom_score_adj"));
    /* glibc names another thread through /proc/self/task/<tid>/comm. */
    pthread_t worker;
    pthread_create(&worker, NULL, idle, NULL);
    report("later_thread_name", pthread_setname_np(worker, "worker"));
    pid_t child = fork();
    if (child == 0) {
        report("child_comm", write_to("/proc/self/comm", "child", O_TRUNC));
        report("child_oom_score_adj_raise", raise_oom_score_adj("/proc/self/oom_score_adj"));
        /* The files a rule on PID 1's /proc directory would have opened to its
         * children: its memory must stay closed to them (the proc_pid_mem route). */
        char mem[64];
        snprintf(mem, sizeof mem, "/proc/%d/mem", getppid());
        int fd = open(mem, O_RDWR | O_CLOEXEC);
        report("child_opens_parent_mem", fd < 0 ? errno : 0);
        snprintf(mem, sizeof mem, "/proc/%d/task/%d/mem", getppid(), getppid());
        fd = open(mem, O_RDWR | O_CLOEXEC);
        report("child_opens_parent_task_mem", fd < 0 ? errno : 0);
        _exit(0);
    }
    waitpid(child, NULL, 0);
    if (argc > 1 && strcmp(argv[1], "again") == 0) again();
    printf("done\n");
    return 0;
}
