"""The HTTP endpoints of a running flow: /metrics, /healthz, /readyz, /status."""

from __future__ import annotations

import gzip
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from flows import METRICS, ChangeDetector, Flow, Runtime
from flows._server import (
    BURST,
    CACHE_SECONDS,
    RATE,
    check_addr,
    is_loopback,
    make_app,
    parse_addr,
)
from flows.testing import GatedSink, ListSink, deadline
from sinks.sqlite import SQLiteSink
from sources.synthetic import SyntheticMarket, make_symbols

# series appear with an HTTP or stream source, or a slow operation
HTTP_ONLY = {
    "flows_source_request_seconds",
    "flows_source_responses_total",
    "flows_source_retries_total",
    "flows_source_rate_limit_wait_seconds",
    "flows_source_circuit_state",
    "flows_slow_batches_total",
    "flows_slow_poll_cycles_total",
    "flows_source_messages_total",
    "flows_source_reconnects_total",
    "flows_source_connection_uptime_seconds",
    "flows_source_gaps_total",
}


def demo_like_flow(tmp_path, sink=None) -> Flow:
    return Flow(
        "web",
        sources=[SyntheticMarket(symbols=50, interval=0.01, batch_size=20)],
        stages=[ChangeDetector(rel=0.0001)],
        sinks=[SQLiteSink(tmp_path / "t.db", flush_interval=0.05), sink or ListSink()],
    )


async def wait_for_records(rt: Runtime, stage: str, n: int) -> None:
    """Until ``stage`` (a storing sink) has written ``n`` records."""
    with deadline(30, "the sink's written records"):
        while True:
            actor = next(a for a in rt.status()["actors"] if a["name"] == stage)
            if actor.get("written", 0) >= n:
                return
            await trio.sleep(0.01)  # the flow runs on the real clock; this only yields


async def test_metrics_lists_every_documented_metric_and_passes_promtool(tmp_path, registry):
    rt = Runtime(demo_like_flow(tmp_path), registry=registry, metrics_addr="127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await wait_for_records(rt, "sqlite", 200)
        async with httpx.AsyncClient(base_url=rt.metrics_url) as client:
            response = await client.get("/metrics")
        rt.stop()
    assert response.status_code == 200
    text = response.text
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    for name in METRICS:
        base = name.removesuffix("_total")
        assert name in families or base in families, f"{name} missing from /metrics"
        if name in ("flows_errors_total", "flows_gaps_total") or name in HTTP_ONLY:
            continue  # series appear with the first error or gap / with an HTTP source
        assert re.search(rf"^{name}(_bucket|_count|_sum)?{{", text, re.MULTILINE), f"{name} has no series"
    # No symbol ever becomes a label value.
    symbols = set(make_symbols(50))
    values = set(re.findall(r'="([^"]*)"', text))
    assert not symbols & values
    assert set(re.findall(r'\bstage="([^"]*)"', text)) == {"synthetic", "change", "sqlite", "collect"}
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    check = await trio.run_process(
        ["promtool", "check", "metrics"], stdin=text.encode(), capture_stdout=True,
        capture_stderr=True, check=False,
    )
    assert check.returncode == 0, (check.stdout + check.stderr).decode()


async def test_health_readiness_and_status(tmp_path, registry):
    gated = GatedSink()
    rt = Runtime(demo_like_flow(tmp_path, gated), registry=registry, metrics_addr="127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        async with httpx.AsyncClient(base_url=rt.metrics_url) as client:
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json() == {"ready": True, "reasons": []}
            await wait_for_records(rt, "sqlite", 20)
            status = (await client.get("/status")).json()
            assert status["flow"] == "web" and status["state"] == "running"
            actors = {a["name"]: a for a in status["actors"]}
            assert [a["kind"] for a in status["actors"]] == ["source", "stage", "sink", "sink"]
            assert actors["change"]["received"] > 0
            assert actors["change"]["processing_seconds"]["p99"] > 0
            assert actors["sqlite"]["written"] > 0
            assert actors["gated"]["buffer"]["capacity"] == 8
            assert {(e["from"], e["to"]) for e in status["edges"]} == {
                ("synthetic", "change"), ("change", "sqlite"), ("change", "gated")
            }
            assert (await client.get("/nope")).status_code == 404
            rt.stop()
            draining = await client.get("/readyz")
            assert draining.status_code == 503
            assert draining.json()["reasons"][0] == "flow is draining"
            gated.gate.set()


async def test_port_in_use_is_a_clear_error(registry):
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flow = Flow("busy", sources=[SyntheticMarket(limit=1)], sinks=[ListSink()])
        rt = Runtime(flow, registry=registry, metrics_addr=f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await rt.run()


def test_runtime_defaults_are_the_servers():
    rt = Runtime(Flow("d", sources=[SyntheticMarket(limit=1)], sinks=[ListSink()]),
                 registry=CollectorRegistry())
    assert rt.endpoint_limits == {"cache": CACHE_SECONDS, "rate": RATE}
    assert (CACHE_SECONDS, RATE, BURST) == (0.5, 20.0, 20)  # as the README says


# -- under load: answers computed once per interval, requests paced ------------------


class Counting:
    """A collector whose value the test sets; counts how often it is collected."""

    def __init__(self) -> None:
        self.value = 0.0
        self.collected = 0

    def collect(self):
        self.collected += 1
        g = GaugeMetricFamily("test_value", "A value the test sets.")
        g.add_metric([], self.value)
        yield g
        yield GaugeMetricFamily("test_other", "Another family.", value=1.0)


class StubRuntime:
    """What the app reads from a Runtime, with call counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.counting = Counting()
        self.registry.register(self.counting)
        self.state = "running"
        self.readiness: tuple[bool, list[str]] = (True, [])
        self.status_calls = 0
        self.ready_calls = 0

    def status(self) -> dict:
        self.status_calls += 1
        return {"call": self.status_calls}

    def ready(self) -> tuple[bool, list[str]]:
        self.ready_calls += 1
        return self.readiness


async def call(app, target: str, headers: dict[str, str] | None = None,
               ) -> tuple[int, dict[bytes, bytes], bytes]:
    """One GET through the ASGI app, without a server: (status, headers, body)."""
    path, _, query = target.partition("?")
    scope = {"type": "http", "method": "GET", "path": path, "query_string": query.encode(),
             "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


async def test_concurrent_scrapes_collect_once_per_interval_then_refresh(mock_clock):
    rt = StubRuntime()
    app = make_app(rt, cache=1.0, rate=None)
    answers = []

    async def scrape(headers: dict[str, str]) -> None:
        answers.append((headers, await call(app, "/metrics", headers)))

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(scrape, {"accept-encoding": "gzip"} if i % 3 else {})
        nursery.start_soon(scrape, {"accept": "application/openmetrics-text; version=1.0.0"})
    assert rt.counting.collected == 1 and app.caches["metrics"].collections == 1
    plain = {body for h, (_, hd, body) in answers if not h}
    assert len(plain) == 1
    text = plain.pop()
    assert b"test_value 0.0" in text
    for h, (code, hd, body) in answers:
        assert code == 200
        if "accept-encoding" in h:
            assert hd[b"content-encoding"] == b"gzip" and gzip.decompress(body) == text
        elif "accept" in h:
            assert hd[b"content-type"].startswith(b"application/openmetrics-text")
            assert body.endswith(b"# EOF\n")
    # Within the interval: the same body, however the value moved.
    rt.counting.value = 5.0
    mock_clock.jump(0.999)
    assert (await call(app, "/metrics"))[2] == text
    assert rt.counting.collected == 1
    # After it: collected again, once.
    mock_clock.jump(0.001)
    for _ in range(3):
        assert b"test_value 5.0" in (await call(app, "/metrics"))[2]
    assert rt.counting.collected == 2


async def test_name_selection_comes_from_the_same_collection(mock_clock):
    rt = StubRuntime()
    app = make_app(rt, cache=1.0, rate=None)
    everything = (await call(app, "/metrics"))[2]
    code, _, selected = await call(app, "/metrics?name[]=test_other")
    assert code == 200 and b"test_other 1.0" in selected and b"test_value" not in selected
    assert b"test_value" in everything and rt.counting.collected == 1


async def test_status_is_computed_once_per_interval(mock_clock):
    rt = StubRuntime()
    app = make_app(rt, cache=0.5, rate=None)
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(call, app, "/status")
    assert rt.status_calls == 1
    mock_clock.jump(0.49)
    assert (await call(app, "/status"))[2] == b'{"call":1}'
    mock_clock.jump(0.01)
    assert (await call(app, "/status"))[2] == b'{"call":2}'


async def test_readiness_is_reused_briefly_but_follows_the_flow_state_at_once(mock_clock):
    rt = StubRuntime()
    app = make_app(rt, cache=0.5, rate=None)
    assert (await call(app, "/readyz"))[0] == 200
    rt.readiness = (False, ["sink db: writes failing for 12s"])
    assert (await call(app, "/readyz"))[0] == 200  # reused: at most 0.5 s old
    mock_clock.jump(0.5)
    code, _, body = await call(app, "/readyz")
    assert code == 503 and b"writes failing" in body
    rt.readiness = (True, [])
    rt.state = "draining"  # a state change is never hidden by the cache
    assert (await call(app, "/readyz"))[0] == 200 and rt.ready_calls == 3
    assert (await call(app, "/healthz"))[0] == 200


async def test_each_endpoint_answers_at_most_rate_per_second_in_arrival_order(autojump_clock):
    rt = StubRuntime()
    app = make_app(rt, cache=0.5, rate=10.0, burst=5)
    done: dict[str, list[tuple[int, float]]] = {"/status": [], "/healthz": [], "/nope": []}

    async def get(path: str, i: int) -> None:
        await call(app, path)
        done[path].append((i, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for i in range(25):
            nursery.start_soon(get, "/status", i)
            await trio.lowlevel.checkpoint()  # arrive in order
        nursery.start_soon(get, "/healthz", 0)
        nursery.start_soon(get, "/nope", 0)
    times = [t for _, t in done["/status"]]
    assert [i for i, _ in done["/status"]] == list(range(25))  # first come, first served
    assert times[:5] == [0.0] * 5  # the burst
    assert times[5:] == pytest.approx([0.1 * k for k in range(1, 21)])  # then 10 per second
    # Another endpoint is not held up by the queue on /status.
    assert done["/healthz"] == [(0, 0.0)] and done["/nope"] == [(0, 0.0)]


def test_bad_limits_are_refused_up_front():
    rt = StubRuntime()
    for kwargs in ({"cache": -1.0}, {"cache": float("nan")}, {"rate": 0.0},
                   {"rate": float("inf")}, {"burst": 0}):
        with pytest.raises(ValueError, match="endpoint"):
            make_app(rt, **kwargs)
    flow = Flow("limits", sources=[SyntheticMarket(limit=1)], sinks=[ListSink()])
    with pytest.raises(ValueError, match="endpoint rate"):
        Runtime(flow, registry=CollectorRegistry(), metrics_addr="127.0.0.1:0", endpoint_rate=-1)


async def test_a_storm_over_http_collects_the_registry_once(registry):
    counting = Counting()
    registry.register(counting)
    flow = Flow("storm", sources=[SyntheticMarket(symbols=5, interval=0.05)], sinks=[ListSink()])
    rt = Runtime(flow, registry=registry, metrics_addr="127.0.0.1:0", endpoint_cache=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        answers = []
        async with httpx.AsyncClient(base_url=rt.metrics_url) as client:

            async def scrape() -> None:
                answers.append(await client.get("/metrics"))

            async with trio.open_nursery() as scrapers:
                for _ in range(BURST):
                    scrapers.start_soon(scrape)
        rt.stop()
    assert [r.status_code for r in answers] == [200] * BURST
    assert len({r.text for r in answers}) == 1 and "flows_records_sent_total" in answers[0].text
    assert counting.collected == 1


# -- addresses: IPv6, and a warning off loopback --------------------------------------


def test_parse_addr_accepts_ipv6_in_brackets():
    assert parse_addr("[::1]:0") == ("::1", 0)
    assert parse_addr("[::]:9099") == ("::", 9099)
    assert parse_addr("0.0.0.0:1") == ("0.0.0.0", 1)
    assert parse_addr(":9099") == ("127.0.0.1", 9099) == parse_addr("9099")
    for bad, why in (("::1:9099", "brackets"), ("[::1:9099", "brackets"), ("[]:1", "empty"),
                     ("[::1]:x", "not a number"), ("[::1]:70000", "out of range")):
        with pytest.raises(ValueError, match=why):
            parse_addr(bad)


def test_is_loopback():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org", "fe80::1"):
        assert not is_loopback(host), host


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_serves_on_ipv6_loopback(registry, caplog):
    flow = Flow("six", sources=[SyntheticMarket(symbols=5, interval=0.05)], sinks=[ListSink()])
    rt = Runtime(flow, registry=registry, metrics_addr="[::1]:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        assert re.fullmatch(r"http://\[::1\]:\d+", rt.metrics_url)
        async with httpx.AsyncClient(base_url=rt.metrics_url) as client:
            assert (await client.get("/healthz")).status_code == 200
            assert "flows_records_sent_total" in (await client.get("/metrics")).text
        port = int(rt.metrics_url.rsplit(":", 1)[1])
        with pytest.raises(OSError, match=rf"cannot serve metrics on \[::1\]:{port}: "):
            await check_addr(f"[::1]:{port}")
        rt.stop()
    assert "no authentication" not in caplog.text


async def test_a_non_loopback_address_warns_that_there_is_no_authentication(registry, caplog):
    caplog.set_level(logging.WARNING, logger="flows.server")
    for addr, warned in (("127.0.0.1:0", False), ("0.0.0.0:0", True)):
        caplog.clear()
        flow = Flow("open", sources=[SyntheticMarket(symbols=5, interval=0.05)],
                    sinks=[ListSink()])
        rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=addr)
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            rt.stop()
        warnings = [r for r in caplog.records if "no authentication" in r.getMessage()]
        assert len(warnings) == warned, (addr, caplog.text)
        if warned:
            assert warnings[0].levelno == logging.WARNING and warnings[0].name == "flows.server"
            assert rt.metrics_url in warnings[0].getMessage()


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_the_emulator_warns_that_its_control_api_has_no_authentication(host, warned):
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.testing.emulator", "--host", host, "--port", "0",
         "--assets", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = process.stdout.readline().strip()
        assert url.startswith(f"http://{host}:")
        if warned:  # logged right after the URL is printed
            line = process.stderr.readline()
            assert line.startswith("WARNING") and "no authentication" in line, line
            assert "/_emulator" in line and url in line
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in err
    if not warned:
        assert "no authentication" not in err
