"""Errors that travel as google.rpc.Status, and the one mapping from exceptions to codes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from google.protobuf import any_pb2

from api.gen.google.rpc import status_pb2
from api.ttrpc.codes import Code


class TtrpcError(Exception):
    """A call failed with a gRPC status code: raised by clients, and by handlers to answer one.

    `code` is a `Code`; `message` is the human-readable text; `details` are the
    status's `google.protobuf.Any` details, passed through untouched.
    """

    def __init__(self, code: int, message: str = "", details: Sequence[any_pb2.Any] = ()) -> None:
        try:
            code = Code(code)
        except ValueError:
            pass  # a peer may send a code newer than this list: keep the number
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.details = list(details)

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, Code) else str(self.code)
        return f"ttrpc: {name}: {self.message}" if self.message else f"ttrpc: {name}"

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(code=int(self.code), message=self.message, details=self.details)

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> TtrpcError:
        return cls(status.code, status.message, status.details)


# Standard exceptions whose meaning has a gRPC code (as Go ttrpc's convertCode does for
# os.ErrNotExist and friends). Checked in order: subclasses before their bases.
_EXCEPTION_CODES: tuple[tuple[type[BaseException], Code], ...] = (
    (FileNotFoundError, Code.NOT_FOUND),
    (FileExistsError, Code.ALREADY_EXISTS),
    (PermissionError, Code.PERMISSION_DENIED),
    (NotImplementedError, Code.UNIMPLEMENTED),
    (TimeoutError, Code.DEADLINE_EXCEEDED),
    (asyncio.CancelledError, Code.CANCELLED),
)


def error_from_exception(exc: BaseException) -> TtrpcError:
    """The TtrpcError a server answers for an exception a handler raised.

    - `TtrpcError`: as it is.
    - any exception with an integer `grpc_code` attribute (zviz's `runtime.errors`
      hierarchy, or anyone's): that code and `str(exc)`; `api` imports no other package.
    - FileNotFoundError, FileExistsError, PermissionError, NotImplementedError,
      TimeoutError, CancelledError: NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED,
      UNIMPLEMENTED, DEADLINE_EXCEEDED, CANCELLED.
    - anything else: UNKNOWN with the exception's type and text.
    """
    if isinstance(exc, TtrpcError):
        return exc
    grpc_code = getattr(exc, "grpc_code", None)
    if isinstance(grpc_code, int) and not isinstance(grpc_code, bool):
        return TtrpcError(grpc_code, str(exc))
    for kind, code in _EXCEPTION_CODES:
        if isinstance(exc, kind):
            return TtrpcError(code, str(exc) or kind.__name__)
    return TtrpcError(Code.UNKNOWN, f"{type(exc).__name__}: {exc}")
