"""The security layers of a zviz container, and the hooks the runtime core calls.

    profile = resolve_profile(name_or_None, spec.annotations)   # create, first
    harden_spec(spec, profile)                                    # create, after load_spec
    channel = notify_channel(profile, verbose)                    # create, before forking
    plan = prepare(spec, profile, verbose)                        # PID 1, after pivot_root
    apply(plan, channel.container_fd if channel else None)        # PID 1, right before execve
    broker_pid = start_broker(channel, init_pid, profile, ...)    # supervisor, after the fork

Order in apply(): capabilities -> no_new_privs -> Landlock -> seccomp (last, so the
setup syscalls are not filtered). After apply() returns, PID 1 must call execve and
nothing else: the filter is live.

The seccomp listener (for the broker) never travels over sendmsg: the profile
filter may send sendmsg to the broker itself, which would deadlock before the broker
has the fd. PID 1 writes the listener's fd *number* on the channel (write(2) is
always allowed), the broker takes the fd with pidfd_getfd(2) and answers "ok"
(read(2)), and PID 1 closes its copy before execve, so the workload never holds
the listener.
"""

import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field

from runtime.errors import InvalidArgument, SecurityLayerError
from runtime.rootfs import secure_join

# Imported here, not lazily: PID 1 runs prepare()/apply() after pivot_root (and exec'd
# processes after joining the mount namespace), where the runtime's source tree is gone.
from runtime.security import (  # noqa: F401
    capabilities,
    kernel_gaps,
    landlock,
    network,
    seccomp,
    selection,
)
from runtime.security.profiles import Profile, load_profile
from runtime.spec import is_own_netns
from runtime.syscall import LINUX, Syscall

__all__ = [
    "HOST_NETWORK_FLAG",
    "Plan",
    "Profile",
    "apply",
    "check_resources",
    "harden_spec",
    "is_pod_sandbox",
    "make_writable_dirs",
    "maps_profile_ids",
    "notify_channel",
    "prepare",
    "resolve_profile",
    "start_broker",
]


def _warn(message: str) -> None:
    try:
        os.write(2, f"zviz: security: {message}\n".encode())
    except OSError:
        pass


def resolve_profile(choice, annotations: dict | None = None) -> Profile:
    """The one decision of which profile a container gets, whoever asks:

    - a name or file (`--profile`: root on the host chose it, any built-in or file);
    - a selection.ProfilePolicy (the shim's operator): the annotation io.zviz.profile
      if the policy allows it, else the policy's default (selection.choose);
    - None: the annotation under the default rule, else ci-runner;
    - a Profile: decided already (returned as it is).
    """
    if isinstance(choice, Profile):
        return choice
    if choice is None:
        choice = selection.ProfilePolicy()
    if isinstance(choice, selection.ProfilePolicy):
        return selection.choose(annotations, choice)
    if choice == "":
        raise InvalidArgument("profile: empty profile name")
    return load_profile(choice)


def maps_profile_ids(spec, profile: Profile) -> bool:
    """Whether the container's ids will be the profile's host range (host_uid..): the
    profile asks for a user namespace, the container makes its own (does not join one
    by path) and config.json maps no ids itself. harden_spec writes that mapping; a
    caller with its own ranges (the shim's id pool) swaps the range in before."""
    if not profile.user_namespace or spec.linux.uid_mappings:
        return False
    userns = spec.linux.namespace("user")
    return userns is None or userns.path is None


# How root on the host allows a spec without a network namespace, named in the refusal.
HOST_NETWORK_FLAG = "--allow-host-network (zviz create/run)"


def harden_spec(
    spec,
    profile: Profile,
    *,
    allow_host_network: bool = False,
    host_network_switch: str = HOST_NETWORK_FLAG,
    cluster_network=None,
    egress_nameservers=None,
) -> list[str]:
    """Make `spec` obey `profile` (a ceiling); returns what was changed, one line each.

    allow_host_network: root on the host (the shim's operator, `--allow-host-network`)
    lets a spec without a network namespace share the runtime's; host_network_switch
    names that switch in the refusal otherwise.
    cluster_network: the operator's cluster.ClusterNetwork (the shim's config), for the
    broker. egress_nameservers: where the profile's egress_hosts are resolved, as
    decided at create (kept in the state: an exec must not read them again from files
    the container may have changed since); None at create.

    Runs in the parent before anything is created. Also compiles (or fetches from the
    cache) the seccomp programs so PID 1 only loads bytes.
    """
    from runtime.security import capabilities as caps
    from runtime.spec import IdMapping, Memory, Namespace, Pids, Resources

    changes: list[str] = []
    linux_cfg = spec.linux

    # User namespace: container root maps to an unprivileged host range.
    if profile.user_namespace:
        userns = linux_cfg.namespace("user")
        if userns is None:
            linux_cfg.namespaces.insert(0, Namespace("user"))
            changes.append("user namespace added")
        if maps_profile_ids(spec, profile):
            linux_cfg.uid_mappings = [IdMapping(0, profile.host_uid, profile.id_count)]
            linux_cfg.gid_mappings = [IdMapping(0, profile.host_gid, profile.id_count)]
            changes.append(
                f"container ids 0-{profile.id_count - 1} mapped to host uid {profile.host_uid}, "
                f"gid {profile.host_gid}"
            )
        elif not linux_cfg.gid_mappings and linux_cfg.uid_mappings:
            linux_cfg.gid_mappings = [IdMapping(0, profile.host_gid, profile.id_count)]
    if not profile.allow_host_root_mapping:
        for kind, maps in (("uid", linux_cfg.uid_mappings), ("gid", linux_cfg.gid_mappings)):
            for i, m in enumerate(maps):
                if m.host_id <= 0 < m.host_id + m.size or m.host_id == 0:
                    raise InvalidArgument(
                        f"config.json: linux.{kind}Mappings[{i}]: maps host {kind} 0 into the "
                        f"container; profile {profile.name} allows only unprivileged host ids"
                    )

    _network_namespace(
        linux_cfg, profile, changes, allow_host_network, host_network_switch, spec.annotations
    )
    _egress_context(spec, profile, cluster_network, egress_nameservers)

    # Capabilities: the profile is a ceiling.
    if spec.process is not None:
        granted, cut = caps.ceiling(spec.process.capabilities, profile.capabilities)
        spec.process.capabilities = granted
        if cut:
            changes.append(f"capabilities beyond profile {profile.name} dropped: {', '.join(cut)}")
        if not spec.process.no_new_privileges and not profile.allow_new_privileges:
            changes.append(
                f"noNewPrivileges set (profile {profile.name}: no setuid gains;"
                " capabilities.allow_new_privileges is false)"
            )
            spec.process.no_new_privileges = True

    # A writable root (root.readonly false) is writable only where Landlock lets it be:
    # named here, since the kernel's refusal inside (EACCES) names no rule.
    if not spec.root.readonly and "/" not in profile.writable:
        changes.append(
            f"root.readonly false, but profile {profile.name} lets writes reach only"
            f" landlock.writable ({', '.join(profile.writable) or 'nothing'})"
            + (" and the volumes" if profile.writable_volumes else "")
        )

    # Resources: defaults and ceilings.
    if profile.pids_max is not None or profile.memory_max is not None:
        if linux_cfg.resources is None:
            linux_cfg.resources = Resources()
        res = linux_cfg.resources
    if profile.pids_max is not None:
        if res.pids is None:
            res.pids = Pids()
        if res.pids.limit is None or res.pids.limit <= 0 or res.pids.limit > profile.pids_max:
            changes.append(f"pids limit {res.pids.limit} -> {profile.pids_max}")
            res.pids.limit = profile.pids_max
    if profile.memory_max is not None:
        if res.memory is None:
            res.memory = Memory()
        limit = res.memory.limit
        if limit is None or limit <= 0 or limit > profile.memory_max:
            changes.append(f"memory limit {limit} -> {profile.memory_max}")
            res.memory.limit = profile.memory_max
            if res.memory.reservation and res.memory.reservation > profile.memory_max:
                res.memory.reservation = profile.memory_max
    if linux_cfg.resources is not None:
        _unified_within_ceilings(profile, linux_cfg.resources.unified)

    # Compile now (parent, cache on the host): PID 1 cannot see the cache after pivot_root.
    profile.programs["profile"] = seccomp.profile_program(profile, verbose=False)
    profile.programs["profile-verbose"] = seccomp.profile_program(profile, verbose=True)
    if linux_cfg.seccomp:
        profile.programs["oci"] = seccomp.oci_program(linux_cfg.seccomp)
    return changes


INET_FAMILIES = ("AF_INET", "AF_INET6")
# Set by containerd's CRI on the pod sandbox's (pause) container: "sandbox" (its app
# containers get "container"). Trusted only to take rights away.
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"


def is_pod_sandbox(annotations) -> bool:
    return (annotations or {}).get(CRI_CONTAINER_TYPE) == "sandbox"


def _network_namespace(
    linux_cfg,
    profile: Profile,
    changes: list[str],
    allow_host_network: bool,
    switch: str,
    spec_annotations=None,
) -> None:
    """The one network decision (docs/security.md, "Network").

    - a namespace of its own (no path): created, loopback only; nothing else to enforce;
    - a namespace joined by path (a pod's): joined under every profile, the profile's
      policy held inside it per container by the broker;
    - no namespace entry, or a path to the runtime's own namespace: the host's network,
      refused unless root on the host allows it, then policed like a joined one (with
      nothing of the host counted as the container's own).

    Mode "none" in a shared namespace mediates every way out (NO_NETWORK_MEDIATED): the
    broker lets only loopback and the pod's own addresses through. A fresh namespace keeps
    its zero-cost path: no broker, its loopback is all there is.
    """
    from runtime.security.profiles import NO_NETWORK_MEDIATED

    netns = linux_cfg.namespace("network")
    host = netns is None or (netns.path is not None and is_own_netns(netns.path))
    if not host and netns.path is None:
        return
    if host:
        if not allow_host_network:
            raise InvalidArgument(
                f"profile {profile.name}: host network refused; the operator allows it with {switch}"
            )
        shared = "the host's network namespace"
    else:
        shared = f"network namespace {netns.path}"
        profile.network_joined = True
    if profile.network == "none" and is_pod_sandbox(spec_annotations):
        # The pod's pause process needs no network of its own: without inet sockets its
        # sends cannot leave the pod, and the broker (a process, ~9 MiB, its start on
        # the pod's critical path) is left out unless the kernel lacks Landlock's
        # abstract-socket scope, which the broker otherwise keeps.
        profile.socket_families = tuple(
            family for family in profile.socket_families if family not in INET_FAMILIES
        )
        profile.digest = _derived_digest(profile.digest, "pod-sandbox-no-inet")
        changes.append(f"{shared} shared by the pod's sandbox: no inet sockets")
        if profile.landlock_scope and landlock.abi_version() >= landlock.ABI_SCOPE:
            return
    if profile.network == "none":
        profile.mediate = NO_NETWORK_MEDIATED
        # Another filter than the profile file's: the seccomp cache must tell them apart.
        profile.digest = _derived_digest(profile.digest, "shared-network-none")
        reach = "nothing" if host else "loopback and the namespace's own addresses"
        changes.append(
            f"{shared} shared: profile {profile.name} has no network, the broker lets "
            f"connect and addressed sends reach {reach} only"
        )
    else:
        changes.append(f"{shared} shared: profile {profile.name}'s egress rules hold in it")


def _egress_context(spec, profile: Profile, cluster_network, egress_nameservers) -> None:
    """What the broker needs beyond the profile: the operator's cluster network and the
    nameservers for egress_hosts (docs/security.md, "Name-based egress").

    The nameservers are the operator's cluster_dns when named, else those of the
    resolv.conf the runtime's caller bind-mounts at /etc/resolv.conf (containerd's CRI:
    the pod's DNS config), read here, on the host, before the container runs. Never the
    container's rootfs: what the container can write cannot steer the broker.
    """
    profile.cluster_network = cluster_network
    if not profile.egress_hosts:
        return
    if egress_nameservers is not None:
        profile.egress_nameservers = tuple((str(ip), int(port)) for ip, port in egress_nameservers)
        return
    if cluster_network is not None and cluster_network.dns:
        profile.egress_nameservers = tuple((str(ip), port) for ip, port in cluster_network.dns)
        return
    from runtime.security import dns

    for mount in reversed(spec.mounts or ()):
        if mount.destination == "/etc/resolv.conf" and mount.is_bind:
            try:
                with open(mount.source, "rb") as f:
                    profile.egress_nameservers = tuple(dns.nameservers(f.read(65536)))
            except OSError as e:
                raise InvalidArgument(
                    f"profile {profile.name}: egress_hosts: cannot read the resolv.conf "
                    f"mounted from {mount.source}: {e.strerror}"
                ) from None
            return


def _derived_digest(digest: str, variant: str) -> str:
    from runtime.security.profiles import sha256

    return sha256(f"{digest}:{variant}".encode()).hexdigest()


def check_resources(profile: Profile, resources) -> None:
    """`zviz update`: new linux.resources (a spec.Resources) may not go above the profile's
    ceilings."""
    limits = (
        ("pids", "limit", profile.pids_max, resources.pids and resources.pids.limit),
        ("memory", "limit", profile.memory_max, resources.memory and resources.memory.limit),
    )
    for group, key, ceiling, value in limits:
        if ceiling is None:
            continue
        if value is not None and (value <= 0 or value > ceiling):
            raise InvalidArgument(
                f"resources: {group}.{key} {value} is above profile {profile.name}'s "
                f"ceiling {ceiling} (-1/0 would be unlimited)"
            )
    _unified_within_ceilings(profile, resources.unified)


def _unified_within_ceilings(profile: Profile, unified: dict[str, str]) -> None:
    """cgroup v2 files in linux.resources.unified that hold a capped limit (written after
    the typed fields, they would set it again): a number within the ceiling, or refused.
    Create and update both ask here."""
    for file, ceiling in (("pids.max", profile.pids_max), ("memory.max", profile.memory_max)):
        value = unified.get(file)
        if ceiling is None or value is None:
            continue
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 20 and int(text) <= ceiling):
            raise InvalidArgument(
                f'linux.resources.unified["{file}"]: {value!r} is above profile '
                f"{profile.name}'s ceiling {ceiling} (a number up to it, or leave it out)"
            )


@dataclass
class Plan:
    """What PID 1 enforces in apply(); built by prepare() while setup syscalls still work."""

    profile_name: str
    capabilities: object  # runtime.spec.Capabilities
    cap_last_cap: int
    landlock: object | None  # landlock.Ruleset, or None when running without Landlock
    programs: list = field(default_factory=list)  # seccomp.Program, loaded in this order
    verbose: bool = False
    notes: list[str] = field(default_factory=list)
    # False only where the profile allows new privileges and the process asks for none.
    no_new_privs: bool = True


def prepare(
    spec,
    profile: Profile,
    verbose: bool = False,
    own_proc_files: bool = False,
    exec_anchor_fd: int | None = None,
) -> Plan:
    """In PID 1 after pivot_root: build every layer, fail closed if one is missing.

    own_proc_files: PID 1 (not an exec) may write its own thread name and OOM score
    beneath /proc (`_allow_own_proc_files`). exec_anchor_fd: PID 1's O_PATH fd of the
    exec anchor's binary (runtime/exec_anchor.py), which it execs once restricted."""
    from runtime.security import capabilities as caps

    notes: list[str] = []
    if spec.linux.creates_namespace("network"):
        try:
            network.loopback_up()
        except OSError as e:
            raise SecurityLayerError(f"network: cannot bring loopback up: {e}") from None

    try:
        last = caps.last_cap()
    except (OSError, ValueError) as e:
        raise SecurityLayerError(f"capabilities: cannot read cap_last_cap: {e}") from None
    # The ceiling again, here: an exec'd process's capabilities (zviz exec --cap,
    # process.json) never went through harden_spec.
    granted, _ = caps.ceiling(
        spec.process.capabilities if spec.process else None, profile.capabilities
    )

    ruleset = None
    abi = landlock.abi_version()
    if abi < 1 and profile.landlock_required:
        raise SecurityLayerError(
            f"landlock: the kernel has no Landlock and profile {profile.name} requires it"
        )
    # Probed only where a listener is loaded: elsewhere the flag is never asked for.
    wait_killable_recv = (
        seccomp.wait_killable_recv_supported() if profile.needs_broker(verbose) else True
    )
    gaps = kernel_gaps.decide(profile, abi, wait_killable_recv)
    refused = kernel_gaps.refusal(profile, gaps, abi)
    if refused:
        raise SecurityLayerError(refused)
    if abi < 1:
        _warn(f"landlock: not available; profile {profile.name} allows running without it")
        notes.append("landlock: unavailable, running without it")
    else:
        ruleset = _landlock_ruleset(spec, profile, abi, own_proc_files, exec_anchor_fd)
    notes += [
        f"{g.table}: {g.feature} missing (needs {g.needs}), allowed by profile {profile.name}"
        for g in gaps
        if g.verdict == "missing, allowed" and (g.table != "landlock" or abi >= 1)
    ]

    programs = []
    if spec.linux.seccomp:
        programs.append(profile.programs.get("oci") or seccomp.oci_program(spec.linux.seccomp))
    key = "profile-verbose" if verbose else "profile"
    programs.append(profile.programs.get(key) or seccomp.profile_program(profile, verbose))
    if not wait_killable_recv:
        programs = [seccomp.without_wait_killable_recv(p) if p.listener else p for p in programs]
    # Again here, as for capabilities: an exec'd process never went through harden_spec.
    no_new_privs = not profile.allow_new_privileges or (
        spec.process is None or spec.process.no_new_privileges
    )
    return Plan(profile.name, granted, last, ruleset, programs, verbose, notes, no_new_privs)


def _writable_mounts(spec) -> list[str]:
    paths = []
    for m in spec.mounts:
        dest = m.destination
        if dest == "/dev" or dest.startswith(("/proc", "/sys")):
            continue
        if "ro" in m.options or "rro" in m.options:
            continue
        if m.is_bind or m.type == "tmpfs":
            paths.append(dest)
    return paths


# The most entries an image may have in "/". Each needs a Landlock rule of its own (a
# rule on "/" would reach /dev), built by PID 1 while its caller waits: under the
# shim, every other container it serves. Real images have a few dozen; 20,000 took
# a run from 0.03 s to 1 s.
MAX_TOP_LEVEL_ENTRIES = 1024


def _allow_top_level_entries(rs) -> None:
    """READ beneath every top-level entry but /dev; an image with too many is refused."""
    with os.scandir("/") as entries:
        for count, entry in enumerate(entries, 1):
            if count > MAX_TOP_LEVEL_ENTRIES:
                raise SecurityLayerError(
                    f"landlock: the image has more than {MAX_TOP_LEVEL_ENTRIES} entries in /"
                    " (each needs a rule of its own): refused"
                )
            # A symlink gets no rule (its target's decides): known from the directory
            # entry itself, without a syscall.
            if entry.name != "dev" and not entry.is_symlink():
                rs.allow_path("/" + entry.name, landlock.READ)


def _allow_stdio_fifos(rs) -> None:
    """Reopening its own stdio fifos, as the fds it holds allow: `echo > /dev/stdout`
    opens /proc/self/fd/1 again. A fifo containerd made lies outside the rootfs, so no
    other rule covers it; the rule covers that one file and nothing beside it. Pipes
    need none: Landlock does not check them. (An exec forked by the exec anchor is in
    PID 1's domain, with these rules for PID 1's fifos only: the shim gives execs pipes.)"""
    for fd in (0, 1, 2):
        link = f"/proc/self/fd/{fd}"
        try:
            if os.readlink(link).startswith("pipe:") or not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            access = _access_of(fcntl.fcntl(fd, fcntl.F_GETFL))
            path_fd = os.open(link, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # not open: no rule
        try:
            rs.allow_fd(path_fd, access, f"stdio fifo {link}")
        finally:
            os.close(path_fd)


# What a program writes about itself beneath /proc (issue 14 item 2): its name
# (`echo name > /proc/self/comm`; glibc's pthread_setname_np writes task/<tid>/comm)
# and, raising it, its OOM score (a lower value needs CAP_SYS_RESOURCE: the kernel's
# check). One rule per file: a rule on /proc/<pid> or its task directory would also
# reach /proc/1/mem, which a child in PID 1's Landlock domain could then write (the
# route the proc_pid_mem probe pins). The kernel lets only the thread group itself
# write comm; a child may raise PID 1's oom_score_adj, as under runc.
OWN_PROC_FILES = ("comm", "oom_score_adj", "task/{pid}/comm", "task/{pid}/oom_score_adj")


def _allow_own_proc_files(rs) -> None:
    """WRITE_FILE and TRUNCATE on PID 1's own OWN_PROC_FILES, each pinned by a bind
    mount on itself.

    procfs makes a new inode each time it looks a /proc/<pid> entry up, and drops an
    unused entry's dentry under memory pressure: a rule holds the old inode and would
    silently stop applying (seen after drop_caches). The bind mount holds the dentry,
    so the inode the rule is on, for the container's life; the workload cannot unmount
    it (seccomp). Threads made later and child processes have entries no rule names
    (docs/security.md, "Writes beneath /proc")."""
    from runtime import linux

    pid = os.getpid()
    if os.readlink("/proc/self") != str(pid):
        return  # a /proc of another pid namespace: no entry here is ours
    for name in OWN_PROC_FILES:
        path = f"/proc/{pid}/" + name.format(pid=pid)
        try:
            linux.mount(path, path, None, linux.MS_BIND)
        except OSError as e:
            # Unpinned, the rule could lapse at any time: grant nothing (EACCES, as before).
            _warn(f"landlock: cannot pin {path} ({e.strerror}): its writes stay refused")
            continue
        # TRUNCATE: a shell's `echo x > /proc/self/comm` opens with O_TRUNC (a no-op
        # on these files, but Landlock checks the right).
        rs.allow_path(path, landlock.FS_WRITE_FILE | landlock.FS_TRUNCATE)


def _access_of(flags: int) -> int:
    mode = flags & os.O_ACCMODE
    access = 0
    if mode in (os.O_RDONLY, os.O_RDWR):
        access |= landlock.FS_READ_FILE
    if mode in (os.O_WRONLY, os.O_RDWR):
        access |= landlock.FS_WRITE_FILE
    return access


def _signals_need_scope(spec) -> bool:
    """Whether Landlock's signal scope guards anything the pid namespace does not.

    In a pid namespace of the container's own, every process a signal can reach is the
    container's: PID 1's tree and its execs. An exec that takes the old path (not the
    exec anchor's: docs/architecture.md, "An exec and PID 1's Landlock domain") is in a
    Landlock domain of its own, a sibling of PID 1's, so the scope would only stop its
    `kubectl exec ... kill -HUP 1` (or `nginx -s reload`), which runc allows. A joined pid namespace (a pod sharing its
    processes, or the host's) holds processes of others: there the scope stays."""
    linux_section = getattr(spec, "linux", None)
    return linux_section is None or not linux_section.creates_namespace("pid")


# Mounted by the runtime, never the image's: a writable path beneath them is a device or
# a kernel file, never a directory to make.
_NOT_MADE_BENEATH = ("/dev", "/proc", "/sys")


def make_writable_dirs(spec, profile: Profile) -> list[str]:
    """In PID 1 after pivot_root (before Landlock): make each directory of the profile's
    `writable` list that the image lacks (ci-runner's /builds and /workspace), empty,
    owned by the container's root, mode 0755; the paths made.

    Landlock rules attach to existing inodes, and "/" itself is read-only to the
    workload, so without this a job could never `mkdir /builds`, which root in the
    container does under runc. Not on a read-only root (runc's process could not
    either). The image is not trusted: one component at a time with O_NOFOLLOW, and a
    component that is a symlink or a file stops the walk: its target's own rules decide,
    as `Ruleset.allow_path` does."""
    if spec.root is not None and spec.root.readonly:
        return []
    made = []
    for path in profile.writable:
        clean = os.path.normpath(path)
        if any(clean == top or clean.startswith(top + "/") for top in _NOT_MADE_BENEATH):
            continue
        try:
            if _make_dir_nofollow(clean):
                made.append(clean)
        except OSError as e:
            # The path stays absent, as under runc. A rootfs on a read-only filesystem is
            # a read-only root by other means: nothing to say.
            if e.errno != errno.EROFS:
                _warn(f"landlock: cannot make writable directory {clean} ({e.strerror})")
    return made


def _make_dir_nofollow(path: str) -> bool:
    """Make PATH's missing components beneath "/", following no symlink; whether any."""
    made = False
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in (part for part in path.split("/") if part):
            flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                inner = os.open(name, flags, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(name, 0o755, dir_fd=fd)
                made = True
                inner = os.open(name, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    return made  # a symlink or a file of the image: not followed
                raise
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    return made


def _landlock_ruleset(
    spec, profile: Profile, abi: int, own_proc_files: bool = False, exec_anchor_fd=None
):
    from runtime import denials

    restrict_bind = profile.tcp_bind is not None and profile.network != "none"
    restrict_connect = profile.tcp_connect is not None and profile.network != "none"
    try:
        rs = landlock.Ruleset(
            abi,
            restrict_bind,
            restrict_connect,
            profile.landlock_scope,
            scope_signals=_signals_need_scope(spec),
            records=denials.enabled(),
        )
        # Read and execute everywhere but /dev; in /dev only the listed devices. Rules
        # only add rights, so "/" itself gets just READ_DIR and each other top-level
        # entry gets READ: a device config.json adds (or the host's, under a shared
        # /dev) stays unreadable unless the profile lists it.
        rs.allow_path("/", landlock.FS_READ_DIR)
        _allow_top_level_entries(rs)
        rs.allow_path("/dev", landlock.FS_READ_DIR)
        for path in profile.devices:
            rs.allow_path(path, landlock.READ)
        for path in profile.writable:
            rs.allow_path(path, landlock.READ | landlock.WRITE)
        if profile.writable_volumes:
            # A volume is where its mount landed: its destination resolved inside the
            # rootfs as the core resolved it, then opened following no symlink.
            for destination in dict.fromkeys(_writable_mounts(spec)):
                path = secure_join("/", destination)
                if os.path.normpath(path) == "/":
                    # The core refuses such a mount; a rule here would open the rootfs.
                    raise SecurityLayerError(
                        f"landlock: volume {destination} resolves to the rootfs root: refused"
                    )
                rs.allow_path(path, landlock.READ | landlock.WRITE)
        for path in profile.device_ioctl:
            rs.allow_path(path, landlock.FS_IOCTL_DEV)
        _allow_stdio_fifos(rs)
        if own_proc_files:
            _allow_own_proc_files(rs)
        if exec_anchor_fd is not None:
            # That one file, outside the rootfs: PID 1's child execs it after restrict.
            # The workload has no path to it (the fd is gone at PID 1's execve).
            rs.allow_fd(exec_anchor_fd, landlock.FS_EXECUTE | landlock.FS_READ_FILE, "exec anchor")
        for port in profile.tcp_bind or ():
            rs.allow_port(port, landlock.NET_BIND_TCP)
        for port in profile.tcp_connect or ():
            rs.allow_port(port, landlock.NET_CONNECT_TCP)
    except OSError as e:
        raise SecurityLayerError(f"landlock: building the ruleset: {e}") from None
    return rs


def apply(plan: Plan, notify_channel=None, syscall: Syscall = LINUX) -> None:
    """In PID 1 right before execve: capabilities -> no_new_privs -> Landlock -> seccomp
    (Landlock -> seccomp -> capabilities where the plan sets no no_new_privs).

    notify_channel: the NotifyChannel from notify_channel() (or its container_fd) when
    the profile needs a broker; anything else (None, the core's sync channel) is ignored.
    syscall: the capability and prctl calls' seam (runtime/syscall.py); Landlock and
    seccomp load through their own modules.
    """
    from runtime import linux
    from runtime.security import capabilities as caps

    if isinstance(notify_channel, NotifyChannel):
        channel_fd = notify_channel.container_fd
    elif isinstance(notify_channel, int):
        channel_fd = notify_channel
    else:
        channel_fd = None
    if any(p.listener for p in plan.programs) and channel_fd is None:
        # Refuse before anything is loaded: with no broker the mediated calls would
        # only ever fail, and --verbose would log nothing.
        raise SecurityLayerError(
            f"seccomp: profile {plan.profile_name} needs a broker (network mediation or "
            "--verbose) but the runtime gave no notify channel"
        )
    if plan.no_new_privs:
        caps.drop(plan.capabilities, plan.cap_last_cap, syscall)
        try:
            syscall.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        except OSError as e:
            raise SecurityLayerError(f"no_new_privs: {e}") from None
    else:
        # Without no_new_privs the kernel lets only CAP_SYS_ADMIN (in the container's
        # user namespace) restrict a process with Landlock or seccomp: both come before
        # the capabilities are dropped, as runc does. Both layers are then in place
        # before anything else runs; the drop's capset and prctl calls pass through
        # the filters (a filter that refuses them fails the container: drop raises).
        try:
            caps.raise_effective_to_permitted(syscall)
        except OSError as e:
            raise SecurityLayerError(f"capabilities: cannot raise effective: {e}") from None
    if plan.landlock is not None:
        try:
            plan.landlock.restrict()
        except OSError as e:
            raise SecurityLayerError(f"landlock: restrict_self: {e}") from None
    listener = None
    for program in plan.programs:
        fd = seccomp.load(program)
        if fd is not None:
            listener = fd
    # The filter is live: from here on only write, read and close (and, without
    # no_new_privs, the capability drop), then the caller's execve.
    if listener is not None:
        os.write(channel_fd, b'{"listener_fd": %d}' % listener)
        answer = os.read(channel_fd, 16)
        # The workload must never hold the listener: it could answer its own calls.
        os.close(listener)
        if answer != b"ok":
            raise SecurityLayerError("seccomp: the broker did not take the notify fd")
        os.close(channel_fd)
    if not plan.no_new_privs:
        # After the hand-over: a drop call the filter sends to the broker (a profile
        # that denies capset under --verbose) is answered, never left waiting.
        caps.drop(plan.capabilities, plan.cap_last_cap, syscall)


@dataclass
class NotifyChannel:
    """A SOCK_SEQPACKET pair: PID 1 keeps container_fd, the broker supervisor_fd."""

    supervisor_fd: int
    container_fd: int

    def close_container_end(self) -> None:
        if self.container_fd >= 0:
            os.close(self.container_fd)
            self.container_fd = -1

    def close_supervisor_end(self) -> None:
        if self.supervisor_fd >= 0:
            os.close(self.supervisor_fd)
            self.supervisor_fd = -1


def notify_channel(profile: Profile, verbose: bool = False) -> NotifyChannel | None:
    """The channel PID 1 hands its seccomp listener over, or None if no broker is needed.

    Call before forking; the child keeps container_fd (pass it to apply) and closes
    supervisor_fd; the parent closes container_fd and passes the channel to start_broker.
    """
    if not profile.needs_broker(verbose):
        return None
    import _socket

    a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    container_fd = b.detach()
    supervisor_fd = a.detach()
    # PID 1's end must survive the core's fd hygiene until apply(); it is closed there.
    return NotifyChannel(supervisor_fd, container_fd)


def start_broker(
    channel: NotifyChannel,
    init_pid: int,
    profile: Profile,
    *,
    verbose: bool = False,
    container_id: str = "",
    log_path: str | None = None,
    records_path: str | None = None,
    record_context: dict | None = None,
) -> int:
    """Fork the container's broker process (detached; it ends when the container does).

    Returns its pid. Works the same for `zviz run`, detached `zviz create` and the shim.
    """
    from runtime.security import broker

    return broker.spawn(
        channel,
        init_pid,
        profile,
        verbose=verbose,
        container_id=container_id,
        log_path=log_path,
        records_path=records_path,
        record_context=record_context,
    )
