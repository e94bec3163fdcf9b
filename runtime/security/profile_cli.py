"""`zviz profile list | show NAME | check FILE | diff A B | learn`: the profiles as a user
sees them, and a profile learnt from a workload's run (learn_run.py)."""

import argparse
import json
import sys

from runtime.errors import ZvizError


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="list, show, check, diff and learn security profiles")
    sub = p.add_subparsers(dest="profile_command", required=True)
    sub.add_parser("list", help="the built-in profiles")
    show = sub.add_parser("show", help="the effective policy of a profile (name or .toml path)")
    show.add_argument("name")
    show.add_argument("--format", choices=("text", "json"), default="text")
    check = sub.add_parser("check", help="validate a profile file; exit 1 with the error if bad")
    check.add_argument("file")
    diff = sub.add_parser("diff", help="what profile A grants that B does not, and the reverse")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--format", choices=("text", "json"), default="text")
    learn = sub.add_parser(
        "learn",
        help="run a workload in audit mode and write the smallest profile extending BASE "
        "that lets it run (docs/profiles.md, Learning a profile)",
        description="Runs COMMAND (`zviz run [OPTIONS] ID BUNDLE`, not detached; or `ctr "
        "[...] run ...`, through the zviz shim, whose config must allow learn mode) once under "
        "BASE in audit mode with the rootfs writable, then writes a profile that extends "
        "BASE with the syscalls it used that BASE refuses, the directories it wrote outside "
        "BASE's writable paths and the network endpoints BASE's broker refused. Never "
        "learnt: the escape class, argument-filtered calls (socket families, clone flags, "
        "ioctls), capabilities, limits. Learn only from a workload you trust.",
    )
    learn.add_argument("--base", required=True, help="the profile to extend (name or path)")
    learn.add_argument("--out", default=None, help="write the profile here (default: stdout)")
    learn.add_argument(
        "workload",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="zviz run ... | ctr run ...",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        if args.profile_command == "list":
            return _list()
        if args.profile_command == "show":
            return _show(args.name, args.format)
        if args.profile_command == "diff":
            return _diff(args.a, args.b, args.format)
        if args.profile_command == "learn":
            from runtime.security.learn_run import learn_command

            return learn_command(args.base, args.out, args.workload)
        return _check(args.file)
    except ZvizError as e:
        print(f"zviz: {e}", file=sys.stderr)
        return 1


def _list() -> int:
    from runtime.security.profiles import DEFAULT_PROFILE, list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        marks = []
        if name == DEFAULT_PROFILE:
            marks.append("default")
        if p.unsafe:
            marks.append("UNSAFE for production")
        refused = [g.feature for g in on_this_kernel(p)[2] if g.verdict == "refused"]
        if refused:
            marks.append(f"refused on this kernel, lacks: {', '.join(refused)}")
        suffix = f" [{', '.join(marks)}]" if marks else ""
        print(f"{name:16} {p.description}{suffix}")
    return 0


def effective(profile) -> dict:
    """The policy as it is enforced: what each layer allows, denies and mediates."""
    from runtime.security import syscalls

    allow = sorted(n for n in profile.allow if n not in profile.mediate and syscalls.exists_here(n))
    return {
        "name": profile.name,
        "source": profile.source,
        "description": profile.description,
        "unsafe": profile.unsafe,
        "mode": profile.mode,
        "user_namespace": {
            "required": profile.user_namespace,
            "host_uid": profile.host_uid,
            "host_gid": profile.host_gid,
            "id_count": profile.id_count,
        },
        "capabilities": sorted(profile.capabilities),
        "resources": {"pids_max": profile.pids_max, "memory_max": profile.memory_max},
        "landlock": {
            "required": profile.landlock_required,
            "read_execute": ["/ (all but /dev)"],
            "devices_readable": list(profile.devices),
            "writable": list(profile.writable),
            "writable_volumes": profile.writable_volumes,
            "device_ioctl": list(profile.device_ioctl),
            "tcp_bind": profile.tcp_bind,
            "tcp_connect": profile.tcp_connect,
            "scope_unix_and_signals": profile.landlock_scope,
            "may_lack": list(profile.landlock_may_lack),
        },
        "network": {
            "mode": profile.network,
            "egress": [_rule(r) for r in profile.egress],
            "egress_deny": [str(r.network) for r in profile.egress_deny],
            "bind": [_rule(r) for r in profile.bind],
        },
        "seccomp": {
            "default_action": profile.default_action,
            "allow": allow,
            "allow_with_argument_filters": {
                "clone": "no namespace flags",
                "clone3": "ENOSYS (libc falls back to clone)",
                "socket": list(profile.socket_families)
                + [f"AF_NETLINK/{p}" for p in profile.netlink_protocols],
                "ioctl": "all but TIOCSTI",
                "personality": "denied" if "personality" in profile.deny else "safe personas only",
            },
            "deny_eperm": sorted(n for n in profile.deny if syscalls.exists_here(n)),
            "broker": sorted(profile.mediate),
            "broker_timeout_seconds": profile.broker_timeout,
            "foreign_architectures": "killed",
            "broker_may_lack": list(profile.broker_may_lack),
        },
        "on_this_kernel": [
            {
                "feature": f"{g.table}.{g.feature}",
                "needs": g.needs,
                "asked": g.asked,
                "granted": g.granted,
                "may_lack": g.may_lack,
                "verdict": g.verdict,
            }
            for g in on_this_kernel(profile)[2]
        ],
    }


def on_this_kernel(profile) -> tuple[int, bool, list]:
    """This kernel's Landlock ABI, its WAIT_KILLABLE_RECV, and what the profile gets here."""
    from runtime.security import kernel_gaps, landlock, seccomp

    abi = landlock.abi_version()
    wait_killable_recv = seccomp.wait_killable_recv_supported()
    return abi, wait_killable_recv, kernel_gaps.decide(profile, abi, wait_killable_recv)


def _print_kernel_gaps(profile) -> None:
    from runtime.security import kernel_gaps

    abi, wait_killable_recv, gaps = on_this_kernel(profile)
    for line in kernel_gaps.table(gaps, abi, wait_killable_recv):
        print(line)
    refused = kernel_gaps.refusal(profile, gaps, abi)
    if refused:
        print(f"  refused on this kernel: {refused}")


def _rule(rule) -> dict:
    return {"cidr": str(rule.network), "ports": sorted(rule.ports) or "any"}


def _show(name: str, fmt: str) -> int:
    from runtime.security.profiles import load_profile

    profile = load_profile(name)
    data = effective(profile)
    if fmt == "json":
        print(json.dumps(data, indent=2))
        return 0
    sc = data["seccomp"]
    print(f"profile {data['name']} ({data['source']})")
    if data["unsafe"]:
        print("  UNSAFE: not for code you did not write")
    print(f"  {data['description']}")
    if data["mode"] != "enforce":
        print(f"  mode {data['mode']}: refusals recorded and allowed, but the escape class")
    u = data["user_namespace"]
    print(
        f"user namespace: {'required' if u['required'] else 'optional'}, container 0 -> host "
        f"{u['host_uid']}:{u['host_gid']} x{u['id_count']}"
    )
    print(f"capabilities (ceiling): {', '.join(data['capabilities']) or 'none'}")
    print(
        f"resources: pids {data['resources']['pids_max']}, memory {data['resources']['memory_max']}"
    )
    ll = data["landlock"]
    print(
        f"landlock: {'required' if ll['required'] else 'optional'}; writable: {', '.join(ll['writable'])}"
    )
    if ll["tcp_bind"] is not None or ll["tcp_connect"] is not None:
        print(f"  tcp bind ports {ll['tcp_bind']}, tcp connect ports {ll['tcp_connect']}")
    net = data["network"]
    print(f"network: {net['mode']}")
    for rule in net["egress"]:
        print(f"  egress allow {rule['cidr']} ports {rule['ports']}")
    if net["egress_deny"]:
        print(f"  egress deny {', '.join(net['egress_deny'])}")
    for rule in net["bind"]:
        print(f"  bind allow {rule['cidr']} ports {rule['ports']}")
    print(f"seccomp default: {sc['default_action']}")
    print(f"seccomp allow ({len(sc['allow'])}): {' '.join(sc['allow'])}")
    for name, what in sc["allow_with_argument_filters"].items():
        print(f"seccomp allow {name}: {what}")
    print(f"seccomp deny EPERM ({len(sc['deny_eperm'])}): {' '.join(sc['deny_eperm'])}")
    print(f"seccomp broker: {' '.join(sc['broker']) or 'none'}")
    _print_kernel_gaps(profile)
    return 0


def grants(profile) -> tuple[dict[str, set[str]], dict[str, object]]:
    """What a profile lets a container do, for `diff`: (sets of grants by kind, settings
    compared as values). A syscall the broker mediates is a grant of its own kind: the
    broker still decides each call."""
    from runtime.security import syscalls

    def rules(values) -> set[str]:
        return {f"{r.network} ports {','.join(map(str, sorted(r.ports))) or 'any'}" for r in values}

    def ports(values) -> set[str]:
        return {"any"} if values is None else {str(port) for port in values}

    sets = {
        "capabilities": set(profile.capabilities),
        "seccomp allow": {
            n for n in profile.allow if n not in profile.mediate and syscalls.exists_here(n)
        },
        "seccomp via broker": set(profile.mediate),
        "socket families": set(profile.socket_families)
        | {f"AF_NETLINK/{p}" for p in profile.netlink_protocols},
        "writable paths": set(profile.writable),
        "devices": set(profile.devices),
        "device ioctl": set(profile.device_ioctl),
        "egress": rules(profile.egress) | {f"{h}:{p}" for h, p in profile.egress_hosts},
        "bind": rules(profile.bind),
        "landlock tcp bind ports": ports(profile.tcp_bind),
        "landlock tcp connect ports": ports(profile.tcp_connect),
    }
    settings = {
        "mode": profile.mode,
        "unsafe": profile.unsafe,
        "network": profile.network,
        "user namespace required": profile.user_namespace,
        "host ids": f"{profile.host_uid}:{profile.host_gid} x{profile.id_count}",
        "pids_max": profile.pids_max,
        "memory_max": profile.memory_max,
        "landlock required": profile.landlock_required,
        "writable volumes": profile.writable_volumes,
        "seccomp default": profile.default_action,
        "egress_deny": sorted(str(r.network) for r in profile.egress_deny),
    }
    return sets, settings


# Kinds whose entries are paths: one under a path the other profile grants is no extra.
PATH_KINDS = ("writable paths", "devices", "device ioctl")


def _not_covered(mine: set[str], theirs: set[str], paths: bool) -> set[str]:
    if "any" in theirs:
        return set()  # unrestricted ports cover every port
    if not paths:
        return mine - theirs
    return {p for p in mine if not any(p == t or p.startswith(t.rstrip("/") + "/") for t in theirs)}


def diff(a, b) -> dict:
    """`zviz profile diff`: {"a_only": {kind: [...]}, "b_only": ..., "settings": {key: [a, b]}}."""
    a_sets, a_settings = grants(a)
    b_sets, b_settings = grants(b)
    result = {"a": a.name, "b": b.name, "a_only": {}, "b_only": {}, "settings": {}}
    for kind in a_sets:
        for side, mine, theirs in (("a_only", a_sets, b_sets), ("b_only", b_sets, a_sets)):
            extra = _not_covered(mine[kind], theirs[kind], kind in PATH_KINDS)
            if extra:
                result[side][kind] = sorted(
                    extra, key=lambda v: (len(v), v) if v.isdigit() else (0, v)
                )
    for key in a_settings:
        if a_settings[key] != b_settings[key]:
            result["settings"][key] = [a_settings[key], b_settings[key]]
    return result


def _diff(a_name: str, b_name: str, fmt: str) -> int:
    from runtime.security.profiles import load_profile

    result = diff(load_profile(a_name), load_profile(b_name))
    if fmt == "json":
        print(json.dumps(result, indent=2))
        return 0
    a, b = result["a"], result["b"]
    for side, holder, other in (("a_only", a, b), ("b_only", b, a)):
        if result[side]:
            print(f"{holder} grants, {other} does not:")
            for kind, values in result[side].items():
                print(f"  {kind}: {' '.join(values)}")
    if result["settings"]:
        print(f"settings ({a} / {b}):")
        for key, (in_a, in_b) in result["settings"].items():
            print(f"  {key}: {in_a} / {in_b}")
    if not (result["a_only"] or result["b_only"] or result["settings"]):
        print(f"{a} and {b} grant the same")
    return 0


def _check(path: str) -> int:
    from runtime.security import seccomp
    from runtime.security.profiles import load_profile

    if "/" not in path and not path.endswith(".toml"):
        path = "./" + path
    profile = load_profile(path)
    try:
        seccomp.profile_program(profile)
    except OSError as e:
        print(f"zviz: {path}: seccomp filter does not compile: {e}", file=sys.stderr)
        return 1
    warnings = []
    if profile.unsafe:
        warnings.append("marked unsafe for production")
    if not profile.landlock_required:
        warnings.append("runs without Landlock where the kernel lacks it")
    if not profile.user_namespace:
        warnings.append("no user namespace: container root is host root")
    print(
        f"{path}: ok (profile {profile.name}, {len(profile.allow)} allowed, {len(profile.deny)} denied)"
    )
    for w in warnings:
        print(f"  warning: {w}")
    _print_kernel_gaps(profile)
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="zviz")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
