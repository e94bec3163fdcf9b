"""The ttrpc frame: a 10-byte big-endian header (payload length, stream id, type, flags)
followed by the payload. Pure data handling, no I/O: the server and client feed it bytes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10

# ttrpc's messageLengthMax: the largest payload either side accepts.
MAX_MESSAGE_SIZE = 4 << 20

TYPE_REQUEST = 1
TYPE_RESPONSE = 2

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from


class Frame(NamedTuple):
    stream_id: int
    type: int
    flags: int
    payload: bytes


class Oversized(NamedTuple):
    """A frame whose announced payload exceeds the limit; its payload is being discarded.

    Reported once, as soon as the header arrives, so that the receiver can answer the
    stream with RESOURCE_EXHAUSTED (as Go's ttrpc does) while the bytes are skipped.
    """

    stream_id: int
    type: int
    flags: int
    length: int


def encode_frame(stream_id: int, frame_type: int, payload: bytes, flags: int = 0) -> bytes:
    """Header plus payload, ready to write. The caller enforces the size limit."""
    return _pack_header(len(payload), stream_id, frame_type, flags) + payload


class FrameDecoder:
    """Incremental frame parser.

    `feed()` appends received bytes; `next()` returns the next complete `Frame`, an
    `Oversized` event, or None when more bytes are needed. Memory held is at most one
    partial frame (header + `max_size`) plus what the caller fed and has not drained yet:
    oversized payloads are skipped as they arrive, never buffered.
    """

    __slots__ = ("_buffer", "_discard", "max_size")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._discard = 0  # bytes of an oversized payload still to skip

    def feed(self, data: bytes) -> None:
        if self._discard:
            skipped = min(self._discard, len(data))
            self._discard -= skipped
            data = data[skipped:]
        if data:
            self._buffer += data

    def next(self) -> Frame | Oversized | None:
        buffer = self._buffer
        if self._discard:
            skipped = min(self._discard, len(buffer))
            del buffer[:skipped]
            self._discard -= skipped
            if self._discard:
                return None
        if len(buffer) < HEADER_SIZE:
            return None
        length, stream_id, frame_type, flags = _unpack_header(buffer)
        if length > self.max_size:
            del buffer[:HEADER_SIZE]
            self._discard = length
            skipped = min(length, len(buffer))
            del buffer[:skipped]
            self._discard -= skipped
            return Oversized(stream_id, frame_type, flags, length)
        end = HEADER_SIZE + length
        if len(buffer) < end:
            return None
        # One copy out of the buffer (slicing the bytearray would copy twice); the view is
        # released before the buffer is resized.
        with memoryview(buffer) as view:
            payload = view[HEADER_SIZE:end].tobytes()
        del buffer[:end]
        return Frame(stream_id, frame_type, flags, payload)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a frame (a partial frame, or unread ones)."""
        return len(self._buffer)

    @property
    def mid_frame(self) -> bool:
        """True while a frame has started arriving and is not complete (or is being skipped)."""
        return bool(self._buffer) or self._discard > 0
