"""The HTTP source base (flows.HttpSource) against a scripted server: how
each kind of answer moves the circuit breaker, the pause and the counters."""

from __future__ import annotations

import time

import msgspec
import pytest
import trio
import trio.testing
from _http_sources import OK, Probe, http, run_until, serve_answers
from prometheus_client import CollectorRegistry

from flows import (
    CircuitBreaker,
    Flow,
    HttpSource,
    Parsed,
    Request,
    Retry,
    Runtime,
    Tick,
)
from flows.testing import ListSink, run_briefly, sample
from flows.testing.emulator import Emulator


async def scripted(nursery, script: list[tuple], then=OK) -> tuple[str, list[float]]:
    """A server answering ``script`` in turn, then ``then``; also returns the
    list of trio times at which requests arrived."""
    times: list[float] = []

    def answer(head: bytes):
        times.append(trio.current_time())
        return script.pop(0) if script else then

    return await serve_answers(nursery, answer, lambda head: None), times


async def test_a_half_open_probe_answered_429_settles_the_breaker(nursery, autojump_clock):
    url, times = await scripted(nursery, [http(500), http(500), http(429, retry_after=3)])
    source = Probe(base_url=url, every=1.0, retry=Retry(attempts=1),
                   circuit=CircuitBreaker(failures=2, reset_after=5.0))
    sink, registry = ListSink(), CollectorRegistry()
    rt = Runtime(Flow("ho", sources=[source], sinks=[sink]), registry=registry, metrics_addr=None)
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        with trio.fail_after(60):
            while source.circuit.state != "open":
                await trio.sleep(0.1)
            assert "source probe: circuit open" in rt.ready()[1]
            while len(times) < 3:  # the probe, answered 429 Retry-After: 3
                await trio.sleep(0.1)
            await trio.sleep(0.1)
            assert source.circuit.state == "closed"  # the API answered: settled
            while not sink.records:
                await trio.sleep(0.1)
        assert times[3] - times[2] >= 3  # the pause was kept
        assert sample(registry, "flows_source_circuit_state", "ho", "probe") == 0
        assert rt.ready()[0]
        rt.stop()


async def test_half_open_shows_in_health_and_the_state_gauge(nursery, autojump_clock):
    gate = trio.Event()
    url, _times = await scripted(nursery, [http(500), http(500)])
    source = Probe(base_url=url, every=1.0, retry=Retry(attempts=1), read_timeout=1000.0,
                   circuit=CircuitBreaker(failures=2, reset_after=5.0))
    registry = CollectorRegistry()
    rt = Runtime(Flow("hs", sources=[source], sinks=[ListSink()]), registry=registry,
                 metrics_addr=None)
    original = source._get

    async def slow_probe(*args):  # the probe hangs until the test has looked
        if source.circuit.state == "half_open":
            await gate.wait()
        return await original(*args)

    source._get = slow_probe
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        with trio.fail_after(60):
            while source.circuit.state != "half_open":
                await trio.sleep(0.1)
            await trio.testing.wait_all_tasks_blocked()
        assert "source probe: circuit half-open (probing)" in rt.ready()[1]
        assert sample(registry, "flows_source_circuit_state", "hs", "probe") == 1
        gate.set()
        with trio.fail_after(60):
            while source.circuit.state != "closed":
                await trio.sleep(0.1)
        rt.stop()


def test_a_cancelled_probe_lets_the_next_one_through():
    async def main():
        breaker = CircuitBreaker(failures=1, reset_after=1.0)
        breaker.failure()
        await trio.sleep(1.0)
        assert breaker.allow() and breaker.state == "half_open"
        assert not breaker.allow()  # one probe at a time
        breaker.release()
        assert breaker.allow()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize(("failures", "script", "state"), [
    (3, [http(500), http(500), OK, http(500), http(500)], "closed"),  # a success resets the count
    (3, [http(500), http(500), http(500)], "open"),
    (2, [http(500), http(429, 1), http(500)], "open"),  # a 429 neither counts nor resets
])
async def test_failures_in_a_row_open_the_circuit(nursery, autojump_clock, failures, script, state):
    url, times = await scripted(nursery, list(script))
    source = Probe(base_url=url, every=1.0, retry=Retry(attempts=1),
                   circuit=CircuitBreaker(failures=failures, reset_after=1000.0))
    rt = Runtime(Flow("fr", sources=[source], sinks=[ListSink()]), registry=CollectorRegistry(),
                 metrics_addr=None)
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        with trio.fail_after(100):
            while len(times) < len(script) and source.circuit.state == "closed":
                await trio.sleep(0.1)
            await trio.sleep(0.5)
        assert source.circuit.state == state
        rt.stop()


class Multi(Probe):
    """Asks for its symbols in one request (``?s=A,B,...``); a 404 means a
    symbol of it is unknown (as Binance's -1121 does for a whole request)."""

    def plan(self, symbols):
        from flows import Request

        return [Request("t", "/t", {"s": ",".join(symbols)}, symbols=tuple(symbols))]

    def check(self, response, body):
        from flows import HttpError

        if response.status_code == 404:
            raise HttpError("HTTP 404: unknown symbol", transient=False, symbol_error=True)
        super().check(response, body)


async def test_an_unknown_symbol_is_isolated_parked_and_probed_again(nursery, autojump_clock):
    asked: list[tuple[float, str]] = []
    bad = {"BAD"}

    def answer(head: bytes):
        query = head.split(b" ", 2)[1].decode().partition("s=")[2].replace("%2C", ",")
        asked.append((trio.current_time(), query))
        return http(404) if bad & set(query.split(",")) else OK

    from _http_sources import serve_answers as serve

    url = await serve(nursery, answer, lambda head: None)
    source = Multi(symbols=["A", "B", "BAD", "C"], base_url=url, every=1.0, reprobe_every=30.0,
                   circuit=CircuitBreaker(failures=1))
    sink, registry = ListSink(), CollectorRegistry()
    rt = Runtime(Flow("park", sources=[source], sinks=[sink]), registry=registry, metrics_addr=None)
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        with trio.fail_after(100):
            while len({t.symbol for t in sink.records}) < 3:
                await trio.sleep(0.1)
            first_cycle = [q for _, q in asked[:5]]
            # halves until BAD is alone: A,B,BAD,C -> A,B ok; BAD,C -> BAD (parked), C
            assert first_cycle == ["A,B,BAD,C", "A,B", "BAD,C", "BAD", "C"]
            assert source.parked.keys() == {"BAD"}
            assert source.circuit.state == "closed"  # failures=1: a 404 there would have opened it
            # a symbol that never answered is never stale (no valid record yet): the
            # parked gauge and /status say it is missing
            assert sample(registry, "flows_source_parked_symbols", "park", "probe") == 1
            (actor,) = [a for a in rt.status()["actors"] if a["name"] == "probe"]
            assert actor["parked"] == {"count": 1, "symbols": ["BAD"]}
            await trio.sleep(5)
            assert [q for _, q in asked[-3:]] == ["A,B,C"] * 3  # BAD is no longer asked for
            bad.clear()  # listed at last
            while "BAD" not in {t.symbol for t in sink.records}:
                await trio.sleep(0.5)
        probe = next(t for t, q in asked[5:] if q == "BAD")
        assert probe - asked[0][0] >= 30  # probed alone, after reprobe_every
        assert not source.parked
        assert sample(registry, "flows_source_parked_symbols", "park", "probe") == 0
        rt.stop()
    assert sample(registry, "flows_records_discarded_total", "park", "probe", reason="unknown_symbol") == 1
    assert sample(registry, "flows_records_discarded_total", "park", "probe", reason="request_failed") == 0


class _PostedCodes(HttpSource):
    """A bare subclass that POSTs its JSON arguments (LiveCoinWatch's /coins/map)."""

    def plan(self, symbols: list[str]) -> list[Request]:
        body = {"codes": symbols, "currency": "USD", "sort": "rank", "order": "ascending",
                "offset": 0, "limit": len(symbols), "meta": False}
        return [Request("coins/map", "/coins/map", symbols=tuple(symbols), method="POST",
                        json=body)]

    def parse(self, request: Request, body: bytes) -> Parsed:
        coins = msgspec.json.decode(body)
        return Parsed(ticks=[Tick(self.name, c["code"], c["rate"], time.time()) for c in coins])


async def test_a_request_can_be_a_post_of_a_json_body(nursery, autojump_clock):
    emulator = Emulator(seed=3, assets=40, tick_interval=0)
    url = await nursery.start(emulator.serve)
    codes = emulator.symbols("livecoinwatch")[:5]
    source = _PostedCodes(symbols=codes, base_url=url, once=True, name="posted",
                          headers={"x-api-key": "test-key"})
    sink = ListSink()
    await run_briefly(Flow("post", sources=[source], sinks=[sink]))
    served = emulator.last_served("livecoinwatch")
    assert sorted((t.symbol, t.price) for t in sink.records) == sorted(
        (code, float(served[code].price)) for code in codes)
    assert emulator.stats["livecoinwatch"]["coins/map"]["requests"] == 1


class Strict(Probe):
    """A Probe whose answers must be JSON (a malformed or HTML body fails)."""

    def parse(self, request: Request, body: bytes) -> Parsed:
        msgspec.json.decode(body)
        return super().parse(request, body)


HTML = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
# name -> (status, content type, body, headers); None: no answer at all (a hang)
ANSWERS = {
    "200": (200, b"application/json", b"{}", []),
    "400": (400, b"application/json", b'{"error": "bad"}', []),
    "401": (401, b"application/json", b'{"error": "key"}', []),
    "404 unknown symbol": (404, b"application/json", b'{"error": "no such symbol"}', []),
    "500": (500, b"application/json", b'{"error": "x"}', []),
    "502 html": (502, b"text/html", HTML, []),
    "429 retry-after": (429, b"application/json", b"{}", [(b"retry-after", b"3")]),
    "429": (429, b"application/json", b"{}", []),
    "418 retry-after": (418, b"application/json", b"{}", [(b"retry-after", b"3")]),
    "418": (418, b"application/json", b"{}", []),
    "hang": None,
    "200 malformed": (200, b"application/json", b'{"trunc', []),
    "200 html": (200, b"text/html", HTML, []),
}
# name -> (state after it when closed, when half-open, seconds to the next
# request when closed, when half-open, error type counted or None).
# failures=1, reset_after=5, every=1, reprobe_every=2: a failure opens the
# circuit (the next request is the probe, 5 s on); a Retry-After of 3 s
# pauses; a 429/418 without one counts as a failure; an unknown symbol is
# parked (the next request is its probe, 2 s on) and settles the breaker.
# After a half-open probe the cycle it held up is overdue: the next goes at
# once unless something pauses it.
EXPECTED = {
    "200": ("closed", "closed", 1.0, 0.0, None),
    "400": ("open", "open", 5.0, 5.0, "http_permanent"),
    "401": ("open", "open", 5.0, 5.0, "http_permanent"),
    "404 unknown symbol": ("closed", "closed", 2.0, 2.0, "http_permanent"),
    "500": ("open", "open", 5.0, 5.0, "http"),
    "502 html": ("open", "open", 5.0, 5.0, "http"),
    "429 retry-after": ("closed", "closed", 3.0, 3.0, "http"),
    "429": ("open", "open", 5.0, 5.0, "http"),
    "418 retry-after": ("closed", "closed", 3.0, 3.0, "http"),
    "418": ("open", "open", 5.0, 5.0, "http"),
    "hang": ("open", "open", 6.0, 6.0, "http"),  # cut at read_timeout (1 s), then open
    "200 malformed": ("open", "open", 5.0, 5.0, "http"),
    "200 html": ("open", "open", 5.0, 5.0, "http"),
}


class SymbolAware(Strict):
    """404 means the symbol is unknown (as Coinbase's does)."""

    def check(self, response, body):
        from flows import HttpError

        if response.status_code == 404:
            raise HttpError("HTTP 404: unknown symbol", transient=False, symbol_error=True)
        super().check(response, body)


@pytest.mark.parametrize("breaker", ["closed", "half_open"])
@pytest.mark.parametrize("name", list(ANSWERS))
async def test_every_answer_in_every_breaker_state(nursery, autojump_clock, name, breaker):
    """The table: each kind of answer, to a request made while the circuit is
    closed or to the half-open probe: the next state, the pause before the
    next request, and the counters."""
    script = ([ANSWERS["500"]] if breaker == "half_open" else []) + [ANSWERS[name]]
    times: list[float] = []
    arrived: list[str] = []  # the breaker's state as each request arrived

    def on_request(head: bytes) -> None:
        times.append(trio.current_time())
        arrived.append(source.circuit.state)

    url = await serve_answers(nursery, lambda head: script.pop(0) if script else ANSWERS["200"],
                              on_request)
    source = SymbolAware(base_url=url, every=1.0, retry=Retry(attempts=1), read_timeout=1.0,
                         reprobe_every=2.0, circuit=CircuitBreaker(failures=1, reset_after=5.0))
    registry = CollectorRegistry()
    rt = Runtime(Flow("table", sources=[source], sinks=[ListSink()]), registry=registry,
                 metrics_addr=None)
    at = 1 if breaker == "half_open" else 0  # the index of the request answered ``name``
    after, then, wait_closed, wait_half_open, error = EXPECTED[name]
    settled = 1.5 if name == "hang" else 0.5  # the answer handled (a hang: read_timeout 1 s)
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        with trio.fail_after(60):
            while len(times) < at + 1:
                await trio.sleep(0.01)
            await trio.sleep_until(times[at] + settled)
            state = source.circuit.state
            while len(times) < at + 2:  # the next request
                await trio.sleep(0.01)
        rt.stop()
    assert arrived[at] == breaker
    assert state == (after if breaker == "closed" else then)
    wait = wait_closed if breaker == "closed" else wait_half_open
    assert times[at + 1] - times[at] == pytest.approx(wait, abs=0.05)
    errors = {k: v for k, v in ((t, sample(registry, "flows_errors_total", "table", "probe",
                                            error_type=t)) for t in ("http", "http_permanent"))
              if v}
    expected_errors = {error: 1} if error else {}
    if breaker == "half_open":  # the 500 that opened the circuit
        expected_errors["http"] = expected_errors.get("http", 0) + 1
    assert errors == expected_errors
    assert sample(registry, "flows_source_circuit_state", "table", "probe") in (0, 2)


class Acked(Probe):
    """Asks for its symbols in one request; notes the outcome of each
    answer's records (``Parsed.acks``). An answer for several symbols
    holds none of them (as CoinGecko's can), so they are asked again alone."""

    outcomes: list[tuple[tuple[str, ...], str]]

    def plan(self, symbols):
        return [Request("t", "/t", {"s": ",".join(symbols)}, symbols=tuple(symbols))]

    def parse(self, request, body):
        many = len(request.symbols) > 1
        out = Parsed(unknown=list(request.symbols) if many else [],
                     ticks=[] if many else super().parse(request, body).ticks)
        out.acks.append(lambda outcome: self.outcomes.append((request.symbols, outcome)))
        return out


async def test_the_acks_of_an_answer_go_with_its_records_or_fail_with_it(nursery, autojump_clock):
    url, _ = await scripted(nursery, [])
    source = Acked(symbols=["A", "B"], base_url=url, every=1.0)
    source.outcomes = []
    sink = ListSink()
    await run_until(Flow("acks", sources=[source], sinks=[sink]),
                    lambda: len(source.outcomes) >= 3)
    assert source.outcomes[:3] == [(("A", "B"), "failed"), (("A",), "written"),
                                   (("B",), "written")]
