/* Syscall costs: ns per call for getpid, clock_gettime, read, write, open+close.
 * Usage: sysbench ITERATIONS [seccomp] [landlock]  -> one JSON object on stdout.
 * Static, so it runs in any rootfs.
 *
 * The optional words make it confine itself first, to measure what the kernel charges
 * for a layer by itself, whatever runtime applies it:
 *   seccomp   a one-instruction "allow everything" filter (the floor of any filter)
 *   landlock  a ruleset shaped like zviz's: every filesystem right this kernel knows
 *             handled, read where zviz grants read (READ_DIR on "/", READ on each other
 *             top-level entry, /dev/null and /dev/zero), write on /dev/null. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int allow_all_seccomp(void) {
    struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {.len = 1, .filter = allow};
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

/* The uapi structs, spelled out: older headers lack the newer fields. */
struct ruleset_attr { uint64_t handled_access_fs, handled_access_net, scoped; };
struct path_beneath { uint64_t allowed_access; int32_t parent_fd; } __attribute__((packed));
#define LL_EXECUTE 1ULL
#define LL_WRITE_FILE 2ULL
#define LL_READ_FILE 4ULL
#define LL_READ_DIR 8ULL
#define LL_FILE_RIGHTS (LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | (1ULL << 14) | (1ULL << 15))

static int allow(int ruleset, const char *path, uint64_t access, uint64_t handled) {
    struct path_beneath rule = {.allowed_access = access & handled};
    rule.parent_fd = open(path, O_PATH | O_CLOEXEC);
    if (rule.parent_fd < 0) return 0; /* absent here: nothing to allow */
    struct stat st;
    if (fstat(rule.parent_fd, &st) == 0 && !S_ISDIR(st.st_mode))
        rule.allowed_access &= LL_FILE_RIGHTS; /* directory rights on a file: EINVAL */
    int r = syscall(SYS_landlock_add_rule, ruleset, 1 /* PATH_BENEATH */, &rule, 0);
    close(rule.parent_fd);
    return r;
}

static int zviz_shaped_landlock(void) {
    long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, 1 /* VERSION */);
    if (abi < 1) return -1;
    static const int fs_bits[] = {0, 13, 14, 15, 15, 16, 16, 16}; /* rights per ABI */
    uint64_t handled = (1ULL << fs_bits[abi > 7 ? 7 : abi]) - 1;
    struct ruleset_attr attr = {.handled_access_fs = handled};
    size_t size = abi >= 6 ? sizeof attr : abi >= 4 ? 16 : 8;
    int ruleset = syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    if (ruleset < 0) return -1;
    uint64_t read = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR;
    if (allow(ruleset, "/", LL_READ_DIR, handled)) return -1;
    DIR *root = opendir("/");
    struct dirent *entry;
    char path[300];
    while (root && (entry = readdir(root))) {
        if (!strcmp(entry->d_name, ".") || !strcmp(entry->d_name, "..") || !strcmp(entry->d_name, "dev"))
            continue;
        snprintf(path, sizeof path, "/%s", entry->d_name);
        if (allow(ruleset, path, read, handled)) return -1;
    }
    if (root) closedir(root);
    if (allow(ruleset, "/dev/zero", read, handled) || allow(ruleset, "/dev/null", read | LL_WRITE_FILE, handled))
        return -1;
    return syscall(SYS_landlock_restrict_self, ruleset, 0);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 200000;
    for (int i = 2; i < argc; i++) {
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
            (!strcmp(argv[i], "seccomp") && allow_all_seccomp()) ||
            (!strcmp(argv[i], "landlock") && zviz_shaped_landlock())) {
            perror(argv[i]);
            return 2;
        }
    }
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
