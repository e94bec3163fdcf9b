"""The ttrpc server: asyncio, unix sockets, unary calls served concurrently.

Every connection is an `asyncio.Protocol` that parses frames as bytes arrive and runs one
task per request. Untrusted input is bounded everywhere: a frame is at most
`max_message_size`, a connection runs at most `max_concurrent_requests` handlers (then
stops reading: the peer's writes block, nobody else's), writing stops reading too (a
peer that does not read cannot make the server buffer without limit), a frame that
stops arriving halfway or a peer that stops reading for `stall_timeout` loses its
connection, and protocol violations close only the connection that made them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from api.ttrpc.address import listen, socket_address
from api.ttrpc.codes import Code
from api.ttrpc.errors import TtrpcError, error_from_exception
from api.ttrpc.framing import (
    HEADER,
    MAX_MESSAGE_SIZE,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    FrameDecoder,
    Oversized,
)
from api.ttrpc.wire import Request, encode_error_response, encode_ok_response

log = logging.getLogger("api.ttrpc")

_pack_header = HEADER.pack
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Context:
    """What a handler knows about the call besides its request message.

    `metadata` maps each key to its values (ttrpc metadata may repeat a key);
    `deadline` is the `loop.time()` by which the caller gives up, or None;
    `peer` is the caller's (pid, uid, gid) from SO_PEERCRED.
    """

    __slots__ = ("service", "method", "metadata", "deadline", "peer")

    def __init__(
        self,
        service: str,
        method: str,
        metadata: dict[str, list[str]],
        deadline: float | None,
        peer: tuple[int, int, int] | None,
    ) -> None:
        self.service = service
        self.method = method
        self.metadata = metadata
        self.deadline = deadline
        self.peer = peer

    def get(self, key: str, default: str | None = None) -> str | None:
        """The first value of metadata `key` (e.g. `containerd-namespace-ttrpc`)."""
        values = self.metadata.get(key)
        return values[0] if values else default

    def __repr__(self) -> str:
        return f"Context({self.service}/{self.method}, metadata={self.metadata!r})"


Handler = Callable[[Any, Context], Awaitable[Any]]


class _Method(NamedTuple):
    service: str
    name: str
    request_type: type
    response_type: type
    handler: Handler


class Server:
    """A ttrpc server.

        server = Server()
        server.register(MyTask())            # a TaskService subclass (api.gen..._ttrpc)
        await server.start("unix:///run/zviz/s.sock")
        ...
        await server.shutdown()              # in-flight calls finish first

    `require_same_user` (default True) serves only peers whose SO_PEERCRED uid is this
    process's effective uid: the shim trusts its callers, so strangers are refused at
    connect time. A peer must send its first frame within `stall_timeout` of connecting;
    after that, idle connections stay open as long as the peer likes (containerd keeps its
    shim connections between calls); `max_connections` bounds how many.
    """

    def __init__(
        self,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_concurrent_requests: int = 128,
        max_connections: int = 256,
        stall_timeout: float = 30.0,
        require_same_user: bool = True,
    ) -> None:
        self.max_message_size = max_message_size
        self.max_concurrent_requests = max_concurrent_requests
        self.max_connections = max_connections
        self.stall_timeout = stall_timeout
        self.require_same_user = require_same_user
        self._services: dict[str, dict[str, _Method]] = {}
        self._listeners: list[asyncio.AbstractServer] = []
        self._owned_paths: list[str] = []
        self._connections: set[_Connection] = set()
        self._closing = False
        self._closed: asyncio.Event | None = None

    # ---- services -------------------------------------------------------------------

    def register(self, service: object) -> None:
        """Serve `service`: an object with `SERVICE_NAME`, `METHODS` and one async method
        per entry of `METHODS` (`name -> (request_type, response_type)`), which is what
        the generated `<Name>Service` base classes provide.
        """
        name = getattr(service, "SERVICE_NAME", None)
        methods = getattr(service, "METHODS", None)
        if not isinstance(name, str) or not name or not isinstance(methods, dict):
            raise TypeError(
                f"ttrpc: {type(service).__name__} has no SERVICE_NAME and METHODS: "
                "subclass a generated <Name>Service class"
            )
        if name in self._services:
            raise ValueError(f"ttrpc: service {name} is already registered")
        table: dict[str, _Method] = {}
        for method_name, (request_type, response_type) in methods.items():
            handler = getattr(service, method_name, None)
            if handler is None or not inspect.iscoroutinefunction(handler):
                raise TypeError(
                    f"ttrpc: {type(service).__name__}.{method_name} must be an async method"
                )
            table[method_name] = _Method(name, method_name, request_type, response_type, handler)
        self._services[name] = table

    # ---- listening ------------------------------------------------------------------

    async def start(self, address: str | None = None, *, sock: socket.socket | None = None) -> None:
        """Accept connections on `address` (created with `listen()`, removed on shutdown) or
        on an already listening `sock` (e.g. inherited from a parent; left for its owner).
        May be called more than once to listen on several sockets.
        """
        if (address is None) == (sock is None):
            raise TypeError("ttrpc: Server.start() takes an address or a sock, not both")
        if self._closing:
            raise RuntimeError("ttrpc: server is shut down")
        loop = asyncio.get_running_loop()
        if self._closed is None:
            self._closed = asyncio.Event()
        if address is not None:
            sock = listen(address)
            sockaddr = socket_address(address)
            if isinstance(sockaddr, str):
                self._owned_paths.append(sockaddr)
        sock.setblocking(False)
        # asyncio listens again with `backlog` (default 100, which 200 clients dialing at
        # once overflow: their non-blocking connects fail with EAGAIN) and accepts up to
        # `backlog` connections per wakeup: the kernel's maximum means "until EAGAIN".
        listener = await loop.create_unix_server(
            lambda: _Connection(self), sock=sock, backlog=socket.SOMAXCONN
        )
        self._listeners.append(listener)

    async def wait_closed(self) -> None:
        """Return once the server is shut down (by `shutdown()` or `close()`)."""
        if self._closed is None:
            self._closed = asyncio.Event()
        await self._closed.wait()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting and stop reading new requests, let every in-flight call finish and
        its response go out, then close the connections. After `timeout` seconds, whatever
        still runs is cancelled and its connection dropped.

        A handler must not await this (it would wait for itself): have it start a task.
        """
        current = asyncio.current_task()
        for connection in self._connections:
            if current in connection.tasks.values():
                raise RuntimeError(
                    "ttrpc: Server.shutdown() awaited from a handler would wait for itself; "
                    "run it in a task (asyncio.create_task(server.shutdown()))"
                )
        self._stop_listening()
        connections = list(self._connections)
        for connection in connections:
            connection.begin_shutdown()
        waiters = [connection.closed for connection in connections]
        if waiters:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(asyncio.shield(w) for w in waiters))
            except TimeoutError:
                for connection in connections:
                    connection.abort("shutdown timed out")
                await asyncio.gather(*waiters)
        await self._finish_close()

    async def close(self) -> None:
        """Drop every connection now; in-flight calls are cancelled unanswered."""
        self._stop_listening()
        connections = list(self._connections)
        for connection in connections:
            connection.abort("server closed")
        await asyncio.gather(*(connection.closed for connection in connections))
        await self._finish_close()

    def _stop_listening(self) -> None:
        self._closing = True
        for listener in self._listeners:
            listener.close()

    async def _finish_close(self) -> None:
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
        for path in self._owned_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._owned_paths.clear()
        if self._closed is not None:
            self._closed.set()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _lookup(self, service: str, method: str) -> _Method | TtrpcError:
        table = self._services.get(service)
        if table is None:
            return TtrpcError(Code.UNIMPLEMENTED, f"service {_clip(service)}")
        entry = table.get(method)
        if entry is None:
            return TtrpcError(Code.UNIMPLEMENTED, f"method {_clip(method)}")
        return entry


def _clip(name: str, limit: int = 200) -> str:
    """A peer-chosen name, short enough to echo back and log (a request may be 4 MiB)."""
    return name if len(name) <= limit else name[:limit] + "..."


class _Connection(asyncio.Protocol):
    """One client connection: frames in, a task per request, responses out."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder(server.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.tasks: dict[int, asyncio.Task] = {}
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.peer: tuple[int, int, int] | None = None
        self._shutting_down = False
        self._reading_paused = False
        self._writing_paused = False
        self._last_progress = 0.0
        self._stall_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._aborted = False
        self._seen_frame = False

    # ---- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if server._closing:
            transport.abort()
            return
        if len(server._connections) >= server.max_connections:
            log.warning("ttrpc: refusing a connection: %d connections open", server.max_connections)
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        try:
            self.peer = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        except OSError as exc:
            log.warning("ttrpc: refusing a connection: SO_PEERCRED: %s", exc)
            transport.abort()
            return
        if server.require_same_user and self.peer[1] != os.geteuid():
            log.warning(
                "ttrpc: refusing a connection from uid %d (pid %d): not this server's uid %d",
                self.peer[1],
                self.peer[0],
                os.geteuid(),
            )
            transport.abort()
            return
        server._connections.add(self)
        # A peer that connects must speak: containerd calls right after dialing.
        self._last_progress = self.loop.time()
        self._arm_stall_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.server._connections.discard(self)
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        for task in self.tasks.values():
            task.cancel()
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        self._last_progress = self.loop.time()
        self._process()

    def eof_received(self) -> bool:
        # A unix peer that shuts down its side has almost always closed the socket: close
        # ours too (as Go's ttrpc does), which cancels its handlers instead of letting
        # calls nobody waits for pile up.
        return False

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._last_progress = self.loop.time()
        self._pause_reading()
        self._arm_stall_timer()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._last_progress = self.loop.time()
        self._process()

    # ---- frames ---------------------------------------------------------------------

    def _process(self) -> None:
        """Dispatch buffered frames until none is complete or a limit says stop."""
        decoder = self.decoder
        limit = self.server.max_concurrent_requests
        while not (self._shutting_down or self._aborted):
            if self._writing_paused or len(self.tasks) >= limit:
                self._pause_reading()
                break
            event = decoder.next()
            if event is None:
                self._resume_reading()
                break
            self._seen_frame = True
            if type(event) is Oversized:
                self._send_error(
                    event.stream_id,
                    TtrpcError(
                        Code.RESOURCE_EXHAUSTED,
                        f"message length {event.length} exceed maximum message size of "
                        f"{decoder.max_size}",
                    ),
                )
                continue
            if event.type != TYPE_REQUEST:
                self.abort(f"frame type {event.type} is not a request")
                return
            self._dispatch(event.stream_id, event.payload)
        if decoder.mid_frame and not self._lost:
            self._arm_stall_timer()

    def _dispatch(self, stream_id: int, payload: bytes) -> None:
        if stream_id % 2 != 1:
            self._send_error(
                stream_id,
                TtrpcError(
                    Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
                ),
            )
            return
        if stream_id in self.tasks:
            self.abort(f"stream {stream_id} reused while its call is in flight")
            return
        try:
            request = Request.FromString(payload)
        except Exception as exc:
            self._send_error(
                stream_id, TtrpcError(Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            )
            return
        method = self.server._lookup(request.service, request.method)
        if type(method) is TtrpcError:
            self._send_error(stream_id, method)
            return
        try:
            message = method.request_type.FromString(request.payload)
        except Exception as exc:
            self._send_error(
                stream_id,
                TtrpcError(
                    Code.INVALID_ARGUMENT,
                    f"unmarshal {method.request_type.DESCRIPTOR.full_name} error: {exc}",
                ),
            )
            return
        timeout = request.timeout_nano
        if timeout < 0:
            self._send_error(
                stream_id, TtrpcError(Code.DEADLINE_EXCEEDED, "deadline passed before the call")
            )
            return
        metadata: dict[str, list[str]] = {}
        for pair in request.metadata:
            metadata.setdefault(pair.key, []).append(pair.value)
        deadline = self.loop.time() + timeout / 1e9 if timeout else None
        context = Context(request.service, request.method, metadata, deadline, self.peer)
        task = self.loop.create_task(self._serve(stream_id, method, message, context))
        self.tasks[stream_id] = task
        task.add_done_callback(functools.partial(self._finished, stream_id))

    async def _serve(self, stream_id: int, method: _Method, message: Any, context: Context) -> int:
        try:
            if context.deadline is None:
                result = await method.handler(message, context)
            else:
                async with asyncio.timeout_at(context.deadline):
                    result = await method.handler(message, context)
            if type(result) is not method.response_type:
                raise TtrpcError(
                    Code.INTERNAL,
                    f"{method.service}/{method.name} returned {type(result).__name__}, "
                    f"not {method.response_type.DESCRIPTOR.full_name}",
                )
            payload = result.SerializeToString()
            if len(payload) > self.decoder.max_size:
                raise TtrpcError(
                    Code.RESOURCE_EXHAUSTED,
                    f"response of {len(payload)} bytes exceeds the maximum message size of "
                    f"{self.decoder.max_size}",
                )
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # the connection or the server is going away: nobody to answer
            self._send_error(stream_id, TtrpcError(Code.CANCELLED, "handler was cancelled"))
        except TimeoutError as exc:
            if context.deadline is not None and self.loop.time() >= context.deadline:
                error = TtrpcError(
                    Code.DEADLINE_EXCEEDED, f"{method.service}/{method.name}: deadline exceeded"
                )
            else:
                error = error_from_exception(exc)
            self._send_error(stream_id, error)
        except Exception as exc:
            error = error_from_exception(exc)
            if error.code == Code.UNKNOWN:
                log.error("ttrpc: %s/%s raised", method.service, method.name, exc_info=exc)
            self._send_error(stream_id, error)
        else:
            self._send(stream_id, encode_ok_response(payload))
        return stream_id

    def _finished(self, stream_id: int, task: asyncio.Task) -> None:
        del self.tasks[stream_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("ttrpc: handler task failed", exc_info=task.exception())
        if self._shutting_down:
            self._close_when_idle()
        elif self._reading_paused and not self._lost:
            self._process()

    def _send(self, stream_id: int, body: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(_pack_header(len(body), stream_id, TYPE_RESPONSE, 0) + body)

    def _send_error(self, stream_id: int, error: TtrpcError) -> None:
        self._send(stream_id, encode_error_response(error.to_status()))

    # ---- flow control and ending ----------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and not self._shutting_down and self.transport is not None:
            self._reading_paused = False
            self._last_progress = self.loop.time()
            self.transport.resume_reading()

    def _arm_stall_timer(self) -> None:
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_at(
                self._last_progress + self.server.stall_timeout, self._check_stall
            )

    def _check_stall(self) -> None:
        self._stall_timer = None
        if self._lost:
            return
        # A peer that connected and never sent a whole frame, a partial frame that
        # stopped arriving, or a peer that stopped reading our responses. Waiting on our
        # own handlers (reading paused at the request limit) is not the peer's fault.
        waiting_on_peer = (
            self._writing_paused
            or not self._seen_frame
            or (self.decoder.mid_frame and not self._reading_paused)
        )
        if not waiting_on_peer:
            return
        if self.loop.time() - self._last_progress >= self.server.stall_timeout:
            self.abort(f"peer stalled for {self.server.stall_timeout:g}s")
        else:
            self._arm_stall_timer()

    def begin_shutdown(self) -> None:
        self._shutting_down = True
        if self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        if not self.tasks and self.transport is not None:
            self.transport.close()  # flushes queued responses first

    def abort(self, reason: str) -> None:
        self._aborted = True
        if self.transport is not None and not self.transport.is_closing():
            log.warning(
                "ttrpc: closing connection from pid %s: %s", self.peer and self.peer[0], reason
            )
        if self.transport is not None:
            self.transport.abort()
