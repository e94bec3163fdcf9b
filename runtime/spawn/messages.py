"""Every message of the sync channel (runtime/sync.py), declared once.

The parent (the runtime process) and the container's children (the namespace child, PID 1,
an exec) talk over one SOCK_SEQPACKET pair. Each message has a kind, a direction and
fields; `Sync.send` and `Sync.expect` check them against this table, so a misspelt kind
or a missing field fails where it is written, not as a hang or a timeout at the other end.

The protocol, in order (optional steps in brackets):

    child → parent   [userns]   the child is in its user namespace: write/check the id maps
    parent → child   [mapped]   done (with the id-mapped rootfs clone as an fd, if any)
    child → parent   pid        the namespace child forked PID 1 (or the exec) and exits
    parent → child   [joined]   PID 1 is in its cgroup (with the hooks' state, if hooks)
    child → parent   [hooks]    PID 1 asks the parent to run the runtime's own hooks
    parent → child   [hooked]   they ran
    child → parent   [log]...   PID 1's log lines, any time
    child → parent   ready      set up; waiting
    parent → child   start|ack  `zviz run`/exec: go on; `zviz create`: wait for the fifo
    child → parent   [error]    a stage failed (instead of any of the above); EOF: execve'd
"""

TO_CHILD = "parent → child"
TO_PARENT = "child → parent"

_NONE = type(None)


class MessageError(TypeError):
    """A message this table does not declare, or with the wrong fields: a bug in zviz."""


class Message:
    __slots__ = ("kind", "direction", "required", "optional", "carries_fds", "meaning")

    def __init__(
        self, kind: str, direction: str, meaning: str, required=None, optional=None,
        carries_fds: bool | str = False,
    ):  # fmt: skip
        self.kind = kind
        self.direction = direction
        self.meaning = meaning
        # field name -> accepted types
        self.required: dict[str, tuple[type, ...]] = required or {}
        self.optional: dict[str, tuple[type, ...]] = optional or {}
        self.carries_fds = carries_fds

    def check(self, fields: dict, direction: str, with_fds: bool) -> None:
        if direction != self.direction:
            raise MessageError(f"sync: {self.kind!r} is sent {self.direction}, not {direction}")
        # carries_fds: True, False, or the name of the bool field saying whether they do.
        expected = (
            bool(fields.get(self.carries_fds))
            if isinstance(self.carries_fds, str)
            else self.carries_fds
        )
        if with_fds != expected:
            how = "carries" if expected else "carries no"
            raise MessageError(f"sync: {self.kind!r} {how} file descriptors here")
        for name in self.required:
            if name not in fields:
                raise MessageError(f"sync: {self.kind!r} without its field {name!r}")
        for name, value in fields.items():
            types = self.required.get(name) or self.optional.get(name)
            if types is None:
                raise MessageError(f"sync: {self.kind!r} has no field {name!r}")
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise MessageError(
                    f"sync: {self.kind!r} field {name!r}: {type(value).__name__}"
                    f" is not {' or '.join(t.__name__ for t in types)}"
                )


MESSAGES: dict[str, Message] = {
    m.kind: m
    for m in (
        Message(
            "userns", TO_PARENT,
            "the namespace child unshared (or joined) the user namespace: the parent writes"
            " its id maps (or checks the joined ones) and id-maps the rootfs and volumes",
        ),
        Message(
            "mapped", TO_CHILD,
            "the id maps are written; an fd rides along when the rootfs was id-mapped",
            optional={"idmapped": (bool,)}, carries_fds="idmapped",
        ),
        Message(
            "pid", TO_PARENT,
            "the namespace child forked PID 1 (or the exec) with this host pid, and exits",
            required={"pid": (int,)},
        ),
        Message(
            "joined", TO_CHILD,
            "PID 1 is in its cgroup: it may fork (hooks) and run; `state` is what the"
            " createContainer/startContainer hooks read, present when there are hooks",
            optional={"state": (dict,)},
        ),
        Message(
            "hooks", TO_PARENT,
            "PID 1 reached the point where createRuntime/prestart hooks run: the parent runs them",
        ),
        Message("hooked", TO_CHILD, "the runtime's hooks ran: PID 1 runs its createContainer hooks"),
        Message(
            "log", TO_PARENT, "a line for the runtime's log",
            required={"level": (str,), "msg": (str,)},
        ),
        Message("ready", TO_PARENT, "set up; waits for start (or ack)"),
        Message(
            "anchor-unanswered", TO_PARENT,
            "the exec's child: the container's exec anchor did not take the exec (stopped,"
            " gone, its queue full); nothing of the exec runs: parent.spawn_exec raises"
            " exec_anchor.Unanswered and Container.exec takes the old path",
            required={"why": (str,)},
        ),
        Message("start", TO_CHILD, "`zviz run`, `zviz exec`: go on to execve"),
        Message("ack", TO_CHILD, "`zviz create` returned: wait for `zviz start` on the exec fifo"),
        Message(
            "error", TO_PARENT,
            "a stage failed; the parent raises it as the ZvizError named by `kind`",
            required={
                "stage": (str,), "message": (str,), "errno": (int, _NONE), "kind": (str, _NONE),
            },
        ),
    )
}  # fmt: skip


def declared(kind: str) -> Message:
    message = MESSAGES.get(kind)
    if message is None:
        raise MessageError(f"sync: no message {kind!r} is declared (runtime/spawn/messages.py)")
    return message
