"""ttrpc round trips: api.ttrpc beside grpclib (HTTP/2 gRPC) over the same kind of unix socket.

Each server runs in its own process (as a shim does); the client process drives one
connection with one call at a time (latency) and 16 connections with one call each in
flight (throughput), for a small message and a 64 KiB one. Also reports what importing
api.ttrpc costs a fresh interpreter (the shim's `start` path pays it per container).

    python -m bench ttrpc         # or: python -m bench.ttrpc [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time

from google.protobuf import wrappers_pb2

SERVICE = "zviz.bench.Echo"
METHOD = "Echo"
SIZES = {"small (32 B)": 32, "64 KiB": 64 * 1024}
CONCURRENCY = 16


class EchoService:
    SERVICE_NAME = SERVICE
    METHODS = {METHOD: (wrappers_pb2.BytesValue, wrappers_pb2.BytesValue)}

    async def Echo(self, request, context):
        return request


def _serve_ttrpc(path: str, ready) -> None:
    from api.ttrpc import Server

    async def main():
        server = Server()
        server.register(EchoService())
        await server.start(path)
        ready.set()
        await server.wait_closed()

    asyncio.run(main())


def _serve_grpclib(path: str, ready) -> None:
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    class GrpcEcho:
        async def echo(self, stream):
            request = await stream.recv_message()
            await stream.send_message(request)

        def __mapping__(self):
            return {
                f"/{SERVICE}/{METHOD}": Handler(
                    self.echo,
                    Cardinality.UNARY_UNARY,
                    wrappers_pb2.BytesValue,
                    wrappers_pb2.BytesValue,
                )
            }

    async def main():
        server = Server([GrpcEcho()])
        await server.start(path=path)
        ready.set()
        await server.wait_closed()

    asyncio.run(main())


class _TtrpcCaller:
    name = "api.ttrpc"
    serve = staticmethod(_serve_ttrpc)

    async def connect(self, path):
        from api.ttrpc import Client

        client = await Client.connect(path)

        async def call(request):
            return await client.call(SERVICE, METHOD, request, wrappers_pb2.BytesValue)

        return call, client.close


class _GrpclibCaller:
    name = "grpclib"
    serve = staticmethod(_serve_grpclib)

    async def connect(self, path):
        from grpclib.client import Channel
        from grpclib.const import Cardinality

        channel = Channel(path=path)
        await channel.__connect__()

        async def call(request):
            async with channel.request(
                f"/{SERVICE}/{METHOD}",
                Cardinality.UNARY_UNARY,
                wrappers_pb2.BytesValue,
                wrappers_pb2.BytesValue,
            ) as stream:
                await stream.send_message(request, end=True)
                return await stream.recv_message()

        async def close():
            channel.close()

        return call, close


async def _measure(caller, path: str, size: int, connections: int, seconds: float):
    request = wrappers_pb2.BytesValue(value=os.urandom(size))
    links = [await caller.connect(path) for _ in range(connections)]
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(call):
        for _ in range(20):  # warm-up
            await call(request)
        while (started := time.perf_counter()) < stop:
            reply = await call(request)
            latencies.append(time.perf_counter() - started)
            if len(reply.value) != size:
                raise AssertionError("echo returned the wrong payload")

    began = time.perf_counter()
    await asyncio.gather(*(worker(call) for call, _ in links))
    elapsed = time.perf_counter() - began
    for _, close in links:
        await close()
    latencies.sort()
    return {
        "calls_per_s": len(latencies) / elapsed,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99) - 1] * 1e6,
    }


def _run_against(caller, seconds: float) -> dict:
    context = multiprocessing.get_context("fork")
    directory = tempfile.mkdtemp(prefix="zviz-bench-ttrpc-")
    path = os.path.join(directory, "s.sock")
    ready = context.Event()
    server = context.Process(target=caller.serve, args=(path, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError(f"{caller.name} server did not start")
        results = {}
        for label, size in SIZES.items():
            for connections in (1, CONCURRENCY):
                results[(label, connections)] = asyncio.run(
                    _measure(caller, path, size, connections, seconds)
                )
        return results
    finally:
        server.terminate()
        server.join(10)
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(directory)


def import_cost_ms(module: str, runs: int = 15) -> float:
    """Median extra wall time of `python -c "import <module>"` over `python -c pass`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)

    def median_run(code: str) -> float:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    return (median_run(f"import {module}") - median_run("pass")) * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ttrpc")
    parser.add_argument("--seconds", type=float, default=2.0, help="per scenario")
    args = parser.parse_args(argv if argv is not None else [])
    ours = _run_against(_TtrpcCaller(), args.seconds)
    reference = _run_against(_GrpclibCaller(), args.seconds)
    print(f"unary echo round trips over a unix socket ({args.seconds:g}s per row, 2 processes)")
    header = (
        f"{'message':<13} {'conns':>5} | {'ttrpc calls/s':>13} {'p50 µs':>8} {'p99 µs':>8} | "
        f"{'grpclib calls/s':>15} {'p50 µs':>8} {'p99 µs':>8} | {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    for key in ours:
        a, b = ours[key], reference[key]
        print(
            f"{key[0]:<13} {key[1]:>5} | {a['calls_per_s']:>13,.0f} {a['p50_us']:>8.0f} "
            f"{a['p99_us']:>8.0f} | {b['calls_per_s']:>15,.0f} {b['p50_us']:>8.0f} "
            f"{b['p99_us']:>8.0f} | {a['calls_per_s'] / b['calls_per_s']:>4.1f}x"
        )
    print()
    print(f"import cost in a fresh interpreter: api.ttrpc {import_cost_ms('api.ttrpc'):.0f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
