/*
 * zviz escape probes: one static multi-call binary, one known container escape
 * technique per subcommand. Usage: probe NAME [ARG]
 *
 * Prints one line and exits:
 *   0  "BLOCKED name: how: errno N ENAME (text)"   the technique failed, stopped by errno N
 *      "BLOCKED name: how: no errno"                a check that found nothing to exploit
 *   10 "ESCAPED name: what"  the technique worked
 *   2  "ERROR name: why"     the probe itself could not run
 * The harness compares ENAME (or the signal that killed the probe) with the outcome
 * pinned for the probe and profile in escapes.py: anything else is an error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <dirent.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_ether.h>
#include <unistd.h>

static const char *probe_name;

static int blocked(int err, const char *how) {
    if (err == 0) {
        printf("BLOCKED %s: %s: no errno\n", probe_name, how);
        return 0;
    }
    /* The symbolic name is what the harness pins: numbers differ between architectures. */
    const char *name = strerrorname_np(err);
    printf("BLOCKED %s: %s: errno %d %s (%s)\n", probe_name, how, err, name ? name : "E?",
           strerror(err));
    return 0;
}
static int escaped(const char *what) {
    printf("ESCAPED %s: %s\n", probe_name, what);
    return 10;
}
#define TRY(call, how)                                   \
    do {                                                 \
        long rc_ = (long)(call);                         \
        if (rc_ < 0) return blocked(errno, how);         \
    } while (0)

static int p_mount(void) {
    mkdir("/tmp/zviz-probe-mnt", 0700);
    TRY(mount("none", "/tmp/zviz-probe-mnt", "tmpfs", 0, NULL), "mount tmpfs");
    return escaped("mounted a tmpfs");
}
static int p_umount(void) {
    TRY(umount2("/proc", MNT_DETACH), "umount2 /proc");
    return escaped("unmounted /proc");
}
static int p_pivot_root(void) {
    TRY(syscall(SYS_pivot_root, "/tmp", "/tmp"), "pivot_root");
    return escaped("pivot_root succeeded");
}
static int p_chroot(void) {
    TRY(chroot("/tmp"), "chroot");
    return escaped("chroot succeeded");
}
static int p_unshare_user(void) {
    TRY(unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)");
    return escaped("created a nested user namespace");
}
static int p_unshare_mount(void) {
    TRY(unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)");
    return escaped("created a mount namespace");
}
static int p_clone_newuser(void) {
    long pid = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
    if (pid < 0) return blocked(errno, "clone(CLONE_NEWUSER)");
    if (pid == 0) _exit(0);
    waitpid(pid, NULL, 0);
    return escaped("cloned into a new user namespace");
}
static int p_setns(void) {
    /* The host's namespaces are not reachable by path from a pid namespace; try the
     * one reachable handle, PID 1's, which setns must refuse without CAP_SYS_ADMIN. */
    int fd = open("/proc/1/ns/mnt", O_RDONLY);
    if (fd < 0) return blocked(errno, "open /proc/1/ns/mnt");
    TRY(setns(fd, 0), "setns(/proc/1/ns/mnt)");
    return escaped("setns into PID 1's mount namespace");
}
static int p_ptrace(void) {
    pid_t child = fork();
    if (child == 0) { pause(); _exit(0); }
    long rc = ptrace(PTRACE_ATTACH, child, 0, 0);
    int err = errno;
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    if (rc < 0) return blocked(err, "ptrace(PTRACE_ATTACH)");
    return escaped("attached to a process with ptrace");
}
static int p_process_vm_writev(void) {
    static volatile char target[16] = "untouched";
    pid_t child = fork();
    if (child == 0) { sleep(5); _exit(0); }
    char data[] = "overwritten";
    struct iovec local = {data, sizeof data}, remote = {(void *)target, sizeof data};
    long rc = syscall(SYS_process_vm_writev, child, &local, 1, &remote, 1, 0);
    int err = errno;
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    if (rc < 0) return blocked(err, "process_vm_writev");
    return escaped("wrote into another process's memory");
}
static int p_kexec(void) {
    TRY(syscall(SYS_kexec_load, 0, 0, NULL, 0), "kexec_load");
    return escaped("kexec_load accepted");
}
static int p_module(void) {
    char image[64] = {0};
    long rc = syscall(SYS_init_module, image, sizeof image, "");
    if (rc < 0 && errno != ENOEXEC && errno != EINVAL) {
        int err = errno;
        int fd = open("/proc/self/exe", O_RDONLY);
        rc = syscall(SYS_finit_module, fd, "", 0);
        if (rc < 0 && errno != ENOEXEC && errno != EINVAL) return blocked(err, "init_module/finit_module");
    }
    return escaped("the kernel parsed a module image (loading is permitted)");
}
static int p_bpf(void) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY;
    attr.key_size = 4;
    attr.value_size = 4;
    attr.max_entries = 1;
    TRY(syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr), "bpf(BPF_MAP_CREATE)");
    return escaped("created a BPF map");
}
static int p_perf_event_open(void) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.type = PERF_TYPE_SOFTWARE;
    attr.size = sizeof attr;
    attr.config = PERF_COUNT_SW_CPU_CLOCK;
    attr.exclude_kernel = 1;
    TRY(syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0), "perf_event_open");
    return escaped("opened a perf event");
}
static int p_keyctl(void) {
    TRY(syscall(SYS_add_key, "user", "zviz-probe", "x", 1, -2 /* KEY_SPEC_PROCESS_KEYRING */),
        "add_key");
    return escaped("added a key to the kernel keyring");
}
static int p_userfaultfd(void) {
    TRY(syscall(SYS_userfaultfd, O_CLOEXEC), "userfaultfd");
    return escaped("created a userfaultfd");
}
static int p_open_by_handle_at(void) {
    /* "shocker": forge a file handle and open it relative to a mount fd. */
    struct { struct file_handle fh; unsigned char bytes[128]; } h;
    int mount_id;
    h.fh.handle_bytes = 128;
    if (syscall(SYS_name_to_handle_at, AT_FDCWD, "/", &h.fh, &mount_id, 0) < 0) {
        int err = errno;
        /* Forge one anyway: inode 2 of the root filesystem, as the original exploit did. */
        h.fh.handle_bytes = 8;
        h.fh.handle_type = 1;
        memset(h.bytes, 0, 8);
        h.bytes[0] = 2;
        int dirfd = open("/", O_RDONLY);
        long rc = syscall(SYS_open_by_handle_at, dirfd, &h.fh, O_RDONLY);
        if (rc < 0) return blocked(errno == EPERM ? EPERM : err, "name_to_handle_at/open_by_handle_at");
        return escaped("opened a forged file handle");
    }
    int dirfd = open("/", O_RDONLY);
    TRY(syscall(SYS_open_by_handle_at, dirfd, &h.fh, O_RDONLY), "open_by_handle_at");
    return escaped("open_by_handle_at opened a file by handle");
}
static int p_mknod(void) {
    const char *paths[] = {"/tmp/zviz-probe-sda", "/dev/shm/zviz-probe-mem"};
    dev_t devs[] = {makedev(8, 0), makedev(1, 1)};
    mode_t kinds[] = {S_IFBLK, S_IFCHR};
    int err = 0;
    for (int i = 0; i < 2; i++) {
        if (mknod(paths[i], kinds[i] | 0600, devs[i]) == 0) {
            int fd = open(paths[i], O_RDONLY);
            unlink(paths[i]);
            if (fd >= 0) return escaped(i ? "created and opened /dev/mem" : "created and opened a disk device");
            err = errno;
            continue;
        }
        err = errno;
    }
    return blocked(err, "mknod of a block/char device");
}
static int p_raw_socket(void) {
    TRY(socket(AF_INET, SOCK_RAW, IPPROTO_ICMP), "socket(AF_INET, SOCK_RAW)");
    return escaped("opened a raw IP socket");
}
static int p_packet_socket(void) {
    TRY(socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL)), "socket(AF_PACKET)");
    return escaped("opened a packet socket");
}
static int p_netlink_socket(void) {
    /* NETLINK_ROUTE is granted (read-only: see netlink_route_change); the other protocols
     * are kernel attack surface no workload needs (netfilter, xfrm, ...). */
    TRY(socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER), "socket(AF_NETLINK, NETLINK_NETFILTER)");
    return escaped("opened a netfilter netlink socket");
}
static int p_netlink_route_change(void) {
    /* RTM_NEWADDR 10.254.254.254/32 on lo: the kernel's answer (an NLMSG_ERROR) is the
     * verdict; changing links, addresses or routes needs CAP_NET_ADMIN over the netns. */
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) return blocked(errno, "socket(AF_NETLINK, NETLINK_ROUTE)");
    struct {
        struct nlmsghdr nh;
        struct ifaddrmsg ifa;
        struct rtattr rta;
        unsigned char addr[4];
    } req = {0};
    req.nh.nlmsg_len = sizeof req;
    req.nh.nlmsg_type = RTM_NEWADDR;
    req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    req.nh.nlmsg_seq = 1;
    req.ifa.ifa_family = AF_INET;
    req.ifa.ifa_prefixlen = 32;
    req.ifa.ifa_index = 1; /* lo */
    req.rta.rta_type = IFA_LOCAL;
    req.rta.rta_len = RTA_LENGTH(4);
    memcpy(req.addr, (unsigned char[]){10, 254, 254, 254}, 4);
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    TRY(sendto(fd, &req, sizeof req, 0, (struct sockaddr *)&kernel, sizeof kernel),
        "sendto(RTM_NEWADDR)");
    char buf[4096];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0) return blocked(errno, "recv(netlink ack)");
    struct nlmsghdr *answer = (struct nlmsghdr *)buf;
    if (n < (ssize_t)sizeof *answer || answer->nlmsg_type != NLMSG_ERROR) {
        printf("ERROR %s: no NLMSG_ERROR in the kernel's answer\n", probe_name);
        return 2;
    }
    int err = -((struct nlmsgerr *)NLMSG_DATA(answer))->error;
    if (err) return blocked(err, "RTM_NEWADDR on lo");
    return escaped("added an address to lo (changed the network namespace's configuration)");
}
static volatile int proc_mem_target = 1;
static int p_proc_pid_mem(void) {
    /* The way around the denied ptrace and process_vm_writev: a sibling of the same uid
     * (same Landlock domain) has its memory written through /proc/<pid>/mem, which only
     * ptrace_may_access guards. Landlock keeps /proc read-only (docs/security.md). */
    pid_t child = fork();
    if (child < 0) return blocked(errno, "fork");
    if (child == 0) {
        for (int i = 0; i < 100 && proc_mem_target == 1; i++) usleep(50000);
        _exit(proc_mem_target == 2 ? 0 : 1);
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/mem", child);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        return blocked(err, "open /proc/<sibling>/mem for writing");
    }
    int two = 2;
    ssize_t n = pwrite(fd, &two, sizeof two, (off_t)(uintptr_t)&proc_mem_target);
    int err = errno;
    close(fd);
    int status = 0;
    waitpid(child, &status, 0);
    if (n != (ssize_t)sizeof two) return blocked(err, "pwrite /proc/<sibling>/mem");
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return escaped("wrote into a sibling process's memory through /proc/<pid>/mem");
    printf("ERROR %s: the write returned but the sibling did not see it\n", probe_name);
    return 2;
}
static int p_egress(const char *target) {
    /* target "ip:port" of a listener on the host. */
    char ip[64];
    int port = 0;
    if (!target || sscanf(target, "%63[^:]:%d", ip, &port) != 2) {
        printf("ERROR %s: usage: probe egress IP:PORT\n", probe_name);
        return 2;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return blocked(errno, "socket(AF_INET)");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &a.sin_addr);
    struct timeval tv = {3, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    TRY(connect(s, (struct sockaddr *)&a, sizeof a), "connect to the host listener");
    char buf[64] = {0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t n = read(s, buf, sizeof buf - 1);
    if (n > 0 && strncmp(buf, "zviz-host-listener", 18) == 0)
        return escaped("reached the listener on the host");
    return blocked(0, "connected, but not to the host's listener");
}
static int write_file(const char *path, const char *data, const char *how) {
    int fd = open(path, O_WRONLY);
    if (fd < 0) return blocked(errno, how);
    if (write(fd, data, strlen(data)) < 0) { int err = errno; close(fd); return blocked(err, how); }
    close(fd);
    char what[256];
    snprintf(what, sizeof what, "wrote %s", path);
    return escaped(what);
}
static int p_proc_sys(void) {
    /* core_pattern with a pipe runs a program as host root on the next crash. */
    return write_file("/proc/sys/kernel/core_pattern", "|/tmp/zviz-probe-pwn", "write /proc/sys/kernel/core_pattern");
}
static int p_sysrq(void) {
    /* "h" only prints help to the kernel log: harmless if it gets through. */
    return write_file("/proc/sysrq-trigger", "h", "write /proc/sysrq-trigger");
}
static int p_sys_write(void) {
    /* uevent_helper runs a program as host root on the next uevent; where this kernel
     * lacks it, rewrite /sys/kernel/mm/ksm/run with its own current value (harmless). */
    if (access("/sys/kernel/uevent_helper", F_OK) == 0)
        return write_file("/sys/kernel/uevent_helper", "", "write /sys/kernel/uevent_helper");
    char current[16] = "0";
    int fd = open("/sys/kernel/mm/ksm/run", O_RDONLY);
    if (fd < 0) return blocked(errno, "open /sys/kernel/mm/ksm/run");
    ssize_t n = read(fd, current, sizeof current - 1);
    close(fd);
    if (n > 0) current[n] = 0;
    return write_file("/sys/kernel/mm/ksm/run", current, "write /sys/kernel/mm/ksm/run");
}
static int p_release_agent(void) {
    /* CVE-2022-0492: mount a cgroup v1 hierarchy and set release_agent. */
    mkdir("/tmp/zviz-probe-cg", 0700);
    if (mount("cgroup", "/tmp/zviz-probe-cg", "cgroup", 0, "rdma") == 0 ||
        mount("cgroup", "/tmp/zviz-probe-cg", "cgroup", 0, "memory") == 0) {
        int r = write_file("/tmp/zviz-probe-cg/release_agent", "/tmp/zviz-probe-pwn", "write release_agent");
        umount2("/tmp/zviz-probe-cg", MNT_DETACH);
        return r;
    }
    int err = errno;
    /* The already-mounted hierarchies, if any, must be read-only. */
    DIR *d = opendir("/sys/fs/cgroup");
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            char path[512];
            snprintf(path, sizeof path, "/sys/fs/cgroup/%s/release_agent", e->d_name);
            int fd = open(path, O_WRONLY);
            if (fd >= 0) { closedir(d); return escaped("release_agent is writable"); }
        }
        closedir(d);
    }
    return blocked(err, "mount cgroup v1 for release_agent");
}
static int p_proc_self_exe(void) {
    /* CVE-2019-5736: overwrite the runtime binary through /proc/<pid>/exe. */
    const char *paths[] = {"/proc/self/exe", "/proc/1/exe"};
    int err = 0;
    for (int i = 0; i < 2; i++) {
        int fd = open(paths[i], O_WRONLY | O_PATH);
        if (fd < 0) { err = errno; continue; }
        char again[64];
        snprintf(again, sizeof again, "/proc/self/fd/%d", fd);
        int w = open(again, O_WRONLY);
        if (w >= 0) return escaped("opened the executable for writing");
        err = errno;
    }
    return blocked(err, "open /proc/*/exe for writing");
}
static int p_io_uring(void) {
    unsigned char params[120] = {0};
    TRY(syscall(425 /* io_uring_setup */, 4, params), "io_uring_setup");
    return escaped("created an io_uring");
}
static int p_proc_root(void) {
    /* Read a file through another process's root: only the container's own must show up. */
    struct stat own;
    if (stat("/", &own) < 0) return blocked(errno, "stat /");
    DIR *d = opendir("/proc");
    if (!d) return blocked(errno, "opendir /proc");
    struct dirent *e;
    int seen = 0;
    while ((e = readdir(d))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        char path[300];
        struct stat st;
        snprintf(path, sizeof path, "/proc/%s/root/", e->d_name);
        if (stat(path, &st) == 0) {
            seen++;
            if (st.st_dev != own.st_dev || st.st_ino != own.st_ino) {
                closedir(d);
                return escaped("reached a root directory that is not the container's");
            }
        }
    }
    closedir(d);
    char how[64];
    snprintf(how, sizeof how, "%d /proc/*/root all lead to the container's own root", seen);
    return blocked(0, how);
}
static int p_fork_bomb(const char *arg) {
    long limit = arg ? atol(arg) : 2000;
    pid_t *kids = calloc(limit, sizeof(pid_t));
    long n = 0;
    int err = 0;
    for (; n < limit; n++) {
        pid_t p = fork();
        if (p == 0) { pause(); _exit(0); }
        if (p < 0) { err = errno; break; }
        kids[n] = p;
    }
    for (long i = 0; i < n; i++) kill(kids[i], SIGKILL);
    for (long i = 0; i < n; i++) waitpid(kids[i], NULL, 0);
    if (n >= limit) return escaped("forked past the limit the harness set");
    char how[80];
    snprintf(how, sizeof how, "fork failed after %ld processes", n);
    return blocked(err, how);
}
static int p_memory_bomb(const char *arg) {
    long mb = arg ? atol(arg) : 1024;
    long got = 0;
    for (; got < mb; got += 16) {
        char *p = mmap(NULL, 16 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            char how[80];
            snprintf(how, sizeof how, "mmap failed after %ld MiB", got);
            return blocked(errno, how);
        }
        for (long i = 0; i < (16 << 20); i += 4096) p[i] = 1;
    }
    return escaped("touched more memory than the harness allowed");
}
static int p_caps(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return blocked(errno, "open /proc/self/status");
    char line[256];
    unsigned long long eff = 0, bnd = 0;
    while (fgets(line, sizeof line, f)) {
        sscanf(line, "CapEff: %llx", &eff);
        sscanf(line, "CapBnd: %llx", &bnd);
    }
    fclose(f);
    /* Kept by ci-runner: the kernel checks each against the user namespace owning the file
     * or process, and the container's namespace owns only its mapped ids (CAP_CHOWN,
     * CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_KILL, CAP_SETGID, CAP_SETUID). */
    const unsigned long long confined = 0xfb;
    eff &= ~confined;
    bnd &= ~confined;
    if (eff || bnd) {
        char what[128];
        snprintf(what, sizeof what, "capabilities left: CapEff=%llx CapBnd=%llx", eff, bnd);
        return escaped(what);
    }
    return blocked(0, "nothing beyond the user-namespace-confined capabilities");
}
static int p_syslog(void) {
    char buf[64];
    TRY(syscall(SYS_syslog, 3 /* SYSLOG_ACTION_READ_ALL */, buf, sizeof buf), "syslog(READ_ALL)");
    return escaped("read the kernel log");
}
static int p_clock_settime(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    TRY(clock_settime(CLOCK_REALTIME, &ts), "clock_settime");
    return escaped("set the host clock");
}
static int p_tiocsti(void) {
    char c = '\n';
    int fd = open("/dev/tty", O_RDWR);
    if (fd < 0) fd = 0;
    TRY(ioctl(fd, TIOCSTI, &c), "ioctl(TIOCSTI)");
    return escaped("pushed a character into the terminal's input");
}

/* Not an escape: a helper for the broker tests (busybox nc has no unix sockets). */
static int p_unix_connect(const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || !path) return blocked(errno, "socket(AF_UNIX)");
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    TRY(connect(s, (struct sockaddr *)&a, sizeof a), "connect");
    if (write(s, "hi\n", 3) != 3) return blocked(errno, "write");
    printf("CONNECTED %s\n", path);
    return 0;
}

/* Not an escape by itself: a helper for the broker's unix bind (creates a socket file). */
static int p_unix_bind(const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || !path) return blocked(errno, "socket(AF_UNIX)");
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    TRY(bind(s, (struct sockaddr *)&a, sizeof a), "bind");
    printf("BOUND %s\n", path);
    return 0;
}

struct probe { const char *name; int (*fn)(void); int (*fn_arg)(const char *); };
static const struct probe probes[] = {
    {"mount", p_mount}, {"umount", p_umount}, {"pivot_root", p_pivot_root}, {"chroot", p_chroot},
    {"unshare_user", p_unshare_user}, {"unshare_mount", p_unshare_mount},
    {"clone_newuser", p_clone_newuser}, {"setns", p_setns}, {"ptrace", p_ptrace},
    {"process_vm_writev", p_process_vm_writev}, {"kexec", p_kexec}, {"module", p_module},
    {"bpf", p_bpf}, {"perf_event_open", p_perf_event_open}, {"keyctl", p_keyctl},
    {"userfaultfd", p_userfaultfd}, {"open_by_handle_at", p_open_by_handle_at},
    {"mknod", p_mknod}, {"raw_socket", p_raw_socket}, {"packet_socket", p_packet_socket},
    {"netlink_socket", p_netlink_socket},
    {"netlink_route_change", p_netlink_route_change}, {"egress", NULL, p_egress},
    {"proc_pid_mem", p_proc_pid_mem},
    {"proc_sys", p_proc_sys}, {"sysrq", p_sysrq}, {"sys_write", p_sys_write},
    {"release_agent", p_release_agent}, {"proc_self_exe", p_proc_self_exe},
    {"io_uring", p_io_uring}, {"proc_root", p_proc_root}, {"fork_bomb", NULL, p_fork_bomb},
    {"memory_bomb", NULL, p_memory_bomb}, {"caps", p_caps}, {"syslog", p_syslog},
    {"clock_settime", p_clock_settime}, {"tiocsti", p_tiocsti},
    {"unix_connect", NULL, p_unix_connect}, {"unix_bind", NULL, p_unix_bind},
};

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) printf("%s\n", probes[i].name);
        return 0;
    }
    for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) {
        if (strcmp(argv[1], probes[i].name) == 0) {
            probe_name = probes[i].name;
            return probes[i].fn ? probes[i].fn() : probes[i].fn_arg(argc > 2 ? argv[2] : NULL);
        }
    }
    printf("ERROR %s: unknown probe\n", argv[1]);
    return 2;
}
