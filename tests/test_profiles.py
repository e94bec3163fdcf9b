"""Profiles as data: loading, extending, validating, selecting, and what they do to a spec."""

import json

import pytest

from runtime import security
from runtime.errors import InvalidArgument
from runtime.security import profile_cli, profiles
from runtime.security.capabilities import CONFINED_TO_USER_NAMESPACE
from tests.test_security_layers import make_spec

BUILT_IN = ["batch-job", "ci-runner", "development", "hostile-tenant", "web-server"]


def test_built_in_profiles_load():
    assert profiles.list_profiles() == BUILT_IN
    for name in BUILT_IN:
        p = profiles.load_profile(name)
        assert p.name == name and p.allow and p.deny
    assert profiles.load_profile("development").unsafe
    assert not profiles.load_profile("ci-runner").unsafe


def test_issue_requirements_hold_in_the_built_ins():
    must_deny = {
        "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "ptrace",
        "process_vm_readv", "process_vm_writev", "kexec_load", "kexec_file_load", "init_module",
        "finit_module", "delete_module", "bpf", "perf_event_open", "userfaultfd", "keyctl",
        "add_key", "request_key", "open_by_handle_at", "name_to_handle_at", "reboot", "swapon",
        "swapoff", "acct", "quotactl", "lookup_dcookie", "io_uring_setup", "io_uring_enter",
        "io_uring_register", "clock_settime", "settimeofday", "adjtimex", "syslog", "iopl",
        "ioperm", "mount_setattr", "fsopen", "fsmount", "move_mount", "open_tree", "pidfd_getfd",
    }  # fmt: skip
    for name in ("ci-runner", "hostile-tenant", "batch-job", "web-server"):
        p = profiles.load_profile(name)
        assert must_deny <= set(p.deny), (name, must_deny - set(p.deny))
        # Only what the kernel confines to the container's user namespace (issue 14).
        assert p.capabilities <= CONFINED_TO_USER_NAMESPACE | {"CAP_NET_BIND_SERVICE"}
    assert not profiles.load_profile("hostile-tenant").capabilities
    assert profiles.load_profile("batch-job").memory_max == 8 << 30
    assert profiles.load_profile("batch-job").network == "none"
    hostile = profiles.load_profile("hostile-tenant")
    assert len(hostile.allow) < len(profiles.load_profile("ci-runner").allow)
    assert hostile.network == "none" and hostile.pids_max <= 128
    dev = profiles.load_profile("development")
    assert "ptrace" in dev.allow and "ptrace" not in dev.deny
    web = profiles.load_profile("web-server")
    assert web.network == "namespace" and {"connect", "bind", "sendto", "sendmsg"} <= set(
        web.mediate
    )


def test_extends_add_and_remove(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        '[profile]\nextends = "ci-runner"\n'
        '[seccomp]\nallow_remove = ["mknod", "mknodat"]\ndeny_add = ["mknod"]\n'
        "[resources]\npids_max = 10\n"
    )
    p = profiles.load_profile(str(path))
    base = profiles.load_profile("ci-runner")
    assert p.name == "mine" and p.pids_max == 10 and p.memory_max == base.memory_max
    assert "mknod" not in p.allow and "mknod" in p.deny and "mknodat" not in p.allow
    assert p.digest != base.digest


@pytest.mark.parametrize(
    "text, message",
    [
        ("[seccomp]\nallow = ['opne']\n", "seccomp.allow: unknown syscall 'opne'"),
        ("[capabilities]\nallow = ['CAP_SYS_GOD']\n", "capabilities.allow[0]: unknown capability"),
        ("[capabilities]\nallow_new_privileges = 'yes'\n", "capabilities.allow_new_privileges"),
        ("[network]\nmode = 'host'\n", "network.mode: must be one of none, namespace"),
        ("[network]\nmod = 'none'\n", "network.mod: unknown key"),
        ("[nonsense]\n", "unknown table [nonsense]"),
        ("[resources]\nmemory_max = 'lots'\n", "resources.memory_max: must be bytes or a size"),
        ("[seccomp]\nallow = ['read']\ndeny = ['read']\n", "both allowed and denied: read"),
        ("[user_namespace]\nhost_uid = 0\n", "unprivileged host id"),
        ("[landlock]\nwritable = ['tmp']\n", "landlock.writable[0]: must be an absolute path"),
        (
            "[network]\nmode = 'namespace'\negress = [{cidr = 'nope'}]\n",
            "egress[0].cidr: not a CIDR",
        ),
        ("[profile]\nextends = 'no-such-profile'\n", "unknown profile 'no-such-profile'"),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_bad_profiles_are_refused_with_the_key_named(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        profiles.load_profile(str(path))
    assert message in str(info.value) and str(path) in str(info.value)


def test_extends_cycle_is_refused(tmp_path):
    (tmp_path / "a.toml").write_text("[profile]\nextends = 'b.toml'\n")
    (tmp_path / "b.toml").write_text("[profile]\nextends = 'a.toml'\n")
    with pytest.raises(InvalidArgument, match="extends itself"):
        profiles.load_profile(str(tmp_path / "a.toml"))


def test_selection_order_flag_then_annotation_then_default():
    ann = {"io.zviz.profile": "batch-job"}
    assert security.resolve_profile("hostile-tenant", ann).name == "hostile-tenant"
    assert security.resolve_profile(None, ann).name == "batch-job"
    assert security.resolve_profile(None, {}).name == "ci-runner"
    with pytest.raises(InvalidArgument, match="unknown profile 'nope'"):
        security.resolve_profile("nope", {})
    with pytest.raises(InvalidArgument, match="unknown profile 'nope'"):
        security.resolve_profile(None, {"io.zviz.profile": "nope"})


def test_harden_spec_adds_user_namespace_and_ceilings(tmp_path):
    spec = make_spec(tmp_path)
    spec.linux.resources.pids = None
    profile = security.resolve_profile("ci-runner", {})
    changes = security.harden_spec(spec, profile)
    assert spec.linux.namespaces[0].type == "user"
    assert spec.linux.creates_namespace("network")
    # A namespace of its own: loopback only, no broker (the zero-cost path).
    assert not profile.mediate and not profile.network_joined
    m = spec.linux.uid_mappings[0]
    assert (m.container_id, m.host_id, m.size) == (0, 100000, 65536)
    # The default config asks for AUDIT_WRITE, KILL, NET_BIND_SERVICE: ci-runner keeps KILL.
    assert spec.process.capabilities.bounding == ["CAP_KILL"]
    assert spec.linux.resources.pids.limit == 1024
    assert spec.linux.resources.memory.limit == 4 << 30
    assert spec.process.no_new_privileges
    assert any(
        "capabilities beyond profile ci-runner dropped: CAP_AUDIT_WRITE, CAP_NET_BIND_SERVICE" in c
        for c in changes
    ), changes


@pytest.mark.parametrize(
    "profile_name, kept", [("development", True), ("ci-runner", False), ("web-server", False)]
)
def test_no_new_privileges_false_is_kept_only_where_the_profile_allows_it(
    tmp_path, profile_name, kept
):
    """runtime-tools' programs (runc's default config) ask for noNewPrivileges false."""
    spec = make_spec(tmp_path)
    spec.process.no_new_privileges = False
    profile = security.resolve_profile(profile_name, {})
    assert profile.allow_new_privileges is kept
    changes = security.harden_spec(spec, profile)
    assert spec.process.no_new_privileges is not kept
    named = f"noNewPrivileges set (profile {profile_name}: no setuid gains;"
    assert any(c.startswith(named) for c in changes) is not kept, changes


@pytest.mark.parametrize("profile_name, named", [("ci-runner", True), ("development", False)])
def test_a_writable_root_limited_by_landlock_is_named(tmp_path, profile_name, named):
    """root.readonly false: the rootfs is writable only where the profile's Landlock
    rules say (runtime-tools' killsig writes /TERM), and the change names the rule."""
    spec = make_spec(tmp_path)
    spec.root.readonly = False
    changes = security.harden_spec(spec, security.resolve_profile(profile_name, {}))
    note = f"root.readonly false, but profile {profile_name} lets writes reach only"
    assert any(c.startswith(note) and "/tmp" in c for c in changes) is named, changes
    spec = make_spec(tmp_path)
    spec.root.readonly = True
    changes = security.harden_spec(spec, security.resolve_profile(profile_name, {}))
    assert not any(c.startswith("root.readonly false") for c in changes), changes


@pytest.mark.parametrize(
    "joined, hostname, refused",
    [
        ("uts", "mrsdalloway", "hostname: the uts namespace given by path belongs to the host's"),
        ("uts", "", None),  # nothing to set: joined as it is
        ("mount", "", "a mount namespace given by path belongs to the host's user namespace"),
        ("pid", "", "a pid namespace given by path belongs to the host's user namespace"),
        ("ipc", "mrsdalloway", None),
    ],
)
def test_host_owned_namespaces_by_path_are_refused_naming_the_profile(
    tmp_path, joined, hostname, refused
):
    """runtime-tools' linux_ns_path joins the host's namespaces by path; from a user
    namespace of its own the container could not set them up, so zviz refuses up front
    (the uts one failed in PID 1 with sethostname: EPERM before)."""
    from runtime.spawn import parent

    spec = make_spec(tmp_path)
    spec.hostname = hostname
    profile = security.resolve_profile("ci-runner", {})
    if refused is None:
        parent._refuse_host_owned_joins([(joined, -1)], profile, spec)
        return
    with pytest.raises(InvalidArgument) as info:
        parent._refuse_host_owned_joins([(joined, -1)], profile, spec)
    assert refused in str(info.value) and "profile ci-runner" in str(info.value)


def test_harden_spec_lowers_limits_above_the_ceiling_keeps_lower_ones(tmp_path):
    spec = make_spec(tmp_path, resources={"pids": {"limit": 100000}, "memory": {"limit": 1 << 20}})
    security.harden_spec(spec, security.resolve_profile("hostile-tenant", {}))
    assert spec.linux.resources.pids.limit == 64
    assert spec.linux.resources.memory.limit == 1 << 20
    # the cgroup plans read these same typed resources: the lowered limit is what is written
    from runtime.cgroups import v1

    written = {w.file: w.value for w in v1.plan(spec.linux.resources)}
    assert written["pids.max"] == "64"
    assert written["memory.limit_in_bytes"] == str(1 << 20)


def test_harden_spec_refuses_a_mapping_of_host_root(tmp_path):
    spec = make_spec(
        tmp_path,
        uidMappings=[{"containerID": 0, "hostID": 0, "size": 1}],
        gidMappings=[{"containerID": 0, "hostID": 0, "size": 1}],
        namespaces=[{"type": t} for t in ("user", "mount", "pid", "uts")],
    )
    with pytest.raises(InvalidArgument, match="maps host uid 0"):
        security.harden_spec(spec, security.resolve_profile("ci-runner", {}))


@pytest.mark.parametrize("profile_name", ["ci-runner", "batch-job", "hostile-tenant"])
def test_no_network_profile_joins_a_pod_namespace_and_mediates_egress(
    tmp_path, monkeypatch, profile_name
):

    monkeypatch.setattr(security, "is_own_netns", lambda path: False)
    spec = make_spec(tmp_path)
    spec.linux.namespace("network").path = "/run/netns/zn11-pod"
    profile = security.resolve_profile(profile_name, {})
    plain = profile.digest
    changes = security.harden_spec(spec, profile)
    assert spec.linux.namespace("network").path == "/run/netns/zn11-pod"
    assert profile.network_joined
    assert set(profile.mediate) == {"connect", "sendto", "sendmsg", "sendmmsg"}
    assert profile.digest != plain  # another seccomp filter: another cache entry
    assert any("loopback and the namespace's own addresses" in c for c in changes)


@pytest.mark.parametrize("scope_abi", [6, 5])
def test_a_pods_sandbox_gets_no_inet_and_no_broker_where_landlock_scopes(
    tmp_path, monkeypatch, scope_abi
):
    """The pause container (CRI's container-type "sandbox") in the pod's namespace: no
    inet sockets; no broker where Landlock keeps the abstract-socket scope (ABI 6), the
    broker as for any container below it."""
    monkeypatch.setattr(security, "is_own_netns", lambda path: False)
    monkeypatch.setattr(security.landlock, "abi_version", lambda: scope_abi)
    spec = make_spec(tmp_path)
    spec.linux.namespace("network").path = "/run/netns/zn11-pod"
    spec.annotations = {security.CRI_CONTAINER_TYPE: "sandbox"}
    profile = security.resolve_profile("ci-runner", {})
    app = security.resolve_profile("ci-runner", {})
    security.harden_spec(spec, profile)
    assert not {"AF_INET", "AF_INET6"} & set(profile.socket_families)
    assert "AF_UNIX" in profile.socket_families
    if scope_abi >= 6:
        assert not profile.mediate
    else:
        assert set(profile.mediate) == {"connect", "sendto", "sendmsg", "sendmmsg"}
    # An app container of the same pod: inet and the broker, and another cache entry.
    app_spec = make_spec(tmp_path)
    app_spec.linux.namespace("network").path = "/run/netns/zn11-pod"
    app_spec.annotations = {security.CRI_CONTAINER_TYPE: "container"}
    security.harden_spec(app_spec, app)
    assert {"AF_INET", "AF_INET6"} <= set(app.socket_families) and app.mediate
    assert app.digest != profile.digest


def test_web_server_joins_a_pod_namespace_with_its_own_rules(tmp_path, monkeypatch):

    monkeypatch.setattr(security, "is_own_netns", lambda path: False)
    spec = make_spec(tmp_path)
    spec.linux.namespace("network").path = "/run/netns/zn11-pod"
    profile = security.resolve_profile("web-server", {})
    mediate, digest = profile.mediate, profile.digest
    security.harden_spec(spec, profile)
    assert spec.linux.namespace("network").path == "/run/netns/zn11-pod"
    assert profile.network_joined and (profile.mediate, profile.digest) == (mediate, digest)


@pytest.mark.parametrize("host_path", [None, "/proc/self/ns/net"])
def test_host_network_refused_unless_allowed(tmp_path, host_path):
    """No network namespace, or the host's joined by path: the host's network."""

    def spec_asking_for_the_host():
        spec = make_spec(tmp_path)
        if host_path is None:
            spec.linux.namespaces = [ns for ns in spec.linux.namespaces if ns.type != "network"]
        else:
            spec.linux.namespace("network").path = host_path
        return spec

    with pytest.raises(InvalidArgument, match="profile ci-runner: host network refused; the op"):
        security.harden_spec(spec_asking_for_the_host(), security.resolve_profile("ci-runner", {}))
    spec = spec_asking_for_the_host()
    profile = security.resolve_profile("ci-runner", {})
    security.harden_spec(spec, profile, allow_host_network=True)
    assert spec.linux.creates_namespace("network") is False
    # Shared with the host: mediated, and nothing of the host counts as the container's.
    assert profile.mediate and not profile.network_joined


def test_cli_list_show_check(tmp_path, capsys):
    assert profile_cli.main(["profile", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUILT_IN) and "UNSAFE" in out
    assert profile_cli.main(["profile", "show", "web-server"]) == 0
    out = capsys.readouterr().out
    assert "seccomp broker: bind connect sendmmsg sendmsg sendto" in out
    assert "seccomp deny EPERM" in out and " mount " in out
    good = tmp_path / "good.toml"
    good.write_text("[profile]\nextends = 'ci-runner'\n")
    assert profile_cli.main(["profile", "check", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[seccomp]\ndefault_action = 'allow'\n")
    assert profile_cli.main(["profile", "check", str(bad)]) == 1
    assert "seccomp.default_action: must be one of" in capsys.readouterr().err


def test_profile_ref_reloads_the_same_profile(tmp_path):
    assert profiles.load_profile("web-server").ref == "web-server"
    path = tmp_path / "mine.toml"
    path.write_text("[profile]\nextends = 'ci-runner'\n")
    mine = profiles.load_profile(str(path))
    assert mine.ref == str(path)
    assert security.resolve_profile(mine.ref, {}).digest == mine.digest


def test_prepare_clamps_an_exec_process_that_skipped_harden_spec(tmp_path):
    """zviz exec replaces spec.process after harden_spec: prepare applies the ceiling again."""
    from runtime.spec import Capabilities

    spec = make_spec(tmp_path)
    profile = security.resolve_profile("web-server", {})
    security.harden_spec(spec, profile)
    spec.linux.namespaces = [ns for ns in spec.linux.namespaces if ns.type != "network"]
    asked = ["CAP_SYS_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_SYS_PTRACE"]
    spec.process.capabilities = Capabilities(*([list(asked)] * 5))
    plan = security.prepare(spec, profile)
    try:
        for name in ("bounding", "effective", "inheritable", "permitted", "ambient"):
            assert getattr(plan.capabilities, name) == ["CAP_NET_BIND_SERVICE"]
    finally:
        if plan.landlock is not None:
            plan.landlock.close()


def test_update_may_not_raise_limits_above_the_profile():
    from runtime.spec import parse_resources

    profile = security.resolve_profile("hostile-tenant", {})
    security.check_resources(
        profile, parse_resources({"pids": {"limit": 10}, "memory": {"limit": 1 << 20}})
    )
    for resources, field in (
        ({"pids": {"limit": 100000}}, "pids.limit"),
        ({"pids": {"limit": -1}}, "pids.limit"),
        ({"memory": {"limit": 1 << 40}}, "memory.limit"),
    ):
        with pytest.raises(InvalidArgument, match=f"{field} .* above profile hostile-tenant"):
            security.check_resources(profile, parse_resources(resources))


def test_cached_profiles_are_fresh_copies_and_follow_file_changes(tmp_path):
    """The parse cache (warmed by the fork server) never shares per-container state or stale rules."""
    from runtime.security.profiles import load_profile

    path = tmp_path / "cached.toml"
    path.write_text('[profile]\nname = "cached"\nextends = "ci-runner"\ndescription = "one"\n')
    first = load_profile(str(path))
    first.programs["oci"] = b"one container's filter"
    second = load_profile(str(path))
    assert second is not first and second.programs == {}
    assert (second.description, second.digest) == ("one", first.digest)
    path.write_text('[profile]\nname = "cached"\nextends = "ci-runner"\ndescription = "two!"\n')
    assert load_profile(str(path)).description == "two!"


def test_a_pod_namespace_under_no_network_refuses_to_start_without_its_broker(
    tmp_path, monkeypatch
):
    """Fail closed: the mediated filter is never loaded without a broker to answer it."""
    from runtime.errors import SecurityLayerError

    monkeypatch.setattr(security, "is_own_netns", lambda path: False)
    spec = make_spec(tmp_path)
    spec.linux.namespace("network").path = "/run/netns/zn11-pod"
    profile = security.resolve_profile("ci-runner", {})
    security.harden_spec(spec, profile)
    channel = security.notify_channel(profile)
    assert channel is not None  # create starts a broker
    channel.close_container_end()
    channel.close_supervisor_end()
    plan = security.prepare(spec, profile)
    try:
        assert any(program.listener for program in plan.programs)
        with pytest.raises(SecurityLayerError, match="needs a broker"):
            security.apply(plan, None)  # refuses before it drops or loads anything
    finally:
        if plan.landlock is not None:
            plan.landlock.close()


def test_profile_diff_shows_what_each_grants_that_the_other_does_not(capsys):
    ci, tenant = profiles.load_profile("ci-runner"), profiles.load_profile("hostile-tenant")
    result = profile_cli.diff(ci, tenant)
    assert "CAP_CHOWN" in result["a_only"]["capabilities"]
    assert {"setuid", "setresuid"} <= set(result["a_only"]["seccomp allow"])
    # hostile-tenant's /dev/pts is under ci-runner's /dev: not a grant of its own.
    assert "device ioctl" not in result["b_only"]
    assert result["settings"]["pids_max"] == [1024, 64]
    web = profiles.load_profile("web-server")
    both_ways = profile_cli.diff(web, ci)
    assert both_ways["a_only"]["seccomp via broker"] == [
        "bind", "connect", "sendmmsg", "sendmsg", "sendto"
    ]  # fmt: skip
    # ci-runner's unrestricted Landlock ports cover web-server's list.
    assert "landlock tcp connect ports" not in both_ways["a_only"]
    assert both_ways["b_only"]["landlock tcp connect ports"] == ["any"]
    audited = profiles.with_mode(ci, "audit")
    assert profile_cli.diff(ci, audited) == {
        "a": "ci-runner", "b": "ci-runner", "a_only": {}, "b_only": {},
        "settings": {"mode": ["enforce", "audit"]},
    }  # fmt: skip
    assert profile_cli.main(["profile", "diff", "ci-runner", "ci-runner"]) == 0
    assert "grant the same" in capsys.readouterr().out
    assert profile_cli.main(["profile", "diff", "web-server", "ci-runner", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["a_only"]["capabilities"] == ["CAP_NET_BIND_SERVICE"]
