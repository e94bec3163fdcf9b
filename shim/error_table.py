"""The shim's one table from error kinds to ttrpc status codes, and the message shape.

The runtime library raises `runtime.errors` kinds and knows no wire protocol; the
TaskService answers each failed call through `ttrpc_error` here, once, at the edge.
Every kind has its row (tests/test_shim_errors.py walks every subclass of ZvizError,
so a new kind without a row fails there). The message is the error's own text; cleanup
errors carried beside it (runtime.errors.carry_cleanup_error: a Create that failed and
whose undoing failed too) follow it, the first error staying the cause and the code.
Exceptions that are no zviz kind go to the ttrpc package's mapping (FileNotFoundError
and friends; anything else is UNKNOWN with its type named).
"""

from api.ttrpc import Code, TtrpcError
from api.ttrpc.errors import error_from_exception
from runtime import errors

# Kinds as containerd's errdefs reads them back (errdefs.FromGRPC): NotFound is how
# CRI learns a task or process has gone, FailedPrecondition that the call came in the
# wrong state. Subclasses have their own row: a kind is mapped on purpose, not by luck.
CODES: dict[type[errors.ZvizError], Code] = {
    errors.ZvizError: Code.UNKNOWN,
    errors.InvalidArgument: Code.INVALID_ARGUMENT,
    errors.NotFound: Code.NOT_FOUND,
    errors.AlreadyExists: Code.ALREADY_EXISTS,
    errors.FailedPrecondition: Code.FAILED_PRECONDITION,
    errors.SecurityLayerError: Code.FAILED_PRECONDITION,
    errors.ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    errors.Unavailable: Code.UNAVAILABLE,
    errors.NotImplementedByZviz: Code.UNIMPLEMENTED,
}


def code_of(exc: errors.ZvizError) -> Code:
    """The row of EXC's kind (a subclass made outside runtime/errors.py: its nearest base's)."""
    for kind in type(exc).__mro__:
        code = CODES.get(kind)
        if code is not None:
            return code
    return Code.UNKNOWN


def message_of(exc: BaseException) -> str:
    """EXC's text, then each cleanup error carried beside it."""
    return (str(exc) or type(exc).__name__) + _cleanup_suffix(exc)


def ttrpc_error(exc: BaseException) -> TtrpcError:
    """The status a Task call that raised EXC answers with."""
    if isinstance(exc, errors.ZvizError):
        return TtrpcError(code_of(exc), message_of(exc))
    error = error_from_exception(exc)
    suffix = _cleanup_suffix(exc)
    return TtrpcError(error.code, error.message + suffix) if suffix else error


def _cleanup_suffix(exc: BaseException) -> str:
    return "".join(
        f"; cleanup also failed: {_described(cleanup)}" for cleanup in errors.cleanup_errors(exc)
    )


def _described(exc: BaseException) -> str:
    if isinstance(exc, errors.ZvizError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"
