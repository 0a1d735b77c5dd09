"""Benchmark the link between two processes against two baselines, in one run.

    python bench/bench_link.py [--messages N] [--round-trips N] [--runs N] [--backend asyncio|trio]

Three ways to move small pickled messages between a parent and a child process over a
Unix socket, each with 4-byte length-prefixed pickle frames:

- raw: blocking sockets, one ``sendall`` per frame, buffered reads (``makefile``);
- anyio: a bare anyio socket stream, one ``send`` per frame, ``BufferedByteReceiveStream``;
- link: an aiobus ``Link`` reached through ``PrivateListener`` / ``connect_private``.

Each is measured as one-way throughput (the parent sends N messages; the clock stops when
the child's acknowledgement of the last one arrives) and round trips (the child echoes;
p50 and p99). Each figure is the median of the runs; the kinds alternate within a run so
that drift of the machine hits them alike. Targets from issue 4: link throughput at least
50% of raw; link round-trip p50 at most 1.3 times anyio's.
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import ByteStream, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from aiobus._link import Link
from aiobus._private import PrivateListener, connect_private

HEADER = struct.Struct(">I")
KINDS = ("raw", "anyio", "link")
DONE = "done"


def message(i: int) -> tuple[str, int, float]:
    return ("tick", i, 0.5)


def frame(obj: Any) -> bytes:
    payload = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


# -- raw: blocking sockets ----------------------------------------------------------------


def raw_child(fd: int, messages: int) -> None:
    sock = socket.socket(fileno=fd)
    reader = sock.makefile("rb")

    def receive() -> Any:
        (size,) = HEADER.unpack(reader.read(4))
        return pickle.loads(reader.read(size))

    sock.sendall(frame("ready"))
    for _ in range(messages):
        receive()
    sock.sendall(frame(DONE))
    while (obj := receive()) != DONE:
        sock.sendall(frame(obj))


def raw_parent(sock: socket.socket, messages: int, round_trips: int) -> tuple[float, list[float]]:
    reader = sock.makefile("rb")

    def receive() -> Any:
        (size,) = HEADER.unpack(reader.read(4))
        return pickle.loads(reader.read(size))

    assert receive() == "ready"
    start = time.perf_counter()
    for i in range(messages):
        sock.sendall(frame(message(i)))
    assert receive() == DONE
    elapsed = time.perf_counter() - start
    times = []
    for i in range(round_trips):
        start = time.perf_counter()
        sock.sendall(frame(i))
        receive()
        times.append(time.perf_counter() - start)
    sock.sendall(frame(DONE))
    return elapsed, times


# -- anyio: one send per frame ------------------------------------------------------------


async def anyio_receive(reader: BufferedByteReceiveStream) -> Any:
    (size,) = HEADER.unpack(await reader.receive_exactly(4))
    return pickle.loads(await reader.receive_exactly(size))


async def anyio_child(fd: int, messages: int) -> None:
    stream = await UNIXSocketStream.from_socket(fd)
    reader = BufferedByteReceiveStream(stream)
    await stream.send(frame("ready"))
    for _ in range(messages):
        await anyio_receive(reader)
    await stream.send(frame(DONE))
    while (obj := await anyio_receive(reader)) != DONE:
        await stream.send(frame(obj))
    await stream.aclose()


async def anyio_parent(stream: ByteStream, messages: int, round_trips: int) -> tuple[float, list[float]]:
    reader = BufferedByteReceiveStream(stream)
    assert await anyio_receive(reader) == "ready"
    start = time.perf_counter()
    for i in range(messages):
        await stream.send(frame(message(i)))
    assert await anyio_receive(reader) == DONE
    elapsed = time.perf_counter() - start
    times = []
    for i in range(round_trips):
        start = time.perf_counter()
        await stream.send(frame(i))
        await anyio_receive(reader)
        times.append(time.perf_counter() - start)
    await stream.send(frame(DONE))
    return elapsed, times


# -- the link -----------------------------------------------------------------------------


async def link_child(address: str, token: bytes, messages: int) -> None:
    async with await connect_private(address, token) as link:
        for _ in range(messages):
            await link.receive()
        await link.send(DONE)
        async for obj in link:
            if obj == DONE:
                break
            await link.send(obj)


async def link_parent(link: Link, messages: int, round_trips: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    for i in range(messages):
        await link.send(message(i))
    assert await link.receive() == DONE
    elapsed = time.perf_counter() - start
    times = []
    for i in range(round_trips):
        start = time.perf_counter()
        await link.send(i)
        await link.receive()
        times.append(time.perf_counter() - start)
    await link.send(DONE)
    return elapsed, times


# -- running one measure ------------------------------------------------------------------


def spawn(kind: str, args: argparse.Namespace, *extra: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    argv = [sys.executable, __file__, "--child", kind, "--messages", str(args.messages), "--backend", args.backend]
    return subprocess.Popen([*argv, *extra], pass_fds=pass_fds, stdin=subprocess.PIPE)


def measure(kind: str, args: argparse.Namespace) -> tuple[float, list[float]]:
    if kind == "link":
        return anyio.run(measure_link, args, backend=args.backend)
    ours, theirs = socket.socketpair()
    child = spawn(kind, args, str(theirs.fileno()), pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        if kind == "raw":
            return raw_parent(ours, args.messages, args.round_trips)

        async def run() -> tuple[float, list[float]]:
            stream = await UNIXSocketStream.from_socket(ours)
            async with stream:
                return await anyio_parent(stream, args.messages, args.round_trips)

        return anyio.run(run, backend=args.backend)
    finally:
        ours.close()
        child.wait(timeout=60)


async def measure_link(args: argparse.Namespace) -> tuple[float, list[float]]:
    async with PrivateListener() as listener:
        child = spawn("link", args, listener.address)
        assert child.stdin is not None
        child.stdin.write(listener.token.hex().encode() + b"\n")  # not in argv: that is public
        child.stdin.close()
        try:
            async with await listener.accept(timeout=30) as link:
                return await link_parent(link, args.messages, args.round_trips)
        finally:
            await anyio.to_thread.run_sync(child.wait, 60)


def run_child(args: argparse.Namespace) -> None:
    if args.child == "raw":
        raw_child(int(args.where), args.messages)
    elif args.child == "anyio":
        anyio.run(anyio_child, int(args.where), args.messages, backend=args.backend)
    else:
        token = bytes.fromhex(sys.stdin.readline())
        anyio.run(link_child, args.where, token, args.messages, backend=args.backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000, help="messages per throughput run")
    parser.add_argument("--round-trips", type=int, default=5_000, help="round trips per latency run")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (the median is shown)")
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("where", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)

    started = time.perf_counter()
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    p50s: dict[str, list[float]] = {kind: [] for kind in KINDS}
    p99s: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.runs):
        for kind in KINDS:
            elapsed, times = measure(kind, args)
            times.sort()
            rates[kind].append(args.messages / elapsed)
            p50s[kind].append(times[len(times) // 2] * 1e6)
            p99s[kind].append(times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6)

    median: Callable[[list[float]], float] = statistics.median
    out = sys.stdout.write
    out(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, backend {args.backend}, ")
    out(f"{args.messages} messages and {args.round_trips} round trips, median of {args.runs}\n\n")
    out(f"{'':34}{'messages/s':>12}{'rtt p50 us':>12}{'rtt p99 us':>12}\n")
    labels = {"raw": "raw socketpair (blocking, 1/frame)", "anyio": "bare anyio stream (1 send/frame)"}
    for kind in KINDS:
        label = labels.get(kind, "aiobus Link")
        out(f"{label:34}{median(rates[kind]):>12,.0f}{median(p50s[kind]):>12.1f}{median(p99s[kind]):>12.1f}\n")
    throughput = median(rates["link"]) / median(rates["raw"])
    latency = median(p50s["link"]) / median(p50s["anyio"])
    out(f"\nlink / raw throughput: {throughput:.2f} (target >= 0.50: {'met' if throughput >= 0.5 else 'MISSED'})\n")
    out(f"link / anyio rtt p50:  {latency:.2f} (target <= 1.30: {'met' if latency <= 1.3 else 'MISSED'})\n")
    out(f"link / anyio throughput: {median(rates['link']) / median(rates['anyio']):.2f}\n")
    out(f"total {time.perf_counter() - started:.1f} s\n")


if __name__ == "__main__":
    main()
