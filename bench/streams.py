"""Stream source throughput and lag: one websocket source, emulator -> null sink.

The question: how many messages per second does one websocket source
sustain into a null sink with change detection on, and what is the message
lag p99 at 50% of that rate? Target: at least 100k messages/s on one core,
with msgspec decoding.

The server. flows' in-process emulator tops out near 1-2k messages/s
(hypercorn's per-frame cost), far below what the source may take, so the
server here is a separate process (this file with ``--serve``, started as a
subprocess and stopped at the end) that speaks just enough websocket: it
answers the handshake, then writes pre-encoded, unmasked text frames
straight to the socket, one Binance combined-stream trade message per frame
as the real feed does::

    {"stream":"s12usdt@trade","data":{"e":"trade","E":1711356300123,"s":"S12USDT",
     "t":1001,"p":"101.23450000","q":"0.01000000","T":1711356300123,"m":false,"M":true}}

(about 160 bytes; ``--symbols`` symbols round-robin, prices a random walk in
which 40% of the steps keep the price, so the change detector passes about
half). The path says what to do: ``/blast/N`` writes N frames as fast as
the socket takes them (a pre-built buffer written again and again: the
server costs next to nothing, so the client is what is measured);
``/paced/RATE/SECONDS`` writes RATE frames per second, built as they go
out with ``E`` and ``T`` set to the send time (ms, rounded). The server
answers a close frame with a close frame.

The client (this process, one trio thread, so one core) for each variant,
best of ``--repeat`` runs of ``--messages`` messages, timed from the first
message counted to the last, by wall clock, with this process's CPU time
over the same span (``cpu%``; ``msgs/cpu-s`` = messages per CPU-second):

- ``flows``: ``BinanceStream(channel="trade")`` (defaults: batch window
  5 ms, trade-id gap checks on) -> ``ChangeDetector(rel=0.0005)`` -> a
  null sink, in a ``Flow`` run by ``flows.Runtime`` (fresh registry, no
  metrics server). Messages counted by the source (the same number as
  ``flows_source_messages_total``, checked at the end).
- the baseline, ``same flow over trio-websocket``: the same source reading
  through trio-websocket instead of ``flows._wsclient`` (a bench-local
  subclass whose connection hands over one message per read: a reader
  task, a memory channel of 64 messages and wsproto frame parsing, as
  ``WebSocketSource`` was built first). Every row's ``vs baseline`` is its
  rate over this one's.
- ceilings, in layers, to show where the time goes:
  ``msgspec decode`` (the frames' payloads decoded with BinanceStream's
  decoder, in a loop: no I/O), ``BinanceStream.parse`` (decode + Tick),
  ``wsproto only`` (the frame bytes fed to a wsproto client connection in
  64 KiB chunks, events iterated: no I/O, no trio), and the transports over
  the network with nothing else done: ``flows._wsclient
  receive_messages`` (a bare loop; every message of one 64 KiB read at
  once), ``trio-websocket get_message`` (a bare loop), each also with
  ``msgspec decode`` of every message.

Lag: the server paces at 50% of the rate ``flows`` sustained (or
``--lag-rate``) for ``--lag-seconds``; lag is measured per record at the
null sink as ``time.time() - tick.ts`` (``ts`` = the send time in ``T``:
server and client share the host's clock; rounding to the millisecond adds
at most +-0.5 ms; the first 5% of records, the start-up, are left out),
after the change detector, so it covers the socket, the client, the
source's batch window (a record waits up to that long for its batch to
close), the channel to the stage and the one to the sink. Shown: p50, p99
and max (the median run by p99 of ``--lag-repeat`` runs, with the p99
range), the rate received, the CPU share, and the source's own
``flows_source_lag_seconds`` p99 (interpolated inside histogram buckets,
so coarse). For ``batch_window`` 5 ms (the default) and 50 ms, and for the
trio-websocket baseline at 50% of its own rate.

``--profile`` adds a cProfile run of ``flows`` (CPU time by module and the
top functions, per message; cProfile inflates per-call costs about
threefold, so read it as shares).

Target, reported as PASS/FAIL (the exit status is 0 either way): ``flows``
sustains >= 100,000 messages/s.

Run from the repository root (about four minutes with the defaults; the
machine should be otherwise idle: the client's rate is its CPU's)::

    python bench/streams.py --profile
    python bench/streams.py --messages 50000 --repeat 2 --lag-repeat 1
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import hashlib
import math
import os
import pstats
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
import trio_websocket
import wsproto
import wsproto.connection
import wsproto.events
from prometheus_client import CollectorRegistry

from flows import ChangeDetector, Flow, Inbox, Runtime, histogram_quantile
from flows._wsclient import ConnectionClosed, open_ws
from sources.binance import BinanceStream

TARGET = 100_000
REL = 0.0005
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
FRAMES = 50_000  # distinct frames in the blast buffer (about 9.5 MB)

# -- the frames -------------------------------------------------------------------


def symbols(n: int) -> list[str]:
    return [f"S{i}USDT" for i in range(n)]


def prices(n_symbols: int, steps: int, seed: int = 1) -> list[str]:
    """``steps`` prices, round-robin over the symbols: a random walk per
    symbol, 40% of steps unchanged, else +-0.02..0.2%."""
    rng = random.Random(seed)
    level = [100.0 * (1 + i % 7) for i in range(n_symbols)]
    out = []
    for i in range(steps):
        s = i % n_symbols
        if rng.random() >= 0.4:
            level[s] *= 1 + rng.choice((-1, 1)) * rng.uniform(0.0002, 0.002)
        out.append(f"{level[s]:.8f}")
    return out


def payload(names: list[str], price_list: list[str], i: int, ms: int) -> bytes:
    n = len(names)
    s = names[i % n]
    return (
        f'{{"stream":"{s.lower()}@trade","data":{{"e":"trade","E":{ms},"s":"{s}",'
        f'"t":{1000 + i // n},"p":"{price_list[i % len(price_list)]}","q":"0.01000000",'
        f'"T":{ms},"m":false,"M":true}}}}'
    ).encode()


def frame(data: bytes, opcode: int = 0x1) -> bytes:
    """An unmasked (server to client) websocket frame."""
    n = len(data)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + data


def payloads(n_symbols: int, count: int) -> list[bytes]:
    names, price_list = symbols(n_symbols), prices(n_symbols, count)
    ms = int(time.time() * 1000)
    return [payload(names, price_list, i, ms) for i in range(count)]


# -- the server (a subprocess) -------------------------------------------------------


def _accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


async def _handshake(stream: Any) -> str | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    path = head[0].split(" ")[1]
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + _accept_key(headers["sec-websocket-key"]).encode()
        + b"\r\n\r\n"
    )
    return path


async def _read_until_close(stream: Any, done: trio.CancelScope) -> bool:
    """Read the client's frames until a close frame (True) or the end of the
    stream (False); then stop the sending (``done``)."""
    buf = bytearray()
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            done.cancel()
            return False
        buf += chunk
        while len(buf) >= 2:
            opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
            at = 2
            if n == 126:
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                n, at = int.from_bytes(buf[2:10], "big"), 10
            at += 4 if buf[1] & 0x80 else 0
            if len(buf) < at + n:
                break
            del buf[: at + n]
            if opcode == 0x8:
                done.cancel()
                return True


class Server:
    def __init__(self, n_symbols: int) -> None:
        self.n_symbols = n_symbols
        self.blast = b"".join(frame(p) for p in payloads(n_symbols, FRAMES))
        self.names = symbols(n_symbols)
        self.prices = prices(n_symbols, FRAMES, seed=2)

    async def handle(self, stream: Any) -> None:
        try:
            path = await _handshake(stream)
            if path is None:
                return
            parts = path.split("?")[0].strip("/").split("/")
            closing = []

            async def read() -> None:
                closing.append(await _read_until_close(stream, nursery.cancel_scope))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                if parts[0] == "blast":
                    await self._blast(stream, int(parts[1]))
                elif parts[0] == "paced":
                    await self._paced(stream, float(parts[1]), float(parts[2]))
                await trio.sleep_forever()
            if closing and closing[0]:  # answer the client's close frame
                await stream.send_all(frame(b"\x03\xe8", 0x8))
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        finally:
            await trio.aclose_forcefully(stream)

    async def _blast(self, stream: Any, n: int) -> None:
        for _ in range(math.ceil(n / FRAMES)):
            await stream.send_all(self.blast)

    async def _paced(self, stream: Any, rate: float, seconds: float) -> None:
        start = trio.current_time()
        sent = 0
        names, price_list = self.names, self.prices
        while True:
            elapsed = trio.current_time() - start
            if elapsed >= seconds:
                return
            due = int(elapsed * rate) - sent
            if due > 0:
                ms = round(time.time() * 1000)
                await stream.send_all(b"".join(
                    frame(payload(names, price_list, sent + j, ms)) for j in range(due)))
                sent += due
            await trio.sleep(0.0002)


def serve(port: int, n_symbols: int) -> None:
    server = Server(n_symbols)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, server.handle, port)
            print(listeners[0].socket.getsockname()[1], flush=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass


def start_server(n_symbols: int) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--symbols", str(n_symbols)],
        stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.isdigit():
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, int(line)


# -- measuring --------------------------------------------------------------------


class Span:
    """Wall and CPU time between ``start()`` and ``stop(count)``."""

    def __init__(self) -> None:
        self.wall0 = self.cpu0 = 0.0
        self.n0 = 0
        self.wall = self.cpu = 0.0
        self.n = 0

    def start(self, n: int = 0) -> None:
        self.wall0, self.cpu0, self.n0 = time.perf_counter(), time.process_time(), n

    def stop(self, n: int) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        self.n = n - self.n0

    @property
    def rate(self) -> float:
        return self.n / self.wall if self.wall else math.nan

    @property
    def cpu_rate(self) -> float:
        return self.n / self.cpu if self.cpu else math.nan


def best(runs: list[Span]) -> Span:
    return max(runs, key=lambda s: s.rate)


def offline(fn: Callable[[], int], repeat: int) -> Span:
    """A CPU-bound loop: the best of ``repeat`` runs (wall = CPU here)."""
    runs = []
    for _ in range(repeat):
        gc.collect()
        span = Span()
        span.start()
        n = fn()
        span.stop(n)
        runs.append(span)
    return best(runs)


def call_each(fn: Callable[[bytes], Any], frames: list[bytes]) -> Callable[[], int]:
    """A loop calling ``fn`` on every frame's payload (bytes, as the source gets them)."""

    def run() -> int:
        for data in frames:
            fn(data)
        return len(frames)

    return run


def wsproto_loop(frames: list[bytes]) -> Callable[[], int]:
    wire = b"".join(frame(f) for f in frames)

    def run() -> int:
        conn = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
        n = 0
        for i in range(0, len(wire), 65536):
            conn.receive_data(wire[i : i + 65536])
            for event in conn.events():
                if isinstance(event, wsproto.events.TextMessage) and event.message_finished:
                    n += 1
        return n

    return run


RUN_TIMEOUT = 120.0  # seconds: a run that takes longer failed (the server died?)


async def _bounded(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    with trio.fail_after(RUN_TIMEOUT):
        await fn(*args)


def online(port: int, n: int, repeat: int, client: Callable[[str, int, Span], Awaitable[None]]
           ) -> Span:
    """``client(url, n, span)`` against ``/blast/n``: the best of ``repeat`` runs."""
    runs = []
    for _ in range(repeat):
        gc.collect()
        span = Span()
        trio.run(_bounded, client, f"ws://127.0.0.1:{port}/blast/{n}", n, span)
        runs.append(span)
    return best(runs)


async def flows_client_bare(url: str, n: int, span: Span, decode: bool = False) -> None:
    """``flows._wsclient``: a bare ``receive_messages`` loop (no source)."""
    dec = BinanceStream(symbols=["X"], channel="trade")._decode
    async with open_ws(url + "/stream?streams=s0usdt@trade") as ws:
        got = len(await ws.receive_messages())
        span.start(got)
        receive = ws.receive_messages
        while got < n:
            messages = await receive()
            if decode:
                for message in messages:
                    dec(message)
            got += len(messages)
        span.stop(got)


async def trio_websocket_client(url: str, n: int, span: Span, decode: bool = False) -> None:
    """trio-websocket: a bare ``get_message`` loop."""
    dec = BinanceStream(symbols=["X"], channel="trade")._decode
    async with trio_websocket.open_websocket_url(url + "/stream?streams=s0usdt@trade") as ws:
        await ws.get_message()
        span.start(1)
        got = 1
        get = ws.get_message
        while got < n:
            message = await get()
            if decode:
                dec(message)
            got += 1
        span.stop(got)


class NullSink:
    """Sink: counts records; with ``lags``, keeps ``time.time() - ts`` of each."""

    def __init__(self, *, lags: list[float] | None = None, name: str = "null") -> None:
        self.name = name
        self.n = 0
        self.lags = lags

    async def run(self, inbox: Inbox) -> None:
        lags = self.lags
        async for batch in inbox:
            self.n += len(batch.records)
            if lags is not None:
                now = time.time()
                lags.extend([now - r.ts for r in batch.records])
            batch.ack("written")


class _TrioWebsocketAdapter:
    """trio-websocket behind the interface ``WebSocketSource`` reads: one
    message per ``receive_messages`` call (how the source read before)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def receive_messages(self) -> list[Any]:
        try:
            return [await self.ws.get_message()]
        except trio_websocket.ConnectionClosed as exc:
            raise ConnectionClosed(exc.reason.code or 1006) from None

    async def send_message(self, message: Any) -> None:
        await self.ws.send_message(message)


class TrioWebsocketBinanceStream(BinanceStream):
    """The baseline: the same source over trio-websocket (a reader task and a
    memory channel per connection, wsproto frames), as ``WebSocketSource``
    was built before it read frames itself."""

    @asynccontextmanager
    async def _open(self, url: str) -> Any:
        async with trio_websocket.open_websocket_url(url, message_queue_size=64) as ws:
            yield _TrioWebsocketAdapter(ws)


def flow_client(cls: type[BinanceStream] = BinanceStream, **options: Any
                ) -> Callable[[str, int, Span], Awaitable[None]]:
    async def client(url: str, n: int, span: Span) -> None:
        n_symbols = int(os.environ.get("BENCH_SYMBOLS", "100"))
        source = cls(symbols=symbols(n_symbols), channel="trade", base_url=url, **options)
        sink = NullSink()
        registry = CollectorRegistry()
        flow = Flow("bench", sources=[source], stages=[ChangeDetector(rel=REL)], sinks=[sink])
        rt = Runtime(flow, registry=registry, metrics_addr=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            while not source.shards or source.shards[0].messages == 0:
                await trio.sleep(0.001)
            shard = source.shards[0]
            span.start(shard.messages)
            while shard.messages < n:
                await trio.sleep(0.005)
            span.stop(shard.messages)
            total = registry.get_sample_value(
                "flows_source_messages_total", {"flow": "bench", "stage": source.name})
            assert total is not None and total >= shard.messages, (total, shard.messages)
            rt.stop()

    return client


def lag_run(port: int, rate: float, seconds: float, cls: type[BinanceStream] = BinanceStream,
            **options: Any) -> dict[str, float]:
    """Paced at ``rate`` for ``seconds``: per-record lag at the sink, the
    source's lag histogram p99, the rate received and the CPU share."""
    n_symbols = int(os.environ.get("BENCH_SYMBOLS", "100"))
    lags: list[float] = []
    result: dict[str, float] = {}

    async def main() -> None:
        url = f"ws://127.0.0.1:{port}/paced/{rate:.0f}/{seconds}"
        source = cls(symbols=symbols(n_symbols), channel="trade", base_url=url, **options)
        sink = NullSink(lags=lags)
        registry = CollectorRegistry()
        flow = Flow("bench", sources=[source], stages=[ChangeDetector(rel=REL)], sinks=[sink])
        rt = Runtime(flow, registry=registry, metrics_addr=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            while not source.shards or source.shards[0].messages == 0:
                await trio.sleep(0.001)
            shard = source.shards[0]
            span = Span()
            span.start(shard.messages)
            await trio.sleep(seconds - 0.5)
            span.stop(shard.messages)
            buckets = []
            for metric in registry.collect():
                if metric.name == "flows_source_lag_seconds":
                    buckets = [(float(s.labels["le"]), s.value) for s in metric.samples
                               if s.name.endswith("_bucket")
                               and s.labels["stage"] == source.name]
            result.update(rate=span.rate, cpu=span.cpu / span.wall,
                          source_p99=histogram_quantile(0.99, buckets))
            rt.stop()

    trio.run(_bounded, main)
    skip = len(lags) // 20  # the first 5%: start-up
    lags = sorted(lags[skip:])
    result.update(
        records=len(lags),
        p50=lags[len(lags) // 2] if lags else math.nan,
        p99=lags[int(len(lags) * 0.99)] if lags else math.nan,
        max=lags[-1] if lags else math.nan,
        mean=statistics.fmean(lags) if lags else math.nan,
    )
    return result


def profile_flow(port: int, n: int, top: int = 18) -> str:
    profiler = cProfile.Profile()
    span = Span()
    profiler.enable()
    trio.run(_bounded, flow_client(), f"ws://127.0.0.1:{port}/blast/{n}", n, span)
    profiler.disable()
    stats = pstats.Stats(profiler)
    by_module: dict[str, float] = {}
    rows = []
    total = 0.0
    for (path, _, func), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        module = _module_of(path)
        by_module[module] = by_module.get(module, 0.0) + tottime
        rows.append((tottime, ncalls, f"{module}:{func}"))
    lines = [(f"cProfile of flows ({n:,} messages; {span.rate:,.0f} msgs/s under the "
              "profiler): CPU by module")]
    for module, t in sorted(by_module.items(), key=lambda kv: -kv[1]):
        if t / total >= 0.01:
            lines.append(f"  {module:<28} {100 * t / total:5.1f}%  {1e6 * t / n:6.2f} us/msg")
    lines.append(f"top {top} functions by own time (us per message, calls per message):")
    for tottime, ncalls, name in sorted(rows, reverse=True)[:top]:
        lines.append(f"  {1e6 * tottime / n:6.2f} us  {ncalls / n:5.2f}x  {name}")
    return "\n".join(lines)


def _module_of(path: str) -> str:
    if path == "~":
        return "builtins (C)"
    p = Path(path)
    parts = p.parts
    for marker in ("trio_websocket", "wsproto", "trio", "prometheus_client", "msgspec",
                   "flows", "sources", "h11"):
        if marker in parts:
            return marker if marker != "flows" else f"flows/{p.stem}"
    if "bench" in parts:
        return "bench"
    return p.stem


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000,
                        help="messages per throughput run (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="best of (default %(default)s)")
    parser.add_argument("--symbols", type=int, default=100, help="(default %(default)s)")
    parser.add_argument("--lag-seconds", type=float, default=5.0,
                        help="seconds per lag run (default %(default)s)")
    parser.add_argument("--lag-repeat", type=int, default=3,
                        help="runs per lag variant; the median is shown (default %(default)s)")
    parser.add_argument("--lag-rate", type=float, default=None,
                        help="messages/s for the lag runs (default: 50%% of flows' rate)")
    parser.add_argument("--profile", action="store_true", help="add a cProfile breakdown")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.port, args.symbols)
        return 0
    os.environ["BENCH_SYMBOLS"] = str(args.symbols)
    n, repeat = args.messages, args.repeat
    process, port = start_server(args.symbols)
    try:
        frames = payloads(args.symbols, FRAMES)
        print(f"{n:,} messages per run, {args.symbols} symbols, ~{len(frames[0])} B each, "
              f"best of {repeat}; server pid {process.pid} on port {port}\n")
        rows: list[tuple[str, Span, str]] = []

        def row(name: str, span: Span, note: str = "") -> None:
            rows.append((name, span, note))
            print(f"  {name:<34} {span.rate:>10,.0f} msgs/s  ({100 * span.cpu / span.wall:3.0f}% "
                  f"cpu){'  ' + note if note else ''}", flush=True)

        flows_span = online(port, n, repeat, flow_client())
        row("flows (BinanceStream->Change->null)", flows_span)
        before_span = online(port, n, repeat, flow_client(TrioWebsocketBinanceStream))
        row("same flow over trio-websocket", before_span, "baseline")
        probe = BinanceStream(symbols=["X"], channel="trade")
        row("msgspec decode (no I/O)", offline(call_each(probe._decode, frames), repeat), "ceiling")
        row("BinanceStream.parse (no I/O)", offline(call_each(probe.parse, frames), repeat), "ceiling")
        row("wsproto only (no I/O)", offline(wsproto_loop(frames), repeat), "ceiling")
        row("flows._wsclient receive_messages", online(port, n, repeat, flows_client_bare),
            "transport")
        row("flows._wsclient + decode", online(port, n, repeat, partial(flows_client_bare, decode=True)),
            "transport")
        row("trio-websocket get_message", online(port, n, repeat, trio_websocket_client),
            "transport")
        row("trio-websocket + decode", online(port, n, repeat, partial(trio_websocket_client, decode=True)),
            "transport")

        lag_rate = args.lag_rate or flows_span.rate / 2
        before_rate = before_span.rate / 2
        print(f"\nlag runs ({args.lag_seconds:.0f} s each)", flush=True)
        variants: list[tuple[str, float, type[BinanceStream], dict[str, Any]]] = [
            (f"flows at {lag_rate:,.0f}/s, batch_window 5 ms (default)", lag_rate,
             BinanceStream, {}),
            (f"flows at {lag_rate:,.0f}/s, batch_window 50 ms", lag_rate, BinanceStream,
             {"batch_window": 0.05}),
            (f"trio-websocket baseline at {before_rate:,.0f}/s, batch_window 5 ms",
             before_rate, TrioWebsocketBinanceStream, {}),
        ]
        lags = []
        for name, rate, cls, options in variants:
            runs = [lag_run(port, rate, args.lag_seconds, cls, **options)
                    for _ in range(args.lag_repeat)]
            runs.sort(key=lambda r: r["p99"])
            median = runs[len(runs) // 2]
            median["p99_low"], median["p99_high"] = runs[0]["p99"], runs[-1]["p99"]
            lags.append((name, median))
            each = ", ".join(f"{1000 * r['p99']:.1f}" for r in runs)
            print(f"  {name}: p99 {1000 * median['p99']:.1f} ms (runs: {each} ms)", flush=True)
        profile = profile_flow(port, min(n, 100_000)) if args.profile else ""
    finally:
        process.terminate()
        process.wait(timeout=10)

    print("\n| variant | msgs/s | cpu | msgs/cpu-s | vs baseline | vs target |")
    print("|---|---:|---:|---:|---:|---|")
    for name, span, note in rows:
        verdict = ""
        if name.startswith("flows ("):
            verdict = "PASS" if span.rate >= TARGET else "FAIL"
        print(f"| {name}{' (' + note + ')' if note else ''} | {span.rate:,.0f} | "
              f"{100 * span.cpu / span.wall:.0f}% | {span.cpu_rate:,.0f} | "
              f"{span.rate / before_span.rate:.2f}x | {verdict} |")
    print(f"\ntarget: flows >= {TARGET:,} msgs/s on one core: "
          f"{'PASS' if flows_span.rate >= TARGET else 'FAIL'} ({flows_span.rate:,.0f})")
    print(f"\n| lag, server paced at 50% of the sustained rate (median of {args.lag_repeat} runs "
          "by p99) | received msgs/s | cpu | records | p50 | p99 (range) | max | "
          "source lag p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in lags:
        low, high = r["p99_low"], r["p99_high"]
        print(f"| {name} | {r['rate']:,.0f} | {100 * r['cpu']:.0f}% | {r['records']:,.0f} | "
              f"{1000 * r['p50']:.1f} ms | {1000 * r['p99']:.1f} ms ({1000 * low:.1f}-"
              f"{1000 * high:.1f}) | {1000 * r['max']:.1f} ms | "
              f"{1000 * r['source_p99']:.1f} ms |")
    if profile:
        print("\n" + profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
