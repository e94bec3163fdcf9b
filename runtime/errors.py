"""The one error hierarchy of zviz.

Errors are a small set of kinds (as in containerd's errdefs). They are raised
anywhere in the runtime and turned into an exit code (CLI) or a ttrpc status
code (shim) once, at the edge.
"""

import errno as _errno


class ZvizError(Exception):
    """Base of every error zviz reports to a user. The message names what is wrong."""

    # gRPC status code the shim answers with; the CLI exits 1 for every kind.
    grpc_code = 2  # UNKNOWN


class InvalidArgument(ZvizError):
    grpc_code = 3


class NotFound(ZvizError):
    grpc_code = 5


class AlreadyExists(ZvizError):
    grpc_code = 6


class FailedPrecondition(ZvizError):
    grpc_code = 9


class ResourceExhausted(ZvizError):
    grpc_code = 8


class Unavailable(ZvizError):
    grpc_code = 14


class NotImplementedByZviz(ZvizError):
    grpc_code = 12


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
