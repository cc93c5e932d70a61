"""Checks every HTTP source's tests share, against the exchange emulator."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from flows import Flow, HttpSource, Parsed, RateLimit, Request, Runtime, Tick
from flows.testing import ListSink, deadline, sample


async def check_bad_bodies_are_dropped_and_polling_goes_on(
    emulator, source, exchange: str, endpoint: str
) -> None:
    """With 40% malformed and 30% truncated answers (one request a cycle, for
    all of ``source.symbols``): every broken answer is counted, every good one
    used, and the source recovers fully once the faults stop."""
    n = len(source.symbols)
    emulator.set_faults(exchange=exchange, malformed_rate=0.4, truncated_rate=0.3)
    sink = ListSink()
    registry = CollectorRegistry()
    name = source.name
    rt = Runtime(Flow("mal", sources=[source], sinks=[sink]), registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with deadline(300, "12 poll cycles"):
            while source.cycles < 12:
                await trio.sleep(0.5)
        faults = emulator.stats[exchange][endpoint]["faults"]
        broken = faults.get("malformed", 0) + faults.get("truncated", 0)
        assert broken >= 3
        assert sample(registry, "flows_records_discarded_total", "mal", name,
                      reason="request_failed") == n * broken
        assert sample(registry, "flows_errors_total", "mal", name, error_type="http") == broken
        assert len(sink.records) == n * (source.cycles - broken)  # the good answers were used
        emulator.clear_faults()
        before, cycles = len(sink.records), source.cycles
        with deadline(300, "2 poll cycles after the faults stopped"):
            while source.cycles < cycles + 2:
                await trio.sleep(0.5)
        assert len(sink.records) >= before + n  # recovered
        assert rt.ready()[0]
        rt.stop()


async def serve_answers(nursery, answer: Callable[[bytes], tuple[Any, ...]],
                 on_request: Callable[[bytes], object]) -> str:
    """A bare HTTP/1.1 server on 127.0.0.1: reads each request's head, gives
    it to ``on_request``, sends ``answer(head)`` (status, content type, body,
    optionally a list of extra (name, value) headers, all bytes but the
    status; None: no answer, the request hangs) and closes. Returns its URL."""

    async def handler(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        on_request(data)
        reply = answer(data)
        if reply is None:
            await trio.sleep_forever()
        status, kind, body, *extra = reply
        head = b"".join(b"%s: %s\r\n" % kv for kv in (extra[0] if extra else ()))
        await stream.send_all(b"HTTP/1.1 %d X\r\ncontent-type: %s\r\nconnection: close\r\n%s"
                              b"content-length: %d\r\n\r\n%s" % (status, kind, head, len(body), body))
        await stream.aclose()

    (listener,) = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listener.socket.getsockname()[1]}"


async def scripted_http_server(nursery, answers: list[tuple[int, bytes]], then: bytes,
                               on_request: Callable[[bytes], object]) -> str:
    """A bare HTTP server on 127.0.0.1 answering with ``answers`` (status,
    JSON body) in turn, then ``(200, then)``; ``on_request`` gets each
    request's head. Returns its URL."""

    def answer(head: bytes) -> tuple[int, bytes, bytes]:
        status, body = answers.pop(0) if answers else (200, then)
        return status, b"application/json", body

    return await serve_answers(nursery, answer, on_request)


async def routed_http_server(nursery, routes: dict[str, list[tuple[int, bytes]]],
                             on_request: Callable[[bytes], object] = lambda head: None) -> str:
    """A bare HTTP server on 127.0.0.1 answering a GET of each path in
    ``routes`` with its (status, body) answers in turn, the last one repeated
    (an HTML 404 for other paths); ``on_request`` gets each request's head.
    Returns its URL."""
    answers = {path: list(script) for path, script in routes.items()}

    def answer(head: bytes) -> tuple[int, bytes, bytes]:
        path = head.split(b" ", 2)[1].decode()
        script = answers.get(path, [(404, b"<html><body><h1>404 Not Found</h1></body></html>")])
        status, body = script.pop(0) if len(script) > 1 else script[0]
        return status, b"text/html" if body.startswith(b"<") else b"application/json", body

    return await serve_answers(nursery, answer, on_request)


async def run_until(flow: Flow, done, registry: CollectorRegistry | None = None,
                    timeout: float = 600.0, **options) -> Runtime:
    """Run ``flow`` until ``done()`` holds (checked every 0.5 s, for at most
    ``timeout`` s of trio's clock), then stop it; ``options`` go to the Runtime."""
    rt = Runtime(flow, registry=registry or CollectorRegistry(), metrics_addr=None, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with trio.fail_after(timeout):
            while not done():
                await trio.sleep(0.5)
        rt.stop()
    return rt


OK = (200, b"application/json", b"{}")


class Probe(HttpSource):
    """One request a cycle for every symbol; any 2xx body is one Tick each."""

    DEFAULT_LIMITS = (RateLimit(1000, 1.0),)

    def __init__(self, **options) -> None:
        options.setdefault("symbols", ["A"])
        super().__init__(name="probe", **options)

    def plan(self, symbols: list[str]) -> list[Request]:
        return [Request("t", "/t", symbols=tuple(symbols))]

    def parse(self, request: Request, body: bytes) -> Parsed:
        return Parsed(ticks=[Tick(self.name, s, 1.0, time.time()) for s in request.symbols])


def http(status: int, retry_after: int | None = None) -> tuple:
    headers = [(b"retry-after", str(retry_after).encode())] if retry_after is not None else []
    return (status, b"application/json", b'{"error": "x"}', headers)
