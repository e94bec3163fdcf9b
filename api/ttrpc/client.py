"""The ttrpc client: one unix connection, many calls in flight on it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from api.ttrpc.address import socket_address
from api.ttrpc.codes import Code
from api.ttrpc.errors import TtrpcError
from api.ttrpc.framing import (
    HEADER,
    MAX_MESSAGE_SIZE,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    FrameDecoder,
    Oversized,
)
from api.ttrpc.wire import Response, encode_request, request_prefix

M = TypeVar("M")
MetadataArg = Mapping[str, str | Sequence[str]] | None

_pack_header = HEADER.pack
_MAX_STREAM_ID = 0xFFFFFFFF


def _metadata_pairs(*sources: MetadataArg) -> list[tuple[str, str]]:
    """Key/value pairs in order; a key given by a later source replaces earlier values."""
    merged: dict[str, list[str]] = {}
    for source in sources:
        if not source:
            continue
        for key, values in source.items():
            merged[key] = [values] if isinstance(values, str) else list(values)
    return [(key, value) for key, values in merged.items() for value in values]


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, max_message_size: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder(max_message_size)
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.error: TtrpcError | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        decoder = self.decoder
        decoder.feed(data)
        pending = self.pending
        while (event := decoder.next()) is not None:
            if type(event) is Oversized:
                future = pending.get(event.stream_id)
                if future is not None and not future.done():
                    future.set_exception(
                        TtrpcError(
                            Code.RESOURCE_EXHAUSTED,
                            f"response of {event.length} bytes exceeds the maximum message "
                            f"size of {decoder.max_size}",
                        )
                    )
                continue
            if event.type != TYPE_RESPONSE:
                self.fail(TtrpcError(Code.INTERNAL, f"server sent a frame of type {event.type}"))
                return
            future = pending.get(event.stream_id)
            # No future: the call already gave up (timeout or cancelled); drop the answer.
            if future is not None and not future.done():
                future.set_result(event.payload)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            reason = f": {exc}" if exc else ""
            self.error = TtrpcError(Code.UNAVAILABLE, f"connection closed{reason}")
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self.error)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(self.error)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        if not self._paused:
            return
        if self._drain_waiter is None or self._drain_waiter.done():
            self._drain_waiter = self.loop.create_future()
        await asyncio.shield(self._drain_waiter)

    def fail(self, error: TtrpcError) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.abort()


class Client:
    """A ttrpc client on one connection.

        client = await Client.connect("unix:///run/containerd/containerd.sock.ttrpc",
                                      metadata={"containerd-namespace-ttrpc": "default"})
        events = EventsClient(client)          # typed stub from api.gen..._ttrpc
        await events.Forward(request, timeout=5)
        await client.close()

    Calls may run concurrently; each gets its own stream. A failed call raises
    `TtrpcError` (the server's status, or UNAVAILABLE when the connection is gone,
    DEADLINE_EXCEEDED when `timeout` passes, RESOURCE_EXHAUSTED for a message over
    `max_message_size`).
    """

    def __init__(self, protocol: _ClientProtocol, metadata: MetadataArg) -> None:
        self._protocol = protocol
        self._metadata = dict(metadata or {})
        self._next_stream_id = 1
        self._prefixes: dict[tuple[str, str], bytes] = {}

    @classmethod
    async def connect(
        cls,
        address: str,
        *,
        timeout: float | None = None,
        metadata: MetadataArg = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> Client:
        """Connect to `address` (a path, `unix://path`, or an abstract `\\0name`/`@name`).

        `metadata` is sent with every call (per-call metadata replaces a key given here).
        """
        sockaddr = socket_address(address)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, sockaddr)
            _, protocol = await loop.create_connection(
                lambda: _ClientProtocol(max_message_size), sock=sock
            )
        except TimeoutError:
            sock.close()
            raise TtrpcError(Code.DEADLINE_EXCEEDED, f"connect {address}: timed out") from None
        except OSError as exc:
            sock.close()
            raise TtrpcError(Code.UNAVAILABLE, f"connect {address}: {exc.strerror or exc}") from exc
        except BaseException:
            sock.close()
            raise
        return cls(protocol, metadata)

    async def call(
        self,
        service: str,
        method: str,
        request: Any,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: MetadataArg = None,
    ) -> M:
        """Call `service/method` with `request`; return a `response_type` message."""
        protocol = self._protocol
        if protocol.error is not None:
            raise protocol.error
        if protocol.transport.is_closing():
            raise TtrpcError(Code.UNAVAILABLE, "connection closed")
        prefix = self._prefixes.get((service, method))
        if prefix is None:
            prefix = self._prefixes[(service, method)] = request_prefix(service, method)
        timeout_nano = 0
        if timeout is not None:
            # Sent so the server stops working for a caller that has left; never 0 (= none).
            timeout_nano = max(int(timeout * 1e9), 1)
        pairs = _metadata_pairs(self._metadata, metadata) if (metadata or self._metadata) else ()
        body = encode_request(prefix, request.SerializeToString(), timeout_nano, pairs)
        max_size = protocol.decoder.max_size
        if len(body) > max_size:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED,
                f"{service}/{method}: request of {len(body)} bytes exceeds the maximum message "
                f"size of {max_size}",
            )
        stream_id = self._stream_id()
        future = protocol.loop.create_future()
        protocol.pending[stream_id] = future
        try:
            protocol.transport.write(_pack_header(len(body), stream_id, TYPE_REQUEST, 0) + body)
            if timeout is None:
                await protocol.drain()
                payload = await future
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await protocol.drain()
                        payload = await future
                except TimeoutError:
                    raise TtrpcError(
                        Code.DEADLINE_EXCEEDED, f"{service}/{method}: no answer in {timeout:g}s"
                    ) from None
        finally:
            del protocol.pending[stream_id]
        try:
            response = Response.FromString(payload)
            if response.status.code:
                raise TtrpcError.from_status(response.status)
            return response_type.FromString(response.payload)
        except TtrpcError:
            raise
        except Exception as exc:
            raise TtrpcError(
                Code.INTERNAL, f"{service}/{method}: undecodable response: {exc}"
            ) from exc

    def _stream_id(self) -> int:
        stream_id = self._next_stream_id
        pending = self._protocol.pending
        while stream_id in pending:
            stream_id += 2
            if stream_id > _MAX_STREAM_ID:
                stream_id = 1
        following = stream_id + 2
        self._next_stream_id = following if following <= _MAX_STREAM_ID else 1
        return stream_id

    @property
    def closed(self) -> bool:
        return self._protocol.error is not None or self._protocol.closed.done()

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with UNAVAILABLE."""
        protocol = self._protocol
        if protocol.error is None:
            protocol.error = TtrpcError(Code.UNAVAILABLE, "client closed")
        if protocol.transport is not None:
            protocol.transport.close()
        await protocol.closed

    async def wait_closed(self) -> None:
        """Return when the connection is gone (closed by either side)."""
        await self._protocol.closed

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
