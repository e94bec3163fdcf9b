"""ttrpc server and client: round trips, errors, metadata, deadlines, concurrency,
shutdown, addresses and the message limit, over real unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator

import pytest
from google.protobuf import any_pb2, empty_pb2

from api.gen.containerd.task.v2 import shim_pb2, shim_ttrpc
from api.gen.ttrpc import ttrpc_pb2
from api.ttrpc import MAX_MESSAGE_SIZE, Client, Code, Context, Server, TtrpcError, listen
from api.ttrpc.address import socket_address
from api.ttrpc.framing import HEADER, TYPE_REQUEST, TYPE_RESPONSE
from api.ttrpc.wire import encode_ok_response, encode_request, request_prefix

NS_KEY = "containerd-namespace-ttrpc"


class Task(shim_ttrpc.TaskService):
    """A Task service whose behaviour each test steers."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.cancelled = 0
        self.raise_for: dict[str, BaseException] = {}

    async def State(self, request: shim_pb2.StateRequest, context: Context):
        if request.id in self.raise_for:
            raise self.raise_for[request.id]
        return shim_pb2.StateResponse(
            id=request.id,
            exec_id=",".join(context.metadata.get("k", [])),
            bundle=context.get(NS_KEY, ""),
            pid=len(request.exec_id),
            stdout=request.exec_id,
        )

    async def Wait(self, request: shim_pb2.WaitRequest, context: Context):
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return shim_pb2.WaitResponse(exit_status=int(request.id or 0))

    async def Kill(self, request, context):
        return shim_pb2.StateResponse()  # the wrong type on purpose

    async def Pids(self, request, context):
        # A response just over the limit.
        info = any_pb2.Any(type_url="x", value=b"\0" * MAX_MESSAGE_SIZE)
        return shim_pb2.PidsResponse(processes=[{"pid": 1, "info": info}])


@contextlib.asynccontextmanager
async def serving(**server_options) -> AsyncIterator[tuple[Server, Task, str]]:
    directory = tempfile.mkdtemp(prefix="zviz-ttrpc-")
    address = "unix://" + os.path.join(directory, "s.sock")
    server = Server(**server_options)
    service = Task()
    server.register(service)
    await server.start(address)
    try:
        yield server, service, address
    finally:
        await server.close()
        shutil.rmtree(directory)


# Every wait below ends well within these; past them, a test fails saying what it
# waited for instead of hanging until pytest's own timeout. A condition polled by
# eventually() gets less time than the whole test, so its own message is the one seen.
CONDITION_DEADLINE = 5.0
DEADLINE = 20.0


def run(coro):
    async def bounded():
        try:
            return await asyncio.wait_for(coro, DEADLINE)
        except TimeoutError:
            pytest.fail(f"the test did not finish within {DEADLINE} s (a call or close hung)")

    return asyncio.run(bounded())


async def eventually(condition, what: str, deadline: float = CONDITION_DEADLINE) -> None:
    """Wait until condition() holds; fail naming `what` if it does not within `deadline`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition():
        if loop.time() > end:
            pytest.fail(f"not within {deadline} s: {what}")
        await asyncio.sleep(0.001)


def test_round_trip_carries_fields_and_metadata():
    async def main():
        async with serving() as (_, _, address):
            async with await Client.connect(address, metadata={NS_KEY: "zviz-ns"}) as client:
                task = shim_ttrpc.TaskClient(client)
                response = await task.State(
                    shim_pb2.StateRequest(id="c1", exec_id="abc"),
                    metadata={"k": ["one", "two"]},
                )
                assert response == shim_pb2.StateResponse(
                    id="c1", exec_id="one,two", bundle="zviz-ns", pid=3, stdout="abc"
                )
                # Per-call metadata replaces a default key.
                response = await task.State(
                    shim_pb2.StateRequest(id="c1"), metadata={NS_KEY: "other"}
                )
                assert response.bundle == "other"

    run(main())


@pytest.mark.parametrize(
    ("service", "method", "message"),
    [
        ("containerd.task.v2.Task", "Pause", "containerd.task.v2.Task/Pause is not implemented"),
        ("containerd.task.v2.Task", "NoSuchMethod", "method NoSuchMethod"),
        ("no.such.Service", "State", "service no.such.Service"),
    ],
)
def test_unimplemented_answers_code_12(service, method, message):
    async def main():
        async with serving() as (_, _, address):
            async with await Client.connect(address) as client:
                with pytest.raises(TtrpcError) as caught:
                    await client.call(
                        service, method, shim_pb2.PauseRequest(id="x"), empty_pb2.Empty
                    )
                assert caught.value.code == Code.UNIMPLEMENTED == 12
                assert caught.value.message == message

    run(main())


class _CodedError(Exception):
    grpc_code = 9


@pytest.mark.parametrize(
    ("exception", "code", "message"),
    [
        (TtrpcError(Code.ABORTED, "gone", [any_pb2.Any(type_url="d", value=b"1")]), 10, "gone"),
        # zviz's error kinds: the shim's table (tests/test_shim_errors.py), not this package.
        (_CodedError("duck-typed"), 9, "duck-typed"),
        (FileNotFoundError(2, "No such file"), 5, "[Errno 2] No such file"),
        (PermissionError(1, "denied"), 7, "[Errno 1] denied"),
        (ValueError("boom"), 2, "ValueError: boom"),
    ],
)
def test_handler_exceptions_map_to_status_codes(exception, code, message):
    async def main():
        async with serving() as (_, service, address):
            service.raise_for["x"] = exception
            async with await Client.connect(address) as client:
                with pytest.raises(TtrpcError) as caught:
                    await shim_ttrpc.TaskClient(client).State(shim_pb2.StateRequest(id="x"))
                assert caught.value.code == code
                assert caught.value.message == message
                if isinstance(exception, TtrpcError):
                    assert caught.value.details == exception.details
                # The connection survives a failed call.
                ok = await shim_ttrpc.TaskClient(client).State(shim_pb2.StateRequest(id="y"))
                assert ok.id == "y"

    run(main())


def test_wrong_response_type_is_internal():
    async def main():
        async with serving() as (_, _, address):
            async with await Client.connect(address) as client:
                with pytest.raises(TtrpcError) as caught:
                    await shim_ttrpc.TaskClient(client).Kill(shim_pb2.KillRequest(id="x"))
                assert caught.value.code == Code.INTERNAL
                assert "StateResponse" in caught.value.message

    run(main())


def test_many_calls_in_flight_answer_out_of_order():
    async def main():
        async with serving() as (_, service, address):
            async with await Client.connect(address) as client:
                task = shim_ttrpc.TaskClient(client)
                waits = [
                    asyncio.create_task(task.Wait(shim_pb2.WaitRequest(id=str(i))))
                    for i in range(50)
                ]
                await eventually(lambda: service.started == 50, "all 50 Waits started")
                # While 50 calls block, others on the same connection are answered.
                states = await asyncio.gather(
                    *(task.State(shim_pb2.StateRequest(id=str(i))) for i in range(20))
                )
                assert [s.id for s in states] == [str(i) for i in range(20)]
                assert not any(w.done() for w in waits)
                service.release.set()
                results = await asyncio.gather(*waits)
                assert [r.exit_status for r in results] == list(range(50))

    run(main())


def test_client_timeout_is_deadline_exceeded_and_the_server_stops_the_handler():
    async def main():
        async with serving() as (_, service, address):
            async with await Client.connect(address) as client:
                task = shim_ttrpc.TaskClient(client)
                with pytest.raises(TtrpcError) as caught:
                    await task.Wait(shim_pb2.WaitRequest(id="1"), timeout=0.05)
                assert caught.value.code == Code.DEADLINE_EXCEEDED
                # The server got the deadline too and cancelled the handler.
                await eventually(lambda: service.cancelled == 1, "the server cancelled the Wait")
                # The connection stays usable.
                assert (await task.State(shim_pb2.StateRequest(id="z"))).id == "z"

    run(main())


async def raw_call(address: str, frame: bytes) -> tuple[int, int, ttrpc_pb2.Response]:
    """Send one raw frame; return the answer's (stream id, type, Response)."""
    reader, writer = await asyncio.open_unix_connection(socket_address(address))
    try:
        writer.write(frame)
        length, stream_id, frame_type, _ = HEADER.unpack(await reader.readexactly(HEADER.size))
        return (
            stream_id,
            frame_type,
            ttrpc_pb2.Response.FromString(await reader.readexactly(length)),
        )
    finally:
        writer.close()


def request_frame(stream_id: int, request: ttrpc_pb2.Request) -> bytes:
    body = request.SerializeToString()
    return HEADER.pack(len(body), stream_id, TYPE_REQUEST, 0) + body


def test_server_enforces_the_request_timeout_on_its_own():
    async def main():
        async with serving() as (_, service, address):
            request = ttrpc_pb2.Request(
                service="containerd.task.v2.Task",
                method="Wait",
                payload=shim_pb2.WaitRequest(id="1").SerializeToString(),
                timeout_nano=20_000_000,
            )
            stream_id, frame_type, response = await raw_call(address, request_frame(7, request))
            assert (stream_id, frame_type) == (7, TYPE_RESPONSE)
            assert response.status.code == Code.DEADLINE_EXCEEDED
            assert service.cancelled == 1
            # A deadline already past (Go sends a negative timeout) never runs the handler.
            request.timeout_nano = -5
            _, _, response = await raw_call(address, request_frame(9, request))
            assert response.status.code == Code.DEADLINE_EXCEEDED
            assert service.started == 1

    run(main())


def test_graceful_shutdown_lets_in_flight_calls_finish():
    async def main():
        directory = tempfile.mkdtemp(prefix="zviz-ttrpc-")
        path = os.path.join(directory, "s.sock")
        server = Server()
        service = Task()
        server.register(service)
        await server.start("unix://" + path)
        client = await Client.connect(path)
        task = shim_ttrpc.TaskClient(client)
        waits = [asyncio.create_task(task.Wait(shim_pb2.WaitRequest(id=str(i)))) for i in range(3)]
        await eventually(lambda: service.started == 3, "all 3 Waits started")
        shutdown = asyncio.create_task(server.shutdown())
        await asyncio.sleep(0.01)
        assert not shutdown.done()
        # No new connections once shutting down.
        with pytest.raises(TtrpcError) as caught:
            await Client.connect(path)
        assert caught.value.code == Code.UNAVAILABLE
        service.release.set()
        assert [r.exit_status for r in await asyncio.gather(*waits)] == [0, 1, 2]
        await shutdown
        await client.wait_closed()
        assert not os.path.exists(path)  # the server removes the socket it created
        assert service.cancelled == 0
        os.rmdir(directory)

    run(main())


def test_shutdown_timeout_cancels_what_is_left():
    async def main():
        async with serving() as (server, service, address):
            client = await Client.connect(address)
            wait = asyncio.create_task(
                shim_ttrpc.TaskClient(client).Wait(shim_pb2.WaitRequest(id="1"))
            )
            await eventually(lambda: service.started == 1, "the Wait started")
            await server.shutdown(timeout=0.05)
            with pytest.raises(TtrpcError) as caught:
                await wait
            assert caught.value.code == Code.UNAVAILABLE
            assert service.cancelled == 1
            assert server.connection_count == 0

    run(main())


def test_shutdown_awaited_inside_a_handler_is_refused():
    class Stopper(shim_ttrpc.TaskService):
        async def Shutdown(self, request, context):
            await server.shutdown()
            return empty_pb2.Empty()

    server = Server()
    server.register(Stopper())

    async def main():
        directory = tempfile.mkdtemp(prefix="zviz-ttrpc-")
        address = os.path.join(directory, "s")
        await server.start(address)
        async with await Client.connect(address) as client:
            with pytest.raises(TtrpcError) as caught:
                await shim_ttrpc.TaskClient(client).Shutdown(shim_pb2.ShutdownRequest())
            assert caught.value.code == Code.UNKNOWN
            assert "would wait for itself" in caught.value.message
        await server.shutdown()
        os.rmdir(directory)

    run(main())


def test_close_fails_pending_calls_with_unavailable():
    async def main():
        async with serving() as (server, service, address):
            client = await Client.connect(address)
            wait = asyncio.create_task(
                shim_ttrpc.TaskClient(client).Wait(shim_pb2.WaitRequest(id="1"))
            )
            await eventually(lambda: service.started == 1, "the Wait started")
            await server.close()
            with pytest.raises(TtrpcError) as caught:
                await wait
            assert caught.value.code == Code.UNAVAILABLE
            with pytest.raises(TtrpcError) as caught:
                await client.call("s", "m", empty_pb2.Empty(), empty_pb2.Empty)
            assert caught.value.code == Code.UNAVAILABLE

    run(main())


@pytest.mark.parametrize("spelling", ["\0zviz-ttrpc-test-{pid}", "@zviz-ttrpc-test-{pid}"])
def test_abstract_socket_names(spelling):
    async def main():
        address = spelling.format(pid=os.getpid())
        server = Server()
        server.register(Task())
        await server.start("unix://" + address)
        # The other spelling of the same name reaches the same socket.
        other = ("@" if address[0] == "\0" else "\0") + address[1:]
        async with await Client.connect(other) as client:
            response = await shim_ttrpc.TaskClient(client).State(shim_pb2.StateRequest(id="a"))
            assert response.id == "a"
        await server.shutdown()

    run(main())


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("", "expected a unix socket path"),
        ("tcp://127.0.0.1:1", "is not unix"),
        ("unix://", "empty socket path"),
        ("/" + "x" * 120, "longer than 107 bytes"),
        ("@" + "x" * 120, "longer than 107 bytes"),
    ],
)
def test_bad_addresses_are_named(address, problem):
    with pytest.raises(ValueError, match=problem):
        socket_address(address)


def test_connect_to_nothing_is_unavailable():
    async def main():
        with pytest.raises(TtrpcError) as caught:
            await Client.connect("/nonexistent/zviz/s.sock")
        assert caught.value.code == Code.UNAVAILABLE
        assert "/nonexistent/zviz/s.sock" in caught.value.message

    run(main())


def test_listen_replaces_a_stale_socket_and_refuses_a_live_one():
    directory = tempfile.mkdtemp(prefix="zviz-ttrpc-")
    path = os.path.join(directory, "s.sock")
    try:
        stale = listen(path)
        stale.close()  # the file stays behind, nobody accepts
        live = listen(path)
        assert os.stat(path).st_mode & 0o777 == 0o600
        with pytest.raises(FileExistsError, match="already listening"):
            listen(path)
        live.close()
        os.unlink(path)
        with open(path, "w"):
            pass
        with pytest.raises(FileExistsError, match="not a socket"):
            listen(path)
    finally:
        shutil.rmtree(directory)


def test_message_size_limit_both_ways():
    async def main():
        async with serving() as (_, _, address):
            async with await Client.connect(address) as client:
                task = shim_ttrpc.TaskClient(client)
                # Just under the limit travels.
                big = "x" * (MAX_MESSAGE_SIZE - 1024)
                response = await task.State(shim_pb2.StateRequest(id="b", exec_id=big))
                assert response.stdout == big
                # Over it, the client refuses to send.
                with pytest.raises(TtrpcError) as caught:
                    await task.State(shim_pb2.StateRequest(id="b", exec_id="x" * MAX_MESSAGE_SIZE))
                assert caught.value.code == Code.RESOURCE_EXHAUSTED
                # A response over it is answered RESOURCE_EXHAUSTED instead.
                with pytest.raises(TtrpcError) as caught:
                    await task.Pids(shim_pb2.PidsRequest(id="b"))
                assert caught.value.code == Code.RESOURCE_EXHAUSTED
                assert (await task.State(shim_pb2.StateRequest(id="after"))).id == "after"

    run(main())


def connect_as_nobody(name: str) -> bytes:
    """In a forked child running as uid 65534: connect, send a State call, return the answer."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(socket_address(name))
            body = ttrpc_pb2.Request(service="containerd.task.v2.Task", method="State")
            payload = body.SerializeToString()
            sock.settimeout(10)
            try:
                sock.sendall(HEADER.pack(len(payload), 1, TYPE_REQUEST, 0) + payload)
                answer = sock.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""  # the server aborted the connection
            os.write(write_end, b"answer:" + answer)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read()
    os.waitpid(pid, 0)
    assert out.startswith(b"answer:"), out
    return out[len(b"answer:") :]


def test_peers_of_another_uid_are_refused():
    """A process running as nobody connects: the server hangs up before serving it."""

    async def main():
        name = f"@zviz-ttrpc-uid-{os.getpid()}"
        server = Server()
        server.register(Task())
        await server.start(name)
        loop = asyncio.get_running_loop()
        received = await loop.run_in_executor(None, connect_as_nobody, name)
        assert received == b""  # EOF: no answer for a stranger
        # The server's own uid is served.
        async with await Client.connect(name) as client:
            response = await shim_ttrpc.TaskClient(client).State(shim_pb2.StateRequest(id="me"))
            assert response.id == "me"
        await server.shutdown()

    if os.geteuid() != 0:
        pytest.skip("needs root to run a peer under another uid")
    run(main())


def test_register_rejects_what_it_cannot_serve():
    server = Server()
    with pytest.raises(TypeError, match="no SERVICE_NAME"):
        server.register(object())

    class SyncMethod(shim_ttrpc.TaskService):
        def State(self, request, context):  # not async
            return shim_pb2.StateResponse()

    with pytest.raises(TypeError, match="State must be an async method"):
        server.register(SyncMethod())
    server.register(Task())
    with pytest.raises(ValueError, match="already registered"):
        server.register(Task())


@pytest.mark.parametrize("timeout_nano", [0, 1, 5_000_000_000, -1, -(2**63)])
@pytest.mark.parametrize("metadata", [(), (("k", "v"),), (("", ""), ("k", "é" * 200))])
def test_hand_encoded_request_matches_protobuf(timeout_nano, metadata):
    payload = b"\x01" * 300
    ours = encode_request(
        request_prefix("containerd.task.v2.Task", "State"), payload, timeout_nano, metadata
    )
    reference = ttrpc_pb2.Request(
        service="containerd.task.v2.Task",
        method="State",
        payload=payload,
        timeout_nano=timeout_nano,
        metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in metadata],
    )
    assert ttrpc_pb2.Request.FromString(ours) == reference
    assert ours == reference.SerializeToString()


@pytest.mark.parametrize("payload", [b"", b"x", b"y" * 70000])
def test_hand_encoded_response_matches_go(payload):
    encoded = encode_ok_response(payload)
    decoded = ttrpc_pb2.Response.FromString(encoded)
    assert decoded.HasField("status") and decoded.status.code == 0
    assert decoded.payload == payload


def test_error_str_names_the_code():
    assert str(TtrpcError(Code.NOT_FOUND, "container x")) == "ttrpc: NOT_FOUND: container x"
    unknown = TtrpcError(99, "future")
    assert unknown.code == 99 and str(unknown) == "ttrpc: 99: future"


def test_socket_address_forms():
    assert socket_address("unix:///run/x.sock") == "/run/x.sock"
    assert socket_address("/run/x.sock") == "/run/x.sock"
    assert socket_address("unix://\0abc") == b"\0abc"
    assert socket_address("@abc") == b"\0abc"


def test_serving_an_inherited_listener_leaves_it_to_its_owner():
    """The shim's `start` binds the socket and its daemon serves it (Server.start(sock=))."""

    async def main():
        directory = tempfile.mkdtemp(prefix="zviz-ttrpc-")
        path = os.path.join(directory, "s.sock")
        listener = listen(path)
        server = Server()
        server.register(Task())
        await server.start(sock=listener)
        async with await Client.connect("unix://" + path) as client:
            assert (
                await shim_ttrpc.TaskClient(client).State(shim_pb2.StateRequest(id="i"))
            ).id == "i"
        waiter = asyncio.create_task(server.wait_closed())
        await server.shutdown()
        await waiter
        assert os.path.exists(path)  # not the server's to remove
        shutil.rmtree(directory)

    run(main())


def test_server_deadline_message_names_the_method():
    async def main():
        async with serving() as (_, _, address):
            request = ttrpc_pb2.Request(
                service="containerd.task.v2.Task", method="Wait", timeout_nano=1_000_000
            )
            _, _, response = await raw_call(address, request_frame(1, request))
            assert response.status.code == Code.DEADLINE_EXCEEDED
            assert response.status.message == "containerd.task.v2.Task/Wait: deadline exceeded"

    run(main())


def test_stream_ids_stay_odd_and_wrap_past_2_to_the_32():
    async def main():
        async with serving() as (_, _, address):
            async with await Client.connect(address) as client:
                client._next_stream_id = 2**32 - 3
                task = shim_ttrpc.TaskClient(client)
                for name in ("a", "b", "c"):
                    assert (await task.State(shim_pb2.StateRequest(id=name))).id == name
                assert client._next_stream_id == 3  # ... 2**32-3, 2**32-1, then 1

    run(main())


def test_a_departed_callers_handlers_are_cancelled():
    async def main():
        async with serving() as (server, service, address):
            client = await Client.connect(address)
            waits = [
                asyncio.create_task(
                    shim_ttrpc.TaskClient(client).Wait(shim_pb2.WaitRequest(id=str(i)))
                )
                for i in range(5)
            ]
            await eventually(lambda: service.started == 5, "all 5 Waits started")
            await client.close()
            for wait in waits:
                with pytest.raises(TtrpcError):
                    await wait
            await eventually(lambda: service.cancelled == 5, "the server cancelled all 5 Waits")
            await eventually(
                lambda: server.connection_count == 0, "the server dropped the closed connection"
            )

    run(main())


def test_shutdown_twice_and_close_after_shutdown_are_harmless():
    async def main():
        async with serving() as (server, _, address):
            async with await Client.connect(address) as client:
                assert (await shim_ttrpc.TaskClient(client).State(shim_pb2.StateRequest(id="a"))).id
            await asyncio.gather(server.shutdown(), server.shutdown())
            await server.close()
            with pytest.raises(RuntimeError, match="shut down"):
                await server.start(address)

    run(main())
