"""HttpSource behaviour that mutation testing found unpinned (issue 20),
against a scripted server on 127.0.0.1: answers by status class, what is
retried and what is not, Retry-After, response size, one-shot sync with
resume and progress, secrets in headers, parameter checks, the parse
helpers."""

from __future__ import annotations

import itertools
import json
import logging
import math
import uuid
from functools import partial

import pytest
import trio
import trio.testing
from _http_sources import OK, Probe, http, run_until, serve_answers
from prometheus_client import CollectorRegistry

from flows import (
    CircuitBreaker,
    Edge,
    Flow,
    RateBudget,
    RateLimit,
    Request,
    Retry,
    RunContext,
    Runtime,
    parse_optional_float,
    parse_price,
    redact,
)
from flows.testing import GatedSink, ListSink, sample


async def scripted(nursery, script: list[tuple], then=OK) -> tuple[str, list[tuple[float, str]]]:
    """A server answering ``script`` in turn, then ``then``; returns its URL
    and the (trio time, path) of every request."""
    asked: list[tuple[float, str]] = []

    def answer(head: bytes):
        asked.append((trio.current_time(), head.split(b" ", 2)[1].decode()))
        return script.pop(0) if script else then

    return await serve_answers(nursery, answer, lambda head: None), asked


class PerSymbol(Probe):
    """One request per symbol: ``/t?s=SYMBOL``."""

    def plan(self, symbols):
        return [Request("t", "/t", {"s": s}, symbols=(s,)) for s in symbols]


def value(registry, name: str, **labels: str) -> float:
    return sample(registry, name, "core", "probe", **labels)


async def one_shot(source, registry=None):
    sink = ListSink()
    registry = registry or CollectorRegistry()
    rt = Runtime(Flow("core", sources=[source], sinks=[sink]), registry=registry, metrics_addr=None)
    with trio.fail_after(600):
        result = await rt.run()
    return result, registry, sink


# -- answers, retries, pauses ---------------------------------------------------------


async def test_a_5xx_is_retried_and_a_4xx_is_not(nursery, autojump_clock):
    url, asked = await scripted(nursery, [http(503), http(404)])
    source = Probe(base_url=url, once=True, retry=Retry(attempts=4, backoff=0.5, max_backoff=0.5))
    _, registry, sink = await one_shot(source)
    assert len(asked) == 2  # the 404 ended it
    assert sink.records == []
    assert value(registry, "flows_source_responses_total", status_class="5xx") == 1
    assert value(registry, "flows_source_responses_total", status_class="4xx") == 1
    assert value(registry, "flows_source_retries_total") == 1
    assert value(registry, "flows_errors_total", error_type="http") == 1
    assert value(registry, "flows_errors_total", error_type="http_permanent") == 1
    assert value(registry, "flows_records_discarded_total", reason="request_failed") == 1
    assert asked[1][0] - asked[0][0] <= 0.5 + 0.01  # a jittered backoff within its cap


async def test_retries_stop_after_the_configured_count(nursery, autojump_clock):
    url, asked = await scripted(nursery, [http(500)] * 10)
    source = PerSymbol(base_url=url, symbols=["A", "B"], once=True,
                       retry=Retry(attempts=3, backoff=0.1), concurrency=1)
    _, registry, _sink = await one_shot(source)
    assert len(asked) == 6  # 3 attempts, 2 symbols
    assert value(registry, "flows_source_retries_total") == 4
    assert value(registry, "flows_records_discarded_total", reason="request_failed") == 2
    assert value(registry, "flows_source_request_seconds_count", endpoint="t") == 6
    assert value(registry, "flows_source_rate_limit_wait_seconds_count") == 6


async def test_no_retries_means_one_attempt(nursery, autojump_clock):
    url, asked = await scripted(nursery, [http(500)])
    source = Probe(base_url=url, once=True, retry=Retry(attempts=1))
    _, registry, sink = await one_shot(source)
    assert len(asked) == 1 and sink.records == []
    assert value(registry, "flows_source_retries_total") == 0


async def test_a_retry_after_pauses_the_source(nursery, autojump_clock):
    url, asked = await scripted(nursery, [http(418, retry_after=4)])
    source = Probe(base_url=url, once=True, retry=Retry(attempts=2, backoff=0.01))
    _, registry, sink = await one_shot(source)
    assert len(sink.records) == 1
    assert asked[1][0] - asked[0][0] >= 4.0
    assert value(registry, "flows_source_responses_total", status_class="429") == 1
    assert source.circuit.state == "closed"


async def test_a_bad_retry_after_is_ignored(nursery, autojump_clock):
    bad = (429, b"application/json", b"{}", [(b"retry-after", b"soon")])
    url, asked = await scripted(nursery, [bad])
    source = Probe(base_url=url, once=True, retry=Retry(attempts=2, backoff=0.01))
    await one_shot(source)
    assert asked[1][0] - asked[0][0] < 0.1  # no pause: only the backoff


async def test_a_negative_retry_after_means_now(nursery, autojump_clock):
    url, asked = await scripted(nursery, [http(429, retry_after=-5)])
    source = Probe(base_url=url, once=True, retry=Retry(attempts=2, backoff=0.01))
    _, _, sink = await one_shot(source)
    assert len(sink.records) == 1 and asked[1][0] - asked[0][0] < 0.1


async def test_a_429_without_retry_after_pauses_a_window_where_the_api_says_so(
    nursery, autojump_clock
):
    class Windowed(Probe):
        PAUSE_WITHOUT_RETRY_AFTER = True

    url, asked = await scripted(nursery, [http(429)])
    source = Windowed(base_url=url, once=True, retry=Retry(attempts=2, backoff=0.01),
                      limits=[RateLimit(1000, 1.0), RateLimit(5000, 7.0)])
    await one_shot(source)
    assert asked[1][0] - asked[0][0] >= 7.0  # the longest window


# cutting a body short leaves httpx's and httpcore's chained body generators to
# the garbage collector (trio warns); closing the outer one does not close them
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_body_over_the_size_cap_is_refused(nursery, autojump_clock):
    big = (200, b"application/json", b"x" * 100)
    url, asked = await scripted(nursery, [big, big], then=big)
    source = Probe(base_url=url, once=True, retry=Retry(attempts=2, backoff=0.01),
                   max_response_bytes=99)
    _, registry, sink = await one_shot(source)
    assert len(asked) == 2 and sink.records == []
    assert value(registry, "flows_errors_total", error_type="http") == 2
    source = Probe(base_url=url, once=True, retry=Retry(attempts=1), max_response_bytes=100)
    _, _, sink = await one_shot(source)
    assert len(sink.records) == 1  # exactly the cap is fine


async def test_a_connection_error_is_counted_as_error_and_retried(autojump_clock):
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = Probe(base_url=f"http://127.0.0.1:{port}", once=True,
                   retry=Retry(attempts=2, backoff=0.01), circuit=CircuitBreaker(failures=2))
    _, registry, sink = await one_shot(source)
    assert sink.records == []
    assert value(registry, "flows_source_responses_total", status_class="error") == 2
    assert value(registry, "flows_source_retries_total") == 1
    assert source.circuit.state == "open"


async def test_poll_cycles_are_counted_and_spaced_by_every(nursery, autojump_clock):
    url, asked = await scripted(nursery, [])
    source = Probe(base_url=url, every=2.0)
    registry = CollectorRegistry()
    rt = Runtime(Flow("core", sources=[source], sinks=[ListSink()]), registry=registry,
                 metrics_addr=None)
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        with trio.fail_after(100):
            while source.cycles < 3:
                await trio.sleep(0.1)
        rt.stop()
    times = [t for t, _ in asked[:3]]
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx([2.0, 2.0], abs=0.05)
    assert value(registry, "flows_source_poll_cycle_seconds_count") >= 3


# -- one-shot sync --------------------------------------------------------------------


async def test_a_one_shot_sync_resumes_where_it_stopped(nursery, tmp_path):  # real clock: threads
    resume = tmp_path / "done.json"
    failing = {"B"}

    def answer(head: bytes):
        symbol = head.split(b" ", 2)[1].decode().partition("s=")[2]
        asked.append(symbol)
        return http(404) if symbol in failing else OK

    asked: list[str] = []
    url = await serve_answers(nursery, answer, lambda head: None)
    first = PerSymbol(base_url=url, symbols=["A", "B", "C"], once=True, resume=resume,
                      retry=Retry(attempts=1), concurrency=1)
    await one_shot(first)
    assert sorted(asked) == ["A", "B", "C"]
    assert sorted(__import__("json").loads(resume.read_text())) == ["A", "C"]
    asked.clear()
    failing.clear()
    again = PerSymbol(base_url=url, symbols=["A", "B", "C"], once=True, resume=resume,
                      retry=Retry(attempts=1), concurrency=1)
    _, _, sink = await one_shot(again)
    assert asked == ["B"]  # only what was not done
    assert [t.symbol for t in sink.records] == ["B"]
    assert not resume.exists()  # complete: the resume file goes


async def test_a_stopped_one_shot_sync_still_saves_what_it_finished(nursery, tmp_path):
    resume = tmp_path / "done.json"
    hang = trio.Event()  # never set: B's answer never comes
    answered = trio.Event()

    async def handler(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        if b"s=B" in data:
            answered.set()
            await hang.wait()
        body = b"{}"
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                              b"connection: close\r\ncontent-length: 2\r\n\r\n" + body)
        await stream.aclose()

    from functools import partial

    (listener,) = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
    source = PerSymbol(base_url=url, symbols=["A", "B"], once=True, resume=resume, concurrency=1)
    rt = Runtime(Flow("core", sources=[source], sinks=[ListSink()]),
                 registry=CollectorRegistry(), metrics_addr=None)
    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            await inner.start(rt.run)
            await answered.wait()  # A is done, B hangs
            rt.stop()
    assert __import__("json").loads(resume.read_text()) == ["A"]  # saved though cancelled


async def test_the_resume_file_names_only_symbols_a_sink_stored(nursery, tmp_path):
    """A sync stopped by force (or killed) while its sink had not stored
    what it fetched must fetch those symbols again when resumed."""
    resume = tmp_path / "done.json"
    url, asked = await scripted(nursery, [])
    source = PerSymbol(base_url=url, symbols=["A", "B", "C", "D", "E", "F"], once=True,
                       resume=resume, concurrency=1)
    sink = GatedSink()  # a database that does not answer: nothing stored, nothing acked
    rt = Runtime(Flow("core", sources=[source], sinks=[sink]), registry=CollectorRegistry(),
                 metrics_addr=None, drain_timeout=0.5)
    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            await inner.start(rt.run)
            while len(asked) < 3:
                await trio.sleep(0.01)
            rt.stop()
    assert not resume.exists() or json.loads(resume.read_text()) == []
    sink.gate.set()


async def test_acks_after_a_drain_stop_reach_the_resume_file(nursery, tmp_path):
    """Stopped while its send waits on a full edge, the sync's records
    already on the edge are stored during the drain: the resume file must
    name them (the cut send acks failed, so the last ack writes the file)."""
    resume = tmp_path / "done.json"
    answered: dict[str, trio.Event] = {"A": trio.Event(), "B": trio.Event()}

    async def handler(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                              b"connection: close\r\ncontent-length: 2\r\n\r\n{}")
        await stream.aclose()
        answered[data.split(b"s=", 1)[1][:1].decode()].set()

    (listener,) = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
    source = PerSymbol(base_url=url, symbols=["A", "B", "C"], once=True, resume=resume,
                       concurrency=1)
    sink = GatedSink()  # takes nothing yet: A waits on the edge, B's send blocks
    flow = Flow("core")
    flow.source(source).to(sink, edge=Edge(capacity=1))
    rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)
    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            await inner.start(rt.run)
            await answered["B"].wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # B's send is blocked
            rt.stop()  # drain: the source stops, A still goes to the sink
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            sink.gate.set()
    assert [t.symbol for t in sink.records] == ["A"]
    assert json.loads(resume.read_text()) == ["A"]


async def test_a_broken_resume_file_starts_over(nursery, tmp_path):  # real clock: threads
    resume = tmp_path / "done.json"
    resume.write_text("{not json")
    url, asked = await scripted(nursery, [])
    source = PerSymbol(base_url=url, symbols=["A", "B"], once=True, resume=resume)
    _, _, _sink = await one_shot(source)
    assert len(asked) == 2 and not resume.exists()


async def test_progress_is_logged_when_not_on_a_terminal(nursery, autojump_clock, caplog):
    url, _ = await scripted(nursery, [])
    source = PerSymbol(base_url=url, symbols=["A", "B", "C", "D"], once=True, progress=False,
                       concurrency=1)
    with caplog.at_level(logging.INFO, logger="flows.http"):
        await one_shot(source)
    lines = [r.getMessage() for r in caplog.records if "symbols (" in r.getMessage()]
    assert lines and lines[-1].startswith("source probe: 4/4 symbols (100.0%), ")
    assert lines[-1].endswith(" symbols/s, ETA 0s")
    assert not any(line.startswith("source probe: 1/4") for line in lines)  # not every symbol


async def test_progress_is_a_bar_when_asked_for(nursery, autojump_clock, capsys, caplog):
    url, _ = await scripted(nursery, [])
    source = PerSymbol(base_url=url, symbols=["A", "B", "C"], once=True, progress=True)
    with caplog.at_level(logging.INFO, logger="flows.http"):
        await one_shot(source)
    shown = capsys.readouterr().err  # flows.Progress: the bar goes to standard error
    assert "source probe" in shown and "100%" in shown
    assert not any("3/3 symbols (" in r.getMessage() for r in caplog.records)  # a bar, not lines


# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"symbols": []}, {"every": 0.0}, {"concurrency": 0}, {"reprobe_every": 0.0},
])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        Probe(**options)


def test_defaults():
    source = Probe()
    assert (source.every, source.concurrency, source.reprobe_every) == (1.0, 8, 600.0)
    assert (source.once, source.resume, source.standby_for) == (False, None, None)


async def test_requests_carry_the_user_agent_and_the_configured_headers(nursery, autojump_clock):
    heads: list[bytes] = []
    url = await serve_answers(nursery, lambda head: OK, heads.append)
    await one_shot(Probe(base_url=url, once=True, headers={"X-Extra": "yes"}))
    (head,) = heads
    assert b"user-agent: flows/0.1\r\n" in head.lower() and b": flows/0.1\r\n" in head
    assert b"x-extra: yes\r\n" in head.lower()


async def test_a_tick_the_screen_refuses_is_logged_with_why(nursery, autojump_clock, caplog):
    class Stale(Probe):
        def parse(self, request, body):
            from flows import Parsed, Tick

            return Parsed(ticks=[Tick(self.name, "A", 1.0, 12.0)])  # 1970: not a time we take

    url, _ = await scripted(nursery, [])
    with caplog.at_level(logging.WARNING):
        _, registry, sink = await one_shot(Stale(base_url=url, once=True))
    assert sink.records == []
    assert value(registry, "flows_records_discarded_total", reason="invalid") == 1
    (line,) = [r.getMessage() for r in caplog.records if "dropped record (invalid)" in r.getMessage()]
    assert len(line) > len("dropped record (invalid): ") + 5  # says why


def test_good_edge_options_are_accepted():
    source = Probe(every=0.001, concurrency=1, reprobe_every=0.001,
                   base_url="http://127.0.0.1:1/api/")
    assert source.base_url == "http://127.0.0.1:1/api"
    assert source.concurrency == 1


def test_credentials_in_headers_are_masked_and_other_headers_are_not():
    Probe(headers={"Authorization": "Bearer tok-aaaa-1111", "X-MBX-APIKEY": "key-bbbb-2222",
                   "Cookie": "sess-cccc-3333", "X-Session-Id": "sid-dddd-4444",
                   "Accept": "application/json-eeee"})
    shown = redact("tok-aaaa-1111 key-bbbb-2222 sess-cccc-3333 sid-dddd-4444 application/json-eeee")
    for secret in ("tok-aaaa-1111", "key-bbbb-2222", "sess-cccc-3333", "sid-dddd-4444"):
        assert secret not in shown
    assert "application/json-eeee" in shown


def test_health_names_a_standby_that_stands_in():
    primary = Probe()
    standby = Probe(standby_for=primary)
    assert standby.health() is None
    primary.circuit.state = "open"
    assert standby.health() == "degraded: probe stands in for probe"
    assert primary.health() == "source probe: circuit open"


def test_parse_price_takes_positive_finite_numbers_only():
    assert parse_price("1.5") == 1.5 and parse_price(2) == 2.0
    for bad in ("0", 0, -1, "-0.5", "NaN", "inf", math.inf):
        with pytest.raises(ValueError):
            parse_price(bad)
    with pytest.raises(ValueError):
        parse_price("abc")


def test_parse_optional_float():
    assert parse_optional_float(None) is None
    assert parse_optional_float("") is None
    assert parse_optional_float("nan") is None and parse_optional_float(math.inf) is None
    assert parse_optional_float("0") == 0.0 and parse_optional_float("-2.5") == -2.5
    with pytest.raises(ValueError):
        parse_optional_float("abc")




async def test_an_open_circuit_is_one_gap_from_when_it_first_opened(nursery, autojump_clock):
    # open after 2 failures, a failed probe 5 s later, a good one 5 s after that
    url, asked = await scripted(nursery, [http(500), http(500), http(500)])
    source = Probe(base_url=url, every=1.0, retry=Retry(attempts=1),
                   circuit=CircuitBreaker(failures=2, reset_after=5.0))
    gaps = ListSink(name="gap_sink")
    flow = Flow("core")
    flow.source(source).to(ListSink())
    flow.gaps().to(gaps)
    await run_until(flow, lambda: any(g.reason == "circuit_open" for g in gaps.records),
                    timeout=100)
    (gap,) = [g for g in gaps.records if g.reason == "circuit_open"]
    opened, closed = asked[1][0], asked[3][0]  # the second failure, the good probe
    assert gap.end - gap.start == pytest.approx(closed - opened, abs=0.2)
    assert gap.end - gap.start >= 9.8  # not from the failed probe


# -- survivors of the second mutation run (issue 20) -------------------------------------


async def test_an_error_body_that_is_not_utf8_is_still_an_http_error(nursery, autojump_clock):
    url, _ = await scripted(nursery, [(404, b"text/plain", b"\xff\xfe not utf-8 \xc3")])
    _, registry, sink = await one_shot(Probe(base_url=url, once=True, retry=Retry(attempts=1)))
    assert sink.records == []
    assert value(registry, "flows_errors_total", error_type="http_permanent") == 1
    assert value(registry, "flows_records_discarded_total", reason="request_failed") == 1


async def test_a_read_timeout_is_counted_as_error(nursery, autojump_clock):
    async def silent(stream):
        await trio.sleep_forever()

    (listener,) = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
    source = Probe(base_url=url, once=True, retry=Retry(attempts=1), read_timeout=5.0)
    _, registry, sink = await one_shot(source)
    assert sink.records == []
    assert value(registry, "flows_source_responses_total", status_class="error") == 1


async def test_a_sync_that_finishes_at_once_leaves_no_resume_file(nursery, tmp_path):
    resume = tmp_path / "done.json"  # real clock: threads
    url, _ = await scripted(nursery, [])
    source = PerSymbol(base_url=url, symbols=["A", "B"], once=True, resume=resume)
    result, _, sink = await one_shot(source)
    assert result.clean
    assert len(sink.records) == 2
    assert not resume.exists()


async def test_a_local_limiter_still_exports_the_budget_series(nursery, autojump_clock):
    url, _ = await scripted(nursery, [])
    _, registry, _ = await one_shot(Probe(base_url=url, once=True))
    assert value(registry, "flows_source_budget_wait_seconds_count") == 0


def test_a_rate_budget_given_to_the_source_is_kept_and_used():
    source = Probe(rate_budget="redis://127.0.0.1:1/0")
    assert isinstance(source.rate_budget, RateBudget)
    assert source.rate_budget.url == "redis://127.0.0.1:1/0"
    before = source.limiter
    source.setup(RunContext(flow="core"))
    assert source.limiter is not before  # the shared limiter on that budget
    assert source.limiter.declared == before.declared


def test_a_budget_from_the_run_is_used_when_the_source_has_none():
    source = Probe()
    before = source.limiter
    source.setup(RunContext(flow="core"))
    assert source.limiter is before
    source.setup(RunContext(flow="core", rate_budget="redis://127.0.0.1:1/0"))
    assert source.limiter is not before


def test_a_scheduled_source_is_stale_after_a_minute_at_least():
    assert Probe(schedule="adaptive", max_staleness=10.0).stale_after == 60.0
    assert Probe(schedule="adaptive", max_staleness=100.0).stale_after == 150.0


async def test_a_scheduled_source_polls(nursery, autojump_clock):
    url, _asked = await scripted(nursery, [])
    source = Probe(base_url=url, schedule="adaptive", max_staleness=5.0)
    sink = ListSink()
    await run_until(Flow("core", sources=[source], sinks=[sink]),
                    lambda: len(sink.records) >= 2, timeout=100)
    assert {r.symbol for r in sink.records} == {"A"}


@pytest.mark.parametrize("header", ["Authorization", "Proxy-Authorization"])
def test_an_authorization_header_is_learned_as_a_secret(header):
    token = f"tok-{uuid.uuid4().hex}"  # new each run: nothing learned it before
    Probe(headers={header: f"Bearer {token}"})
    assert token not in redact(f"later the token {token} shows up alone")


async def test_a_source_on_an_unreachable_budget_says_it_runs_on_its_share(nursery):
    with trio.socket.socket() as s:  # a port nobody listens on: Redis is away
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, _ = await scripted(nursery, [])  # real clock: Redis calls run in threads
    source = Probe(base_url=url, once=True, rate_budget=f"redis://127.0.0.1:{port}/0")
    _result, registry, sink = await one_shot(source)
    assert len(sink.records) == 1
    assert value(registry, "flows_source_budget_fallback") == 1


async def test_concurrency_above_the_http_clients_default_pool_is_honoured(nursery, autojump_clock):
    in_flight, peak = 0, 0

    async def slow(stream):  # holds every request a second, counting those held at once
        nonlocal in_flight, peak
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        in_flight += 1
        peak = max(peak, in_flight)
        await trio.sleep(1.0)
        in_flight -= 1
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                              b"connection: close\r\ncontent-length: 2\r\n\r\n{}")
        await stream.aclose()

    (listener,) = await nursery.start(partial(trio.serve_tcp, slow, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
    symbols = [f"S{i}" for i in range(110)]  # httpx allows 100 connections unless told
    _, _, sink = await one_shot(PerSymbol(base_url=url, symbols=symbols, once=True,
                                          concurrency=110))
    assert len(sink.records) == 110
    assert peak == 110
