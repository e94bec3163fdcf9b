"""The shim daemon's ttrpc socket under a crowd and under clients that stall.

containerd dials the shim with a non-blocking connect: when the listen backlog is full
the dial fails with EAGAIN at once, and the call it carried (a Create, a Kill) is lost.
"""

import os
import signal
import time

from api.gen.containerd.task.v2 import shim_pb2
from api.ttrpc.framing import HEADER, MAX_MESSAGE_SIZE, TYPE_REQUEST
from integration.ids import unique_id
from integration.reliability.harness import (
    Harness,
    _scenario,
    _wait_gone,
    connect_frame,
    plain_bundle,
    raw_connect,
    read_response,
)

CROWD = 200


def test_200_connections_at_once_all_get_answers(short_root, make_bundle):
    bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    container_id = unique_id("zviz-rel-crowd")

    async def body(harness: Harness, recorder) -> int:
        harness.start(bundle, container_id)
        shim_pid = (
            await harness.call(
                "Connect", shim_pb2.ConnectRequest(id=container_id), shim_pb2.ConnectResponse
            )
        ).shim_pid
        # Stopped, the daemon accepts nothing: every connect must fit in the backlog, as
        # it must when a busy daemon (a Create forking) is slow to accept.
        os.kill(shim_pid, signal.SIGSTOP)
        crowd = []
        try:
            for _ in range(CROWD):
                crowd.append(raw_connect(harness.address))
        finally:
            os.kill(shim_pid, signal.SIGCONT)
        try:
            for sock in crowd:
                sock.setblocking(True)
                sock.sendall(connect_frame(container_id))
            for sock in crowd:
                assert read_response(sock, timeout=20).shim_pid == shim_pid
        finally:
            for sock in crowd:
                sock.close()
        return shim_pid

    _wait_gone(_scenario(short_root, body))


def test_clients_stalled_mid_frame_hold_nobody_up_and_are_dropped(
    short_root, make_bundle, tmp_path, monkeypatch
):
    stall_seconds = 2
    config = tmp_path / "shim.toml"
    config.write_text(f"stall_timeout_seconds = {stall_seconds}\n")
    monkeypatch.setenv("ZVIZ_SHIM_CONFIG", str(config))
    bundle = plain_bundle(make_bundle, ["sleep", "1000"])
    container_id = unique_id("zviz-rel-stall")

    async def body(harness: Harness, recorder) -> int:
        harness.start(bundle, container_id)
        stalled = [raw_connect(harness.address, blocking=True) for _ in range(3)]
        try:
            half_header = connect_frame(container_id)[: HEADER.size // 2]
            stalled[0].sendall(half_header)
            # announces the largest body the server accepts, then sends none of it
            stalled[1].sendall(HEADER.pack(MAX_MESSAGE_SIZE, 1, TYPE_REQUEST, 0))
            # the third connects and says nothing at all
            began = time.monotonic()
            for _ in range(20):
                with raw_connect(harness.address, blocking=True) as sock:
                    sock.sendall(connect_frame(container_id))
                    shim_pid = read_response(sock, timeout=5).shim_pid
            assert time.monotonic() - began < stall_seconds, "stalled clients slowed the others"
            for sock in stalled:
                sock.settimeout(stall_seconds * 5)
                # dropped: EOF (or a reset) without a byte of response
                try:
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass
            waited = time.monotonic() - began
            assert stall_seconds * 0.9 <= waited < stall_seconds * 4, waited
        finally:
            for sock in stalled:
                sock.close()
        return shim_pid

    _wait_gone(_scenario(short_root, body))
