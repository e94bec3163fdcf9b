"""containerd-shim-zviz-v2: the binary containerd runs for the runtime io.containerd.zviz.v2.

    containerd-shim-zviz-v2 -namespace NS -address ADDR -publish-binary BIN -id ID [-debug] start
    containerd-shim-zviz-v2 -namespace NS -address ADDR -id ID -bundle DIR delete
    containerd-shim-zviz-v2 -namespace NS -address ADDR -id ID -socket ADDR [-debug]   (serve)
    containerd-shim-zviz-v2 -info

`start` and `delete` run once per container, so this module imports nothing beyond os
and sys: each action imports what it needs only after the flags are parsed. Both are
first offered to the fork server (runtime/forkserver.py, SHIM_SERVED_ACTIONS), which
has the interpreter running already; the installed binary is its compiled client,
which only execs this entry for what it does not serve (docs/shim.md).
"""

import os
import sys

RUNTIME_NAME = "io.containerd.zviz.v2"
VERSION = "0.1.0"


# The flags containerd passes (the fork server's clients read them too, to know a start).
STRING_FLAGS = ("namespace", "id", "socket", "bundle", "address", "publish-binary")
BOOL_FLAGS = ("debug", "v", "info")


class Flags:
    """The flags containerd passes, parsed the way Go's `flag` package does."""

    _strings = STRING_FLAGS
    _bools = BOOL_FLAGS

    def __init__(self) -> None:
        self.namespace = ""
        self.id = ""
        self.socket = ""
        self.bundle = ""
        self.address = ""
        self.publish_binary = "containerd"
        self.debug = False
        self.v = False
        self.info = False
        self.action = ""
        self.ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")

    def to_args(self) -> list[str]:
        """The flags back as arguments, for re-executing the binary as the serving daemon."""
        args = []
        for name in self._strings:
            value = getattr(self, name.replace("-", "_"))
            if value:
                args += [f"-{name}", value]
        if self.debug:
            args.append("-debug")
        return args


class UsageError(Exception):
    pass


def parse_flags(argv: list[str]) -> Flags:
    """Go `flag` semantics: -x or --x, value as next word or after '=', stop at the first non-flag."""
    flags = Flags()
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        name = word.lstrip("-")
        value = None
        if "=" in name:
            name, value = name.split("=", 1)
        if name in Flags._bools:
            if value is None:
                setattr(flags, name, True)
            elif value.lower() in ("1", "t", "true"):
                setattr(flags, name, True)
            elif value.lower() in ("0", "f", "false"):
                setattr(flags, name, False)
            else:
                raise UsageError(f"invalid boolean value {value!r} for flag -{name}")
        elif name in Flags._strings:
            if value is None:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(flags, name.replace("-", "_"), value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i:]
    flags.action = rest[0] if rest else ""
    return flags


# The runtime-spec features document (features.md) `-info` announces, as
# google.protobuf.Any under the type URL containerd registers for it (JSON inside).
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
# Only what containerd checks before relying on it: id-mapped mounts (config.json mounts
# with uidMappings/gidMappings, which containerd 2.x asks for in a hostUsers: false pod,
# refusing a runtime that does not say it makes them). runtime/idmap.py makes them.
FEATURES = {"linux": {"mountExtensions": {"idmap": {"enabled": True}}}}


def runtime_info() -> bytes:
    """What `-info` answers: a containerd.types.RuntimeInfo {name=1, version=2 {version=1},
    features=4 (Any {type_url=1, value=2})}.

    containerd 2.x runs `SHIM -info` when it wants the shim's features (and logs an error
    for a shim that has no such flag); of those it reads FEATURES' alone.
    """
    import json

    from shim import wire

    version = wire.field_bytes(1, VERSION.encode())
    features = wire.field_bytes(1, FEATURES_TYPE_URL.encode()) + wire.field_bytes(
        2, json.dumps(FEATURES).encode()
    )
    return (
        wire.field_bytes(1, RUNTIME_NAME.encode())
        + wire.field_bytes(2, version)
        + wire.field_bytes(4, features)
    )


def _exit_now(code: int) -> None:
    """Leave without interpreter teardown: containerd waits for `start` and `delete`, and
    tearing down costs more than their work. Everything they wrote is flushed and closed."""
    os._exit(code)


def main(argv: list[str] | None = None, served: bool = False) -> int:
    """The shim binary. SERVED: this is a fork-server worker (runtime/forkserver.py),
    which does the start or delete itself and returns its code to report."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(argv)
    except UsageError as e:
        sys.stderr.write(f"{RUNTIME_NAME}: {e}\n")
        return 2
    if flags.v:
        sys.stdout.write(f"{os.path.basename(sys.argv[0])}:\n  Version:  {VERSION}\n")
        return 0
    if flags.info:
        sys.stdout.buffer.write(runtime_info())
        sys.stdout.flush()
        return 0
    if not flags.namespace:
        sys.stderr.write(f"{RUNTIME_NAME}: shim namespace cannot be empty\n")
        return 1
    try:
        if flags.action in ("start", "delete"):
            if served:
                from shim import config

                config.STATE_ROOT = config.state_root()
            else:
                from runtime import forkserver

                code = forkserver.try_run(argv, forkserver.SHIM_ENTRY)
                if code is not None:
                    _exit_now(code)
            from shim import manager

            action = manager.start if flags.action == "start" else manager.delete
            sys.stdout.buffer.write(action(flags))
            sys.stdout.flush()
            if served:
                return 0
            _exit_now(0)
        if flags.action == "":
            # asyncio loads ssl (and OpenSSL with it) when it can; the daemon speaks ttrpc
            # on unix sockets and never TLS. Without it: ~1.3 MiB less private memory per
            # daemon (a pod's daemon, or a namespace's) and ~5-13 ms less of its start.
            sys.modules.setdefault("ssl", None)
            from shim.daemon import serve

            return serve(flags)
        raise UsageError(f"unknown action {flags.action!r} (expected start, delete or none)")
    except Exception as e:  # noqa: BLE001 - containerd shows this text as the failure
        sys.stderr.write(f"{RUNTIME_NAME}: {flags.action or 'serve'}: {e}\n")
        if flags.debug:
            import traceback

            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
