"""`zviz node check | install | uninstall`: this node as a containerd runtime host.

check.py probes the kernel and containerd; containerd.py reads and plans containerd's
config; install.py puts the shim, the fast client and the runtime entry in place.
Imported only for `zviz node` (runtime/commands.py), never on a container's path.
"""

from runtime.node.containerd import DEFAULT_CONFIG


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("node", help="check this node, install zviz as containerd's runtime")
    sub = p.add_subparsers(dest="node_command", required=True)
    check = sub.add_parser("check", help="can this node run zviz and enforce its default profile?")
    check.add_argument("--format", choices=("text", "json"), default="text")
    check.add_argument("--containerd-config", default=DEFAULT_CONFIG)
    check.add_argument(
        "--profile",
        dest="node_profile",
        default=None,
        help="the profile to judge (default: ci-runner)",
    )
    for name, help_text in (
        ("install", "install the shim and containerd's runtime entry (idempotent)"),
        ("uninstall", "remove what `zviz node install` installed, restore the config"),
    ):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--containerd-config", default=None, help=f"default: ROOT{DEFAULT_CONFIG}")
        q.add_argument(
            "--dry-run", action="store_true", help="say what would change, change nothing"
        )
        q.add_argument("--restart", action="store_true", help="restart containerd afterwards")
        q.add_argument("--root", default="/", help="put every default path under ROOT (for tests)")
        q.add_argument("--bin-dir", default=None, help="default: ROOT/usr/local/bin")


def run(args) -> int:
    if args.node_command == "check":
        from runtime.node import check

        checks = check.run_checks(args.node_profile, args.containerd_config)
        print(check.report(checks, args.format))
        return 0 if check.passed(checks) else 1
    from runtime.node.install import main_install

    return main_install(args)
