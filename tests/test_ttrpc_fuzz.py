"""Property tests (hypothesis) over the frame decoder and the server's dispatch.

The dispatch fuzz sends generated frames - valid, damaged and random - to one real server
over real sockets; after every example the server must still answer a good call on a
fresh connection, and after all of them hold no connection or task.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.gen.containerd.task.v2 import shim_pb2, shim_ttrpc
from api.gen.ttrpc import ttrpc_pb2
from api.ttrpc import Client, Code, Server
from api.ttrpc.address import socket_address
from api.ttrpc.framing import HEADER, FrameDecoder, Oversized, encode_frame

MAX = 4096  # a small limit so that oversized frames are cheap to generate

frames = st.lists(
    st.tuples(
        st.integers(0, 2**32 - 1),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=200),
    ),
    max_size=20,
)


@given(frames, st.lists(st.integers(1, 64), max_size=50))
def test_decoder_returns_exactly_the_frames_sent_however_split(sent, cuts):
    data = b"".join(encode_frame(s, t, p, f) for s, t, f, p in sent)
    decoder = FrameDecoder(MAX)
    got = []
    position = 0
    for cut in [*cuts, len(data)]:
        decoder.feed(data[position : position + cut])
        position += cut
        while (frame := decoder.next()) is not None:
            got.append(frame)
    while position < len(data):  # cuts may not have covered everything
        decoder.feed(data[position : position + 64])
        position += 64
        while (frame := decoder.next()) is not None:
            got.append(frame)
    assert [(f.stream_id, f.type, f.flags, f.payload) for f in got] == [
        (s, t, f, p) for s, t, f, p in sent
    ]
    assert not decoder.mid_frame


@given(st.binary(max_size=3000), st.integers(1, 500))
def test_decoder_never_raises_and_never_buffers_past_the_limit(data, chunk):
    decoder = FrameDecoder(MAX)
    for start in range(0, len(data), chunk):
        decoder.feed(data[start : start + chunk])
        while (event := decoder.next()) is not None:
            if type(event) is Oversized:
                assert event.length > MAX
            else:
                assert len(event.payload) <= MAX
        # At most one partial frame is held.
        assert decoder.buffered < HEADER.size + MAX


@given(st.integers(MAX + 1, 2**32 - 1), st.binary(max_size=100), st.binary(max_size=50))
def test_decoder_skips_an_oversized_body_and_resyncs(length, body, after):
    decoder = FrameDecoder(MAX)
    decoder.feed(HEADER.pack(length, 7, 1, 0))
    event = decoder.next()
    assert event == Oversized(7, 1, 0, length)
    decoder.feed(body[:length])
    assert decoder.next() is None
    if len(body) < length:
        return  # still skipping: nothing after it can be read yet
    decoder.feed(encode_frame(9, 1, after))
    assert decoder.next() == (9, 1, 0, after)


class Echo(shim_ttrpc.TaskService):
    async def State(self, request, context):
        return shim_pb2.StateResponse(id=request.id)

    async def Kill(self, request, context):
        raise ValueError(request.id)


def _request_payload():
    service = st.sampled_from(["containerd.task.v2.Task", "x", ""])
    method = st.sampled_from(["State", "Kill", "Nope", ""])
    payload = st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda i, e: shim_pb2.StateRequest(id=i, exec_id=e).SerializeToString(),
            st.text(max_size=20),
            st.text(max_size=20),
        ),
    )
    metadata = st.lists(
        st.builds(
            lambda k, v: ttrpc_pb2.KeyValue(key=k, value=v),
            st.text(max_size=8),
            st.text(max_size=8),
        ),
        max_size=3,
    )
    request = st.builds(
        lambda s, m, p, t, md: ttrpc_pb2.Request(
            service=s, method=m, payload=p, timeout_nano=t, metadata=md
        ).SerializeToString(),
        service,
        method,
        payload,
        st.sampled_from([0, -1, 1, 10**12]),
        metadata,
    )
    return st.one_of(request, st.binary(max_size=100))


wire_frames = st.lists(
    st.builds(
        lambda sid, ftype, flags, body, lie: (
            HEADER.pack(max(len(body) + lie, 0), sid, ftype, flags) + body
        ),
        st.integers(0, 2**32 - 1),
        st.sampled_from([1, 1, 1, 2, 3, 0, 200]),
        st.integers(0, 255),
        _request_payload(),
        st.sampled_from([0, 0, 0, -1, 1, 2**31]),
    ),
    min_size=1,
    max_size=6,
).map(b"".join)


_SENTINEL_ID = 2**32 - 1
_SENTINEL = (lambda body: HEADER.pack(len(body), _SENTINEL_ID, 1, 0) + body)(
    ttrpc_pb2.Request(
        service="containerd.task.v2.Task",
        method="State",
        payload=shim_pb2.StateRequest(id="sentinel").SerializeToString(),
    ).SerializeToString()
)


class _Harness:
    """One server and event loop for all examples (a server per example would be slow)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.directory = tempfile.mkdtemp(prefix="zviz-ttrpc-")
        self.address = os.path.join(self.directory, "s.sock")
        self.server = Server(max_message_size=MAX, stall_timeout=0.05)
        self.server.register(Echo())
        self.loop.run_until_complete(self.server.start(self.address))

    def attack(self, data: bytes, read: bool) -> None:
        self.loop.run_until_complete(self._attack(data, read))

    async def _attack(self, data: bytes, read: bool) -> None:
        reader, writer = await asyncio.open_unix_connection(socket_address(self.address))
        try:
            writer.write(data)
            await writer.drain()
            if read:
                # Whatever comes back must be well-formed response frames. A good call at
                # the end is answered unless the attack broke the framing, in which case
                # the server closes the connection (at the latest after stall_timeout).
                writer.write(_SENTINEL)
                decoder = FrameDecoder(MAX)
                answered = False
                try:
                    async with asyncio.timeout(5):
                        while not answered and (chunk := await reader.read(65536)):
                            decoder.feed(chunk)
                            while (frame := decoder.next()) is not None:
                                assert frame.type == 2
                                response = ttrpc_pb2.Response.FromString(frame.payload)
                                assert response.status.code in set(Code)
                                answered |= frame.stream_id == _SENTINEL_ID
                except ConnectionResetError:
                    pass
        finally:
            writer.close()
        async with await Client.connect(self.address) as client:
            answer = await shim_ttrpc.TaskClient(client).State(shim_pb2.StateRequest(id="ok"))
            assert answer.id == "ok"

    def finish(self) -> None:
        async def drain():
            for _ in range(100):
                if self.server.connection_count == 0:
                    break
                await asyncio.sleep(0.01)
            count = self.server.connection_count
            await self.server.shutdown()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            return count, tasks

        count, tasks = self.loop.run_until_complete(drain())
        self.loop.close()
        shutil.rmtree(self.directory)
        assert count == 0
        assert tasks == []


def test_server_dispatch_survives_arbitrary_frames():
    harness = _Harness()

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(wire_frames, st.booleans())
    def attack(data, read):
        harness.attack(data, read)

    try:
        attack()
    finally:
        harness.finish()
