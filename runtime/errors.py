"""The one error hierarchy of zviz.

Errors are a small set of kinds (as in containerd's errdefs). They are raised
anywhere in the runtime and turned into an exit code (CLI) or a ttrpc status
code (shim) once, at the edge: the shim's table of kinds to codes is
shim/error_table.py (the library knows no wire protocol).
"""

import errno as _errno


class ZvizError(Exception):
    """Base of every error zviz reports to a user. The message names what is wrong."""


class InvalidArgument(ZvizError):
    pass


class NotFound(ZvizError):
    pass


class AlreadyExists(ZvizError):
    pass


class FailedPrecondition(ZvizError):
    pass


class ResourceExhausted(ZvizError):
    pass


class Unavailable(ZvizError):
    pass


class NotImplementedByZviz(ZvizError):
    pass


class SecurityLayerError(FailedPrecondition):
    """A security layer could not be applied and the profile does not allow running without it."""


def field_error(field: str, problem: str) -> InvalidArgument:
    """An InvalidArgument for a config.json field, worded the same way everywhere."""
    return InvalidArgument(f"config.json: {field}: {problem}")


def state_error(what: str, exc: OSError) -> ZvizError:
    """An OSError writing zviz's own state, as the kind its errno means: a full filesystem
    (or quota) is RESOURCE_EXHAUSTED, anything else (read-only, I/O error) a precondition.
    `what` names the action and the path: the errno alone does not say which disk."""
    kind = ResourceExhausted if exc.errno in (_errno.ENOSPC, _errno.EDQUOT) else FailedPrecondition
    return kind(f"{what}: {exc.strerror or exc}")


def carry_cleanup_error(failure: BaseException, cleanup_error: BaseException) -> None:
    """Keep CLEANUP_ERROR (undoing what FAILURE left half done failed too) beside FAILURE,
    which stays the error reported: the cause comes first, what it left behind after."""
    carried = getattr(failure, "cleanup_errors", None)
    if carried is None:
        carried = []
        failure.cleanup_errors = carried
    carried.append(cleanup_error)


def cleanup_errors(failure: BaseException) -> list[BaseException]:
    """The cleanup errors carried beside FAILURE (carry_cleanup_error), oldest first."""
    return list(getattr(failure, "cleanup_errors", ()))
