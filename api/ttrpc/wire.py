"""The ttrpc Request/Response envelopes, encoded by hand on the hot paths.

Both are tiny fixed messages (api/proto/ttrpc/ttrpc.proto); writing their bytes directly
saves building a protobuf message around every payload. Decoding goes through the
generated classes (upb), which are the robust parsers for untrusted bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

from api.gen.google.rpc import status_pb2
from api.gen.ttrpc import ttrpc_pb2

Request = ttrpc_pb2.Request
Response = ttrpc_pb2.Response
KeyValue = ttrpc_pb2.KeyValue

# Response{status: Status{}} - what Go's ttrpc sends for OK (status.Proto() of codes.OK).
_OK_STATUS = b"\x0a\x00"


def varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int64s as their 64-bit two's complement."""
    if value < 0:
        value += 1 << 64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field: int, data: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(data)) + data


def request_prefix(service: str, method: str) -> bytes:
    """Fields 1 and 2 of a Request: the same for every call of one method, so cached."""
    out = b""
    if service:
        out += _length_delimited(1, service.encode())
    if method:
        out += _length_delimited(2, method.encode())
    return out


def encode_request(
    prefix: bytes,
    payload: bytes,
    timeout_nano: int = 0,
    metadata: Iterable[tuple[str, str]] = (),
) -> bytes:
    parts = [prefix]
    if payload:
        parts.append(b"\x1a" + varint(len(payload)))
        parts.append(payload)
    if timeout_nano:
        parts.append(b"\x20" + varint(timeout_nano))
    for key, value in metadata:
        entry = b""
        if key:
            entry += _length_delimited(1, key.encode())
        if value:
            entry += _length_delimited(2, value.encode())
        parts.append(_length_delimited(5, entry))
    return b"".join(parts)


def encode_ok_response(payload: bytes) -> bytes:
    if not payload:
        return _OK_STATUS
    return _OK_STATUS + b"\x12" + varint(len(payload)) + payload


def encode_error_response(status: status_pb2.Status) -> bytes:
    return Response(status=status).SerializeToString()
