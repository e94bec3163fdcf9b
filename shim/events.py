"""Publishing task events to containerd (`Events/Forward` on TTRPC_ADDRESS).

One queue, one sender: events leave in the order they were published, so containerd
sees create → start → exit → delete for every task, and an exit never before its
start. A failed send is retried (with a growing pause) until it succeeds, so a
containerd that restarts still gets every exit, once it is back.
"""

import asyncio
import collections
import logging
import time

from google.protobuf import timestamp_pb2

from api import typeurl
from api.gen.containerd.services.ttrpc.events.v1 import events_pb2, events_ttrpc
from api.ttrpc import Client, Code, TtrpcError

log = logging.getLogger("shim.events")

CALL_TIMEOUT = 5.0
RETRY_PAUSE_MAX = 2.0
NAMESPACE_METADATA = "containerd-namespace-ttrpc"
# Codes that mean "containerd is not there right now", not "containerd rejects this event".
_RETRYABLE = {Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.CANCELLED}


def timestamp(seconds: float | None = None) -> timestamp_pb2.Timestamp:
    seconds = time.time() if seconds is None else seconds
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class Publisher:
    def __init__(self, ttrpc_address: str, namespace: str) -> None:
        self.address = ttrpc_address
        self.namespace = namespace
        self._queue: collections.deque = collections.deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._client: Client | None = None
        self._connecting = asyncio.Lock()
        self._sender: asyncio.Task | None = None
        self._on_disconnect = None
        self.sent = 0

    def publish(self, topic: str, event) -> None:
        """Queue an event; never blocks, never fails (a send failure is retried)."""
        if not self.address:
            return
        envelope = events_pb2.Envelope(
            timestamp=timestamp(),
            namespace=self.namespace,
            topic=topic,
            event=typeurl.pack(event),
        )
        self._queue.append(envelope)
        self._idle.clear()
        self._wakeup.set()
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_forever())

    def on_disconnect(self, callback) -> None:
        """Call `callback()` when the connection to containerd closes (containerd went away)."""
        self._on_disconnect = callback

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued event is delivered; False if `timeout` passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def connect(self) -> None:
        """Connect ahead of the first event; if containerd is not there, say it went away."""
        if not self.address:
            return
        try:
            await self._connect()
        except (TtrpcError, OSError) as e:
            log.warning("containerd events socket %s: %s", self.address, e)
            if self._on_disconnect is not None:
                self._on_disconnect()

    async def _connect(self) -> Client:
        # The startup connect and the first event's send race for the first connection;
        # without the lock each would open one and the loser would stay open forever.
        async with self._connecting:
            if self._client is None or self._client.closed:
                self._client = await Client.connect(
                    self.address,
                    timeout=CALL_TIMEOUT,
                    metadata={NAMESPACE_METADATA: self.namespace},
                )
                asyncio.get_running_loop().create_task(self._watch(self._client))
            return self._client

    async def _watch(self, client: Client) -> None:
        await client.wait_closed()
        if self._on_disconnect is not None and client is self._client:
            self._on_disconnect()

    async def _send_forever(self) -> None:
        pause = 0.05
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            envelope = self._queue[0]
            try:
                client = await self._connect()
                await events_ttrpc.EventsClient(client).Forward(
                    events_pb2.ForwardRequest(envelope=envelope), timeout=CALL_TIMEOUT
                )
            except (TtrpcError, OSError) as e:
                if isinstance(e, TtrpcError) and e.code not in _RETRYABLE:
                    # containerd refused this event itself: resending cannot help.
                    log.error("publish %s refused by containerd: %s", envelope.topic, e)
                    self._queue.popleft()
                    continue
                log.warning("publish %s failed (will retry): %s", envelope.topic, e)
                if self._client is not None and self._client.closed:
                    self._client = None
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_PAUSE_MAX)
                continue
            pause = 0.05
            self._queue.popleft()
            self.sent += 1
