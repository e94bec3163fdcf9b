"""Hostile peers against a real ttrpc server on a unix socket.

Each case closes (or answers an error on) the offending connection only: a second,
well-behaved connection opened before the attack is served afterwards, and at the end
no connection, task or file descriptor is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import tempfile
import tracemalloc
from collections.abc import AsyncIterator

from google.protobuf import empty_pb2

from api.gen.containerd.task.v2 import shim_pb2, shim_ttrpc
from api.gen.ttrpc import ttrpc_pb2
from api.ttrpc import Client, Code, Server
from api.ttrpc.address import socket_address
from api.ttrpc.framing import HEADER, MAX_MESSAGE_SIZE, TYPE_REQUEST, TYPE_RESPONSE

STALL_TIMEOUT = 0.2
MAX_CONCURRENT = 8


class Task(shim_ttrpc.TaskService):
    def __init__(self) -> None:
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()

    async def State(self, request, context):
        return shim_pb2.StateResponse(id=request.id, stdout="o" * len(request.exec_id))

    async def Wait(self, request, context):
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return shim_pb2.WaitResponse()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@contextlib.asynccontextmanager
async def hostile_setting() -> AsyncIterator[tuple[Server, Task, str, Client]]:
    """A server, and a good client connected before the attack; checks for leaks after."""
    fds_before = open_fds()
    directory = tempfile.mkdtemp(prefix="zviz-ttrpc-")
    address = os.path.join(directory, "s.sock")
    server = Server(stall_timeout=STALL_TIMEOUT, max_concurrent_requests=MAX_CONCURRENT)
    service = Task()
    server.register(service)
    await server.start(address)
    good = await Client.connect(address)
    # Its first call makes it an established (and from then on idle) connection.
    assert (await shim_ttrpc.TaskClient(good).State(shim_pb2.StateRequest(id="hi"))).id == "hi"
    try:
        yield server, service, address, good
        # The well-behaved connection is still served after the attack.
        answer = await shim_ttrpc.TaskClient(good).State(shim_pb2.StateRequest(id="good"))
        assert answer.id == "good"
        await good.close()
        # Only connections closed by the peer or the server remain to be reaped.
        for _ in range(200):
            if server.connection_count == 0:
                break
            await asyncio.sleep(0.01)
        assert server.connection_count == 0
    finally:
        await server.close()
        shutil.rmtree(directory)
    for _ in range(3):  # transports close their sockets on the next loop iterations
        await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    gc.collect()
    assert open_fds() <= fds_before


async def raw(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(socket_address(address))


async def read_response(reader: asyncio.StreamReader) -> tuple[int, int, ttrpc_pb2.Response]:
    length, stream_id, frame_type, _ = HEADER.unpack(await reader.readexactly(HEADER.size))
    return stream_id, frame_type, ttrpc_pb2.Response.FromString(await reader.readexactly(length))


# Far longer than any close under test takes (the slowest is the stall timeout's).
CLOSE_DEADLINE = STALL_TIMEOUT * 10


async def closed_by_server(reader: asyncio.StreamReader, deadline=CLOSE_DEADLINE) -> bool:
    """True if the server closes the connection (EOF or reset) within `deadline` seconds,
    reading whatever it sends first; False if the connection is still open then.

    Only meaningful while our side is open for reading: the caller must not have closed
    its writer (that would end the reader itself); write_eof() keeps it open.
    """

    async def read_to_the_end():
        while await reader.read(65536):
            pass

    try:
        await asyncio.wait_for(read_to_the_end(), deadline)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def state_request(stream_id: int, container_id: str = "x", exec_id: str = "") -> bytes:
    request = ttrpc_pb2.Request(
        service="containerd.task.v2.Task",
        method="State",
        payload=shim_pb2.StateRequest(id=container_id, exec_id=exec_id).SerializeToString(),
    )
    body = request.SerializeToString()
    return HEADER.pack(len(body), stream_id, TYPE_REQUEST, 0) + body


def run(coro):
    asyncio.run(coro)


def test_oversized_length_is_answered_and_its_bytes_skipped_without_buffering():
    async def main():
        async with hostile_setting() as (_, _, address, _):
            reader, writer = await raw(address)
            length = 16 * MAX_MESSAGE_SIZE
            tracemalloc.start()
            writer.write(HEADER.pack(length, 1, TYPE_REQUEST, 0))
            stream_id, _, response = await read_response(reader)
            assert stream_id == 1
            assert response.status.code == Code.RESOURCE_EXHAUSTED
            chunk = b"\xff" * 65536
            for _ in range(length // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            # The same connection goes on after the skipped body.
            writer.write(state_request(3, "after"))
            stream_id, _, response = await read_response(reader)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert stream_id == 3
            assert shim_pb2.StateResponse.FromString(response.payload).id == "after"
            # 64 MiB went through; the server never held anything near a whole frame.
            assert peak < MAX_MESSAGE_SIZE
            writer.close()

    run(main())


def test_truncated_frame_then_hangup():
    async def main():
        async with hostile_setting() as (_, _, address, _):
            reader, writer = await raw(address)
            frame = state_request(1)
            writer.write(frame[: len(frame) // 2])
            await writer.drain()
            writer.write_eof()  # a hangup the server must answer by closing its side
            assert await closed_by_server(reader)
            writer.close()

    run(main())


def test_truncated_header_then_hangup():
    async def main():
        async with hostile_setting() as (_, _, address, _):
            reader, writer = await raw(address)
            writer.write(b"\x00\x00\x00")
            writer.write_eof()
            assert await closed_by_server(reader)
            writer.close()

    run(main())


def test_stalled_frame_loses_its_connection(caplog):
    async def main():
        async with hostile_setting() as (_, _, address, _):
            # Connects and says nothing at all.
            reader0, writer0 = await raw(address)
            # Half a header, then nothing.
            reader, writer = await raw(address)
            writer.write(b"\x00\x00")
            # Half a body, then nothing.
            reader2, writer2 = await raw(address)
            writer2.write(state_request(1)[:15])
            assert await closed_by_server(reader0)
            assert await closed_by_server(reader)
            assert await closed_by_server(reader2)
            for w in (writer0, writer, writer2):
                w.close()

    run(main())
    assert caplog.text.count("peer stalled") == 3


def test_idle_connection_is_kept():
    """containerd keeps its connection to a shim open between calls: once a peer has
    spoken, idle is not stalled."""

    async def main():
        async with hostile_setting() as (_, _, address, good):
            # A raw peer that has spoken once, then idles past the stall timeout.
            reader, writer = await raw(address)
            writer.write(state_request(1, "r"))
            _, _, response = await read_response(reader)
            assert shim_pb2.StateResponse.FromString(response.payload).id == "r"
            assert not await closed_by_server(reader, STALL_TIMEOUT * 3)
            writer.close()
            assert not good.closed
            assert (
                await shim_ttrpc.TaskClient(good).State(shim_pb2.StateRequest(id="i"))
            ).id == "i"

    run(main())


def test_unknown_frame_type_closes_the_connection():
    async def main():
        async with hostile_setting() as (_, _, address, _):
            for frame_type in (0, TYPE_RESPONSE, 3, 255):
                reader, writer = await raw(address)
                writer.write(HEADER.pack(2, 1, frame_type, 0) + b"\x08\x01")
                assert await closed_by_server(reader)
                writer.close()

    run(main())


def test_garbage_protobuf_is_invalid_argument_and_the_connection_goes_on():
    async def main():
        async with hostile_setting() as (_, _, address, _):
            reader, writer = await raw(address)
            # Not a Request at all.
            garbage = b"\xff\xff\xff\xff\x0f\x0a\x05"
            writer.write(HEADER.pack(len(garbage), 1, TYPE_REQUEST, 0) + garbage)
            stream_id, _, response = await read_response(reader)
            assert (stream_id, response.status.code) == (1, Code.INVALID_ARGUMENT)
            assert "unmarshal request" in response.status.message
            # A valid envelope around a payload that is no StateRequest.
            request = ttrpc_pb2.Request(
                service="containerd.task.v2.Task", method="State", payload=b"\x0a\xff\x01"
            ).SerializeToString()
            writer.write(HEADER.pack(len(request), 3, TYPE_REQUEST, 0) + request)
            stream_id, _, response = await read_response(reader)
            assert (stream_id, response.status.code) == (3, Code.INVALID_ARGUMENT)
            assert "containerd.task.v2.StateRequest" in response.status.message
            # An even stream id (server-initiated in ttrpc) is refused like Go's ttrpc does.
            writer.write(state_request(4))
            stream_id, _, response = await read_response(reader)
            assert (stream_id, response.status.code) == (4, Code.INVALID_ARGUMENT)
            writer.write(state_request(5, "fine"))
            stream_id, _, response = await read_response(reader)
            assert shim_pb2.StateResponse.FromString(response.payload).id == "fine"
            writer.close()

    run(main())


def test_stream_id_reused_while_in_flight_closes_the_connection():
    async def main():
        async with hostile_setting() as (_, service, address, _):
            reader, writer = await raw(address)
            wait = ttrpc_pb2.Request(
                service="containerd.task.v2.Task",
                method="Wait",
                payload=shim_pb2.WaitRequest(id="w").SerializeToString(),
            ).SerializeToString()
            frame = HEADER.pack(len(wait), 1, TYPE_REQUEST, 0) + wait
            writer.write(frame + frame)
            assert await closed_by_server(reader)
            assert service.running == 0  # the first call was cancelled with its connection
            writer.close()

    run(main())


def test_flood_of_requests_is_bounded_and_answered():
    async def main():
        async with hostile_setting() as (_, service, address, good):
            reader, writer = await raw(address)
            wait = ttrpc_pb2.Request(
                service="containerd.task.v2.Task",
                method="Wait",
                payload=shim_pb2.WaitRequest(id="w").SerializeToString(),
            ).SerializeToString()
            count = 2000
            writer.write(
                b"".join(
                    HEADER.pack(len(wait), 2 * i + 1, TYPE_REQUEST, 0) + wait for i in range(count)
                )
            )
            while service.running < MAX_CONCURRENT:
                await asyncio.sleep(0.001)
            # Others are served while the flood's handlers block.
            answer = await shim_ttrpc.TaskClient(good).State(shim_pb2.StateRequest(id="g"))
            assert answer.id == "g"
            service.release.set()
            seen = set()
            for _ in range(count):
                stream_id, _, response = await read_response(reader)
                assert response.status.code == Code.OK
                seen.add(stream_id)
            assert seen == {2 * i + 1 for i in range(count)}
            assert service.most_running == MAX_CONCURRENT
            writer.close()

    run(main())


def test_peer_that_never_reads_is_dropped(caplog):
    """Requests whose answers pile up unread: the server stops reading, then hangs up."""

    async def main():
        async with hostile_setting() as (server, _, address, _):
            reader, writer = await raw(address)
            frames = [state_request(2 * i + 1, "r", "e" * 65536) for i in range(200)]
            writer.transport.set_write_buffer_limits(high=64 * 1024 * 1024)
            writer.write(b"".join(frames))
            # Not reading: the server's socket buffer fills, it pauses, and after
            # STALL_TIMEOUT without progress it aborts the connection.
            for _ in range(500):
                if server.connection_count == 1:  # only the good client remains
                    break
                await asyncio.sleep(0.01)
            assert server.connection_count == 1
            writer.close()

    run(main())
    assert "peer stalled" in caplog.text


def test_many_connections_beyond_the_limit_are_refused():
    async def main():
        directory = tempfile.mkdtemp(prefix="zviz-ttrpc-")
        address = os.path.join(directory, "s.sock")
        server = Server(max_connections=4)
        server.register(Task())
        await server.start(address)
        clients = [await Client.connect(address) for _ in range(4)]
        for client in clients:
            answer = await shim_ttrpc.TaskClient(client).State(shim_pb2.StateRequest(id="c"))
            assert answer.id == "c"
        extra = await Client.connect(address)
        try:
            await shim_ttrpc.TaskClient(extra).State(shim_pb2.StateRequest(id="c"))
        except Exception as exc:
            assert getattr(exc, "code", None) == Code.UNAVAILABLE
        else:
            raise AssertionError("the fifth connection was served")
        for client in [*clients, extra]:
            await client.close()
        await server.shutdown()
        shutil.rmtree(directory)

    run(main())


def test_client_survives_a_server_speaking_nonsense():
    """The client is hardened too: a 'server' answering garbage fails calls, not the loop."""

    async def main():
        directory = tempfile.mkdtemp(prefix="zviz-ttrpc-")
        path = os.path.join(directory, "s.sock")

        async def liar(reader, writer):
            header = await reader.readexactly(HEADER.size)
            length, stream_id, _, _ = HEADER.unpack(header)
            await reader.readexactly(length)
            writer.write(HEADER.pack(3, stream_id, TYPE_RESPONSE, 0) + b"\xff\xff\xff")
            header = await reader.readexactly(HEADER.size)
            length, stream_id, _, _ = HEADER.unpack(header)
            await reader.readexactly(length)
            writer.write(HEADER.pack(1, stream_id, 9, 0) + b"\x00")
            await writer.drain()
            await reader.read()
            writer.close()

        fake = await asyncio.start_unix_server(liar, path)
        client = await Client.connect(path)
        try:
            await client.call("s", "m", empty_pb2.Empty(), empty_pb2.Empty)
        except Exception as exc:
            assert getattr(exc, "code", None) == Code.INTERNAL
        else:
            raise AssertionError("garbage was accepted as a response")
        try:
            await client.call("s", "m", empty_pb2.Empty(), empty_pb2.Empty)
        except Exception as exc:
            assert getattr(exc, "code", None) == Code.INTERNAL
            assert "frame of type 9" in exc.message
        else:
            raise AssertionError("a frame of unknown type was accepted")
        assert client.closed
        fake.close()
        await fake.wait_closed()
        shutil.rmtree(directory)

    run(main())


def test_memory_stays_flat_under_repeated_abuse():
    """Thousands of failing, garbage and abandoned calls leave no memory behind."""

    async def main():
        async with hostile_setting() as (_, service, address, good):
            task = shim_ttrpc.TaskClient(good)

            async def round_of_abuse():
                reader, writer = await raw(address)
                garbage = b"\xff\xff\xff"
                for stream_id in range(1, 200, 2):
                    writer.write(HEADER.pack(len(garbage), stream_id, TYPE_REQUEST, 0) + garbage)
                for _ in range(1, 200, 2):
                    await read_response(reader)
                writer.write(HEADER.pack(2, 1, 9, 0) + b"\x00\x00")  # then a protocol violation
                assert await closed_by_server(reader)
                writer.close()
                for _ in range(50):
                    await task.State(shim_pb2.StateRequest(id="s"))
                    try:
                        await task.Wait(shim_pb2.WaitRequest(id="w"), timeout=0.001)
                    except Exception as exc:
                        assert getattr(exc, "code", None) == Code.DEADLINE_EXCEEDED

            for _ in range(3):  # warm caches and free lists
                await round_of_abuse()
            gc.collect()
            # pytest keeps every log record it captures: silence ours while measuring.
            logging.getLogger("api.ttrpc").disabled = True
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(10):
                await round_of_abuse()
            while service.running:
                await asyncio.sleep(0.001)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            logging.getLogger("api.ttrpc").disabled = False
            # 10 rounds are ~4000 frames and calls: 32 KiB is under 10 bytes each.
            assert grown < 32 * 1024, f"{grown} bytes stayed allocated"

    try:
        run(main())
    finally:
        logging.getLogger("api.ttrpc").disabled = False


def test_huge_unknown_names_are_not_echoed_back_whole():
    async def main():
        async with hostile_setting() as (_, _, address, _):
            reader, writer = await raw(address)
            request = ttrpc_pb2.Request(service="s" * (MAX_MESSAGE_SIZE - 100), method="m")
            body = request.SerializeToString()
            writer.write(HEADER.pack(len(body), 1, TYPE_REQUEST, 0) + body)
            stream_id, _, response = await read_response(reader)
            assert (stream_id, response.status.code) == (1, Code.UNIMPLEMENTED)
            assert len(response.status.message) < 300
            writer.close()

    run(main())
