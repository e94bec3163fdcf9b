"""Interop with the real containerd: our ttrpc client against containerd's Go ttrpc server.

A task event is published the way a shim publishes it (ttrpc
`containerd.services.events.ttrpc.v1.Events/Forward` on `<address>.ttrpc`) and seen
arriving through containerd's gRPC events API (grpclib) and through `ctr events`
(which decodes it with Go's typeurl registry: proof the bare type URL resolves).
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from google.protobuf import empty_pb2, timestamp_pb2
from grpclib.client import Channel
from grpclib.const import Cardinality

from api import typeurl
from api.gen.containerd.events import task_pb2 as events
from api.gen.containerd.services.events.v1 import events_pb2 as grpc_events
from api.gen.containerd.services.ttrpc.events.v1 import events_pb2, events_ttrpc
from api.ttrpc import Client, Code, TtrpcError
from integration.ids import unique_id

pytestmark = [pytest.mark.containerd, pytest.mark.every_containerd]

SUBSCRIBE = "/containerd.services.events.v1.Events/Subscribe"


def exit_envelope(namespace: str, container_id: str, exit_status: int) -> events_pb2.Envelope:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return events_pb2.Envelope(
        timestamp=now,
        namespace=namespace,
        topic="/tasks/exit",
        event=typeurl.pack(
            events.TaskExit(
                container_id=container_id,
                id=container_id,
                pid=4242,
                exit_status=exit_status,
                exited_at=now,
            )
        ),
    )


async def subscribe(address: str, filters: list[str], received: asyncio.Queue) -> None:
    """containerd's gRPC Subscribe, every envelope into `received` (until cancelled)."""
    channel = Channel(path=address)
    try:
        async with channel.request(
            SUBSCRIBE, Cardinality.UNARY_STREAM, grpc_events.SubscribeRequest, grpc_events.Envelope
        ) as stream:
            await stream.send_message(grpc_events.SubscribeRequest(filters=filters), end=True)
            while (envelope := await stream.recv_message()) is not None:
                received.put_nowait(envelope)
    finally:
        channel.close()


async def forward_until_seen(publisher, namespace, container_id, received, attempts=100):
    """Publish until the subscriber, which has no 'ready' signal, sees one; return it and
    the envelope that was sent for it."""
    sent = {}
    for attempt in range(attempts):
        envelope = exit_envelope(namespace, container_id, attempt)
        sent[attempt] = envelope
        await publisher.Forward(events_pb2.ForwardRequest(envelope=envelope), timeout=10)
        try:
            got = await asyncio.wait_for(received.get(), 0.1)
        except TimeoutError:
            continue
        return got, sent
    raise AssertionError(f"no event arrived after {attempts} publications")


def test_forwarded_task_exit_arrives_through_containerd(containerd):
    container_id = unique_id("zviz-ttrpc")

    async def main():
        received: asyncio.Queue = asyncio.Queue()
        filters = [f'topic=="/tasks/exit",namespace=="{containerd.namespace}"']
        subscriber = asyncio.create_task(subscribe(containerd.address, filters, received))
        ctr = await asyncio.create_subprocess_exec(
            containerd.ctr_bin, "--address", containerd.address, "events",
            stdout=asyncio.subprocess.PIPE,
            env=containerd.env,
        )  # fmt: skip
        try:
            async with await Client.connect(containerd.ttrpc_address) as client:
                publisher = events_ttrpc.EventsClient(client)
                got, sent = await forward_until_seen(
                    publisher, containerd.namespace, container_id, received
                )
                # What arrives is what was sent: same namespace, topic, timestamp, event.
                assert got.topic == "/tasks/exit"
                assert got.namespace == containerd.namespace
                assert got.event.type_url == "containerd.events.TaskExit"
                exit_event = typeurl.unpack(got.event)
                assert isinstance(exit_event, events.TaskExit)
                original = sent[exit_event.exit_status]
                assert got.timestamp == original.timestamp
                assert exit_event == typeurl.unpack(original.event)
                assert exit_event.container_id == container_id and exit_event.pid == 4242

                # `ctr events` decoded the same event with Go's type registry. It subscribes
                # on its own schedule: publish until it has seen one too.
                ctr_lines = asyncio.create_task(read_event_line(ctr.stdout, container_id))
                for attempt in range(1000, 1300):
                    envelope = exit_envelope(containerd.namespace, container_id, attempt)
                    sent[attempt] = envelope
                    await publisher.Forward(events_pb2.ForwardRequest(envelope=envelope))
                    done, _ = await asyncio.wait({ctr_lines}, timeout=0.1)
                    if done:
                        break
                line = await asyncio.wait_for(ctr_lines, 10)
                # "<timestamp with spaces> <namespace> <topic> <event as JSON>"
                head, brace, body = line.partition("{")
                assert head.split()[-2:] == [containerd.namespace, "/tasks/exit"], line
                decoded = json.loads(brace + body)
                assert decoded["container_id"] == container_id
                assert decoded["pid"] == 4242
                # Any of the events sent (ctr may have subscribed before the first).
                assert decoded.get("exit_status", 0) in sent  # Go omits a zero
        finally:
            subscriber.cancel()
            ctr.kill()
            await ctr.wait()

    asyncio.run(main())


async def read_event_line(stream: asyncio.StreamReader, container_id: str) -> str:
    while line := (await stream.readline()).decode():
        if container_id in line:
            return line.strip()
    raise AssertionError("ctr events ended without our event")


def test_many_concurrent_forwards_on_one_connection(containerd):
    container_id = unique_id("zviz-ttrpc")
    count = 64

    async def main():
        received: asyncio.Queue = asyncio.Queue()
        filters = [f'topic=="/tasks/exit",namespace=="{containerd.namespace}"']
        subscriber = asyncio.create_task(subscribe(containerd.address, filters, received))
        try:
            async with await Client.connect(containerd.ttrpc_address) as client:
                publisher = events_ttrpc.EventsClient(client)
                await forward_until_seen(
                    publisher, containerd.namespace, "probe-" + container_id, received
                )
                results = await asyncio.gather(
                    *(
                        publisher.Forward(
                            events_pb2.ForwardRequest(
                                envelope=exit_envelope(containerd.namespace, container_id, i)
                            ),
                            timeout=30,
                        )
                        for i in range(count)
                    )
                )
                assert all(r == empty_pb2.Empty() for r in results)
                statuses = set()
                while len(statuses) < count:
                    envelope = await asyncio.wait_for(received.get(), 30)
                    event = typeurl.unpack(envelope.event)
                    if event.container_id == container_id:
                        statuses.add(event.exit_status)
                assert statuses == set(range(count))
        finally:
            subscriber.cancel()

    asyncio.run(main())


def test_containerds_errors_arrive_as_status_codes(containerd):
    """Go ttrpc's status codes reach our client: an unknown method is UNIMPLEMENTED, an
    envelope containerd rejects is INVALID_ARGUMENT, and the connection survives both."""

    async def main():
        async with await Client.connect(
            "unix://" + containerd.ttrpc_address,
            metadata={"containerd-namespace-ttrpc": containerd.namespace},
        ) as client:
            with pytest.raises(TtrpcError) as caught:
                await client.call(
                    "containerd.services.events.ttrpc.v1.Events",
                    "Publish",
                    empty_pb2.Empty(),
                    empty_pb2.Empty,
                    timeout=10,
                )
            assert caught.value.code == Code.UNIMPLEMENTED
            with pytest.raises(TtrpcError) as caught:
                await client.call(
                    "containerd.task.v2.Task", "State", empty_pb2.Empty(), empty_pb2.Empty
                )
            assert caught.value.code == Code.UNIMPLEMENTED
            publisher = events_ttrpc.EventsClient(client)
            bad = exit_envelope(containerd.namespace, "x", 0)
            bad.topic = "no-leading-slash"
            with pytest.raises(TtrpcError) as caught:
                await publisher.Forward(events_pb2.ForwardRequest(envelope=bad), timeout=10)
            assert caught.value.code == Code.INVALID_ARGUMENT
            assert "topic" in caught.value.message
            good = exit_envelope(containerd.namespace, "x", 0)
            assert await publisher.Forward(events_pb2.ForwardRequest(envelope=good)) == (
                empty_pb2.Empty()
            )

    assert os.path.exists(containerd.ttrpc_address)
    asyncio.run(main())
