"""How a mediated call ends, and the exceptions that carry an ending up from deep checks.

A handler (handlers.py) returns a Verdict when it performed the call; a refusal found
on the way (policy, bad pointer, caller gone) is raised as Denied, the kernel's own
error of the performed call as OSError. The core (core.py) turns all three into one
Verdict in one place (`verdict_of`), and answers it.
"""

import errno
from dataclasses import dataclass, field


class Denied(Exception):
    """A refusal: answered with `errno`, logged under --verbose, kept as a denial record."""

    def __init__(self, reason: str, err: int = errno.EPERM):
        super().__init__(reason)
        self.reason = reason
        self.errno = err
        self.decoded: dict = {}  # the refused address, for the denial record


class Answered(Exception):
    """The watchdog answered the call before the worker could perform it."""


@dataclass(frozen=True)
class Audit:
    """A call the profile refuses, let through in audit mode: recorded with verdict audit."""

    rule: str
    decoded: dict


@dataclass(frozen=True)
class Verdict:
    """The end of one mediated call.

    performed: `value` is the call's result. refused: `errno` with `reason` (a denial
    record and, under --verbose, a log line). failed: the performed call's own `errno`
    from the kernel (ECONNREFUSED...), answered as the kernel would, no record.
    answered: the watchdog answered first, nothing more is said. `audits` are the
    refusals audit mode let through on the way, recorded whatever the end.
    """

    value: int = 0
    errno: int = 0
    reason: str = ""
    decoded: dict = field(default_factory=dict)
    audits: tuple[Audit, ...] = ()
    answered: bool = False

    @classmethod
    def performed(cls, value: int, audits=()) -> "Verdict":
        return cls(value=value, audits=tuple(audits))

    @classmethod
    def refused(cls, denied: Denied, audits=()) -> "Verdict":
        return cls(
            errno=denied.errno, reason=denied.reason, decoded=denied.decoded, audits=tuple(audits)
        )

    @classmethod
    def failed(cls, err: int, audits=()) -> "Verdict":
        return cls(errno=err, audits=tuple(audits))
