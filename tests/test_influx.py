"""sinks.influx against a real InfluxDB 1.x: round trips with escaping, rejected
records, retries while the server is down; line-protocol encoding; the 2.x API
and HTTP status handling against a mock transport."""

from __future__ import annotations

import functools
import itertools
import logging
import math
from decimal import Decimal
from operator import itemgetter

import httpx
import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from flows import Flow, FlowFailed, Retry, Runtime, Supervision, Tick
from flows.testing import (
    ListSource,
    assert_component_metrics,
    deadline,
    run_briefly,
    sample,
)
from flows.testing.influx import (
    InfluxServer,
    create_database,
    free_port,
    influxd_path,
    query,
)
from sinks import influx as influx_module
from sinks.influx import (
    InfluxConfigError,
    InfluxSink,
    InfluxWriteError,
    LineProtocolError,
    timestamp,
)

needs_influxd = pytest.mark.skipif(
    influxd_path() is None, reason="influxd (InfluxDB 1.x) is not installed: apt-get install influxdb"
)
_db_names = (f"db{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def server():
    if influxd_path() is None:
        pytest.skip("influxd (InfluxDB 1.x) is not installed: apt-get install influxdb")
    with InfluxServer() as s:
        yield s


@pytest.fixture
def db(server) -> str:
    name = next(_db_names)
    create_database(server.url, name)
    return name


def points(url: str, db: str, measurement: str = "ticks", epoch: str = "ns") -> list[dict]:
    """Every point of ``measurement``, as dicts, in time order."""
    name = measurement.replace("\\", "\\\\").replace('"', '\\"')
    body = query(url, f'SELECT * FROM "{name}"', db=db, epoch=epoch)
    series = body["results"][0].get("series", [])
    return [dict(zip(s["columns"], row)) for s in series for row in s["values"]]


def as_point(t: Tick, precision: str = "ns") -> dict:
    """What InfluxDB should hold for ``t``, read back with ``epoch=precision``."""
    return {"time": timestamp(t.ts, precision), "source": t.source, "symbol": t.symbol,
            "price": t.price, "bid": t.bid, "ask": t.ask, "volume": t.volume}


# Values that need escaping, and backslashes where InfluxDB 1.x can store them.
AWKWARD_SYMBOLS = ["BTC USD", "A,B", "X=Y", "a, b=c d", "a\\b", "a\\,b", "back\\ slash", "é/€", "'q\"uote'"]
AWKWARD_SOURCES = ["my exchange", "plain"]


def awkward_ticks() -> list[Tick]:
    out = []
    for i, (symbol, source) in enumerate(itertools.product(AWKWARD_SYMBOLS, AWKWARD_SOURCES)):
        out.append(Tick(source, symbol, 100.0 + i / 3, 1_700_000_000.125 + i * 1.001,
                        bid=99.5 + i if i % 2 else None, ask=0.1 + i if i % 3 else None,
                        volume=1e-7 * i if i % 4 else None))
    return out


# -- against a real InfluxDB 1.x --------------------------------------------


@needs_influxd
async def test_ticks_read_back_equal_including_escaped_names_and_moves_metrics(server, db):
    data = awkward_ticks()
    sink = InfluxSink(server.url, database=db, measurement="my ticks,v1", batch_size=7)
    flow = Flow("inf", sources=[ListSource([data[i:i + 5] for i in range(0, len(data), 5)])], sinks=[sink])
    result, registry = await run_briefly(flow)
    assert result.clean
    got = points(server.url, db, "my ticks,v1")
    assert got == sorted((as_point(t) for t in data), key=itemgetter("time"))
    assert {p["symbol"] for p in got} == set(AWKWARD_SYMBOLS)
    assert {p["source"] for p in got} == set(AWKWARD_SOURCES)
    assert got[0]["time"] == 1_700_000_000_125_000_000  # no float noise in the nanoseconds
    assert sample(registry, "flows_sink_batch_records_sum", "inf", "influx") == len(data)
    assert sample(registry, "flows_sink_write_seconds_count", "inf", "influx") == 2  # 10 + 8
    assert sample(registry, "flows_records_discarded_total", "inf", "influx", reason="rejected") == 0
    assert_component_metrics(registry, "inf", "influx", "sink")


@needs_influxd
@pytest.mark.parametrize("precision, epoch", [("s", "s"), ("ms", "ms"), ("us", "u"), ("ns", "ns")])
async def test_each_precision_stores_the_rounded_timestamp(server, db, precision, epoch):
    data = [Tick("p", f"S{i}", 1.5 + i, 1_700_000_000.123456789 + i * 2.25) for i in range(4)]
    sink = InfluxSink(server.url, database=db, precision=precision)
    result, _ = await run_briefly(Flow("prec", sources=[ListSource([data])], sinks=[sink]))
    assert result.clean
    got = points(server.url, db, epoch=epoch)
    assert [p["time"] for p in got] == [timestamp(t.ts, precision) for t in data]
    scale = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[precision]
    for p, t in zip(got, data):
        assert abs(p["time"] / scale - t.ts) <= 0.5 / scale + 1e-6


@needs_influxd
async def test_refused_records_are_dropped_alone_and_logged_with_the_servers_message(server, db, caplog):
    good = [Tick("x", f"S{i}", 10.0 + i, 1_700_000_000.0 + i) for i in range(12)]
    bad_type = Tick("x", "BAD", 1.0, 1_700_000_100.0)  # its price goes out as a string
    no_fields = Tick("x", "EMPTY", float("nan"), 1_700_000_101.0)
    trailing_backslash = Tick("x", "ends\\", 1.0, 1_700_000_102.0)
    sink = InfluxSink(
        server.url, database=db, batch_size=5,
        fields={"price": lambda t: "oops" if t.symbol == "BAD" else t.price, "bid": "bid"},
    )
    # the first write makes price a float field; the second holds the bad ones
    batches = [good[:5], [bad_type, *good[5:8], no_fields, trailing_backslash, *good[8:]]]
    with caplog.at_level(logging.WARNING, logger="flows.sink.influx"):
        result, registry = await run_briefly(Flow("rej", sources=[ListSource(batches)], sinks=[sink]))
    assert result.clean
    got = points(server.url, db)
    assert [p["symbol"] for p in got] == [t.symbol for t in good]
    assert [p["price"] for p in got] == [t.price for t in good]
    assert sample(registry, "flows_records_discarded_total", "rej", "influx", reason="rejected") == 3
    assert sample(registry, "flows_errors_total", "rej", "influx", error_type="InfluxWriteError") >= 1
    assert sample(registry, "flows_errors_total", "rej", "influx", error_type="LineProtocolError") >= 1
    assert sample(registry, "flows_sink_retries_total", "rej", "influx") == 0
    assert "field type conflict" in caplog.text  # InfluxDB's own words


def listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/ping", timeout=0.5)
    except httpx.HTTPError:
        return False
    return True


@needs_influxd
async def test_writes_retry_while_the_server_is_down_and_nothing_is_lost(tmp_path):
    port = free_port()
    data_dir = tmp_path / "influx"
    with InfluxServer(port=port, data_dir=data_dir) as first:  # make the database, then go away
        create_database(first.url, "market")
    data = [Tick("r", f"S{i % 5}", 1.0 + i, 1_700_000_000.0 + i) for i in range(60)]
    sink = InfluxSink(f"http://127.0.0.1:{port}", database="market", batch_size=20, flush_interval=0.05,
                      retry=Retry(backoff=0.02, max_backoff=0.1), timeout=2.0)
    flow = Flow("down", sources=[ListSource([data[i:i + 10] for i in range(0, 60, 10)])], sinks=[sink])
    registry = CollectorRegistry()
    runtime = Runtime(flow, registry=registry, metrics_addr=None)
    server = InfluxServer(port=port, data_dir=data_dir)  # the same server, back again
    outcome = []
    try:
        async with trio.open_nursery() as nursery:

            async def go():
                outcome.append(await runtime.run())

            nursery.start_soon(go)
            with trio.fail_after(10):
                while sample(registry, "flows_sink_retries_total", "down", "influx") < 3:
                    await trio.sleep(0.01)
            assert not listening(port)
            await trio.to_thread.run_sync(server.start)
        stored = points(server.url, "market")
    finally:
        server.stop()
    result, = outcome
    assert result.clean
    # columns no tick filled (bid, ask, volume) do not exist in this measurement
    assert [{k: v for k, v in p.items() if v is not None} for p in stored] == [
        {k: v for k, v in as_point(t).items() if v is not None} for t in data
    ]
    assert sample(registry, "flows_errors_total", "down", "influx", error_type="ConnectError") >= 3
    assert sample(registry, "flows_records_discarded_total", "down", "influx", reason="write_failed") == 0
    assert sample(registry, "flows_records_discarded_total", "down", "influx", reason="rejected") == 0


@needs_influxd
async def test_a_missing_database_fails_the_sink_at_open_with_the_servers_message(server):
    sink = InfluxSink(server.url, database="no_such_db")
    flow = Flow("nodb", sources=[ListSource([[Tick("x", "S", 1.0, 1.0)]])], sinks=[sink],
                supervision=Supervision(max_restarts=1, backoff=0.0))
    with pytest.raises(FlowFailed, match="database not found"):
        await run_briefly(flow)
    assert sink._client is None  # the client opened for the check was closed


# -- line protocol encoding (no server) -------------------------------------


class Rec(msgspec.Struct):
    s: object = "v"
    t: object = None
    f: object = 1.5
    g: object = None
    ts: object = 1.0


def line(record=None, **options) -> str:
    options.setdefault("measurement", "m")
    options.setdefault("tags", ("s", "t"))
    options.setdefault("fields", ("f", "g"))
    options.setdefault("precision", "s")
    return InfluxSink("http://127.0.0.1:1", **options).encode(record or Rec())


@pytest.mark.parametrize("measurement, expected", [
    ("m", "m"),
    ("my ticks", "my\\ ticks"),
    ("a,b", "a\\,b"),
    ("a=b", "a=b"),  # '=' needs no escape in a measurement
    ('q"t', 'q"t'),
])
def test_measurement_escaping(measurement, expected):
    assert line(measurement=measurement) == f"{expected},s=v f=1.5 1"


@pytest.mark.parametrize("value, expected", [
    ("plain", "plain"),
    ("BTC USD", "BTC\\ USD"),
    ("a,b", "a\\,b"),
    ("x=y", "x\\=y"),
    ("a, b=c", "a\\,\\ b\\=c"),
    ("a\\b", "a\\b"),  # backslashes go as they are
    ("a\\,b", "a\\\\,b"),
    ('"quoted"', '"quoted"'),
    ("é€", "é€"),
    (42, "42"),
])
def test_tag_value_escaping(value, expected):
    assert line(Rec(s=value)) == f"m,s={expected} f=1.5 1"


@pytest.mark.parametrize("value, expected", [
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("ends\\", '"ends\\\\"'),
    ("a, b=c", '"a, b=c"'),
    ("", '""'),
    ("two\nlines", '"two\nlines"'),
])
def test_string_field_escaping(value, expected):
    assert line(Rec(f=value)) == f"m,s=v f={expected} 1"


@pytest.mark.parametrize("value, expected", [
    (1.5, "1.5"),
    (0.1, "0.1"),
    (1 / 3, "0.3333333333333333"),
    (64210.123456789, "64210.123456789"),
    (1e16, "1e+16"),
    (1.5e-07, "1.5e-07"),
    (-0.0, "-0.0"),
    (2, "2.0"),  # ints go as floats: a field keeps one type
    (10**20, "1e+20"),
    (True, "true"),
    (False, "false"),
    (Decimal("1.25"), "1.25"),
])
def test_field_values(value, expected):
    assert line(Rec(f=value)) == f"m,s=v f={expected} 1"
    if isinstance(value, float):
        assert float(expected) == value  # full precision


def test_keys_are_escaped_and_tags_sorted_and_empty_tags_left_out():
    sink = InfluxSink("http://127.0.0.1:1", measurement="m", precision="s",
                      tags={"z key": "s", "a,k": "t", "m=k": lambda r: ""},
                      fields={"f i=e,ld": "f"})
    assert sink.encode(Rec(t="T")) == "m,a\\,k=T,z\\ key=v f\\ i\\=e\\,ld=1.5 1"
    assert sink.encode(Rec(t=None)) == "m,z\\ key=v f\\ i\\=e\\,ld=1.5 1"


def test_dict_records_and_functions_in_the_mapping():
    sink = InfluxSink("http://127.0.0.1:1", measurement="trades", precision="ms",
                      tags={"pair": itemgetter("pair"), "venue": lambda r: r["venue"].upper()},
                      fields={"qty": itemgetter("qty"), "side": itemgetter("side")},
                      time=itemgetter("t"))
    record = {"pair": "ETH/USD", "venue": "kraken", "qty": 0.25, "side": "buy", "t": 1_700_000_000.5}
    assert sink.encode(record) == 'trades,pair=ETH/USD,venue=KRAKEN qty=0.25,side="buy" 1700000000500'


def test_non_string_tag_values_are_not_confused_by_the_cache():
    sink = InfluxSink("http://127.0.0.1:1", measurement="m", tags=("s",), fields=("f",), precision="s")
    values = ("1", 1, True, 1.0, ["u"], "1")
    assert [sink.encode(Rec(s=v)) for v in values] == [
        "m,s=1 f=1.5 1", "m,s=1 f=1.5 1", "m,s=True f=1.5 1", "m,s=1.0 f=1.5 1", "m,s=['u'] f=1.5 1",
        "m,s=1 f=1.5 1",
    ]


def test_none_nan_and_infinite_fields_are_omitted():
    assert line(Rec(f=None, g=2.5)) == "m,s=v g=2.5 1"
    assert line(Rec(f=math.nan, g=2.5)) == "m,s=v g=2.5 1"
    assert line(Rec(f=1.5, g=math.inf)) == "m,s=v f=1.5 1"
    with pytest.raises(LineProtocolError, match="no field"):
        line(Rec(f=math.nan, g=-math.inf))
    with pytest.raises(LineProtocolError, match="no field"):
        line(Rec(f=None, g=None))
    tick = Tick("src", "SYM", 5.0, 1_700_000_000.5, ask=5.5)
    assert InfluxSink("http://h:1").encode(tick) == (
        "ticks,source=src,symbol=SYM price=5.0,ask=5.5 1700000000500000000"
    )


@pytest.mark.parametrize("record, match", [
    (Rec(s="ends\\"), "backslash"),
    (Rec(s="two\nlines"), "line break"),
    (Rec(f=object()), "field 'f'"),
    (Rec(f=[1]), "field 'f'"),
    (Rec(ts=math.nan), "not finite"),
    (Rec(ts=1e12), "outside"),
    (Rec(ts=1e300), "outside"),
    (Rec(ts=-1e10), "outside"),
])
def test_records_that_cannot_be_written_raise(record, match):
    with pytest.raises(LineProtocolError, match=match):
        line(record)


@pytest.mark.parametrize("ts, precision, expected", [
    (1_700_000_000.123456, "ns", 1_700_000_000_123_456_000),
    (1_700_000_000.1234567, "ns", 1_700_000_000_123_456_700),
    (1_700_000_000.000001, "ns", 1_700_000_000_000_001_000),
    (1_700_000_000.123456, "us", 1_700_000_000_123_456),
    (1_700_000_000.1234565, "us", 1_700_000_000_123_456),
    (1_700_000_000.125, "ms", 1_700_000_000_125),
    (1_700_000_000.0005, "ms", 1_700_000_000_000),  # ties to even
    (1_700_000_000.0015, "ms", 1_700_000_000_002),
    (1_700_000_000.5, "s", 1_700_000_000),
    (1_700_000_001.5, "s", 1_700_000_002),
    (1_700_000_000, "ns", 1_700_000_000_000_000_000),
    (0.1, "ns", 100_000_000),
    (-1.25, "ms", -1250),
])
def test_timestamp_conversion(ts, precision, expected):
    assert timestamp(ts, precision) == expected
    assert isinstance(timestamp(ts, precision), int)


def test_timestamps_of_distinct_floats_stay_distinct():
    base = 1_700_000_000.123456
    neighbours = [base]
    for _ in range(20):
        neighbours.append(math.nextafter(neighbours[-1], math.inf))
    stamps = [timestamp(x, "ns") for x in neighbours]
    assert stamps == sorted(set(stamps))


@given(st.lists(st.sampled_from([1_700_000_000, 1_700_000_000.0, 1_700_000_000.1234567,
                                  1_700_000_000.000001, -1.25, 0.1, 1e-12]), max_size=30),
       st.sampled_from(["ns", "us", "ms", "s"]))
def test_a_batch_encodes_like_its_records_one_by_one(times, precision):
    """encode_batch converts a timestamp once per run of equal times: the
    lines must still equal each record's own."""
    sink = InfluxSink("http://h:1", precision=precision)
    ticks = [Tick("s", f"S{i % 3}", 1.0 + i, ts) for i, ts in enumerate(times)]
    expected = "\n".join(sink.encode(t) for t in ticks).encode()
    assert sink.encode_batch(ticks) == expected
    assert all(line.endswith(f" {timestamp(t.ts, precision)}")
               for line, t in zip(expected.decode().split("\n"), ticks) if ticks)


@pytest.mark.parametrize("options, match", [
    ({"url": "ftp://h"}, "http"),
    ({"database": "a", "bucket": "b", "org": "o"}, "not both"),
    ({"bucket": "b"}, "needs org"),
    ({"org": "o"}, "goes with bucket"),
    ({"precision": "n"}, "precision"),
    ({"measurement": ""}, "non-empty"),
    ({"measurement": "#m"}, "comment"),
    ({"measurement": "a\\b"}, "backslash"),
    ({"tags": ("time",)}, "reserved"),
    ({"tags": "symbol"}, "sequence"),
    ({"tags": ("s", "s")}, "twice"),
    ({"fields": ()}, "at least one"),
    ({"fields": {"p": 3}}, "attribute name or a function"),
    ({"tags": ("price",), "fields": ("price",)}, "both a tag and a field"),
    ({"batch_size": 0}, "batch_size"),
])
def test_rejects_bad_configuration(options, match):
    url = options.pop("url", "http://127.0.0.1:8086")
    with pytest.raises(ValueError, match=match):
        InfluxSink(url, **options)


# -- HTTP handling against a mock transport ---------------------------------


@pytest.fixture
def mock_http(monkeypatch):
    """Route the sink's client to ``handler``; returns the list of requests seen."""
    seen: list[httpx.Request] = []
    answers: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if not request.content:  # the check at open
            return httpx.Response(204)
        answer = answers.pop(0) if answers else httpx.Response(204)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(influx_module.httpx, "AsyncClient",
                        functools.partial(httpx.AsyncClient, transport=httpx.MockTransport(handler)))
    return seen, answers


async def test_v2_writes_go_to_api_v2_with_a_token(mock_http):
    seen, _ = mock_http
    sink = InfluxSink("http://influx.example:8086/prefix/", bucket="mkt", org="me", token="s3cret",
                      precision="ms")
    tick = Tick("s", "A B", 1.5, 1_700_000_000.25)
    result, _ = await run_briefly(Flow("v2", sources=[ListSource([[tick]])], sinks=[sink]))
    assert result.clean
    probe, write = seen
    assert write.url.path == "/prefix/api/v2/write"
    assert dict(write.url.params) == {"org": "me", "bucket": "mkt", "precision": "ms"}
    assert write.headers["Authorization"] == "Token s3cret"
    assert write.headers["Content-Type"].startswith("text/plain")
    assert write.content == b"ticks,source=s,symbol=A\\ B price=1.5 1700000000250"
    assert probe.url.path == "/prefix/api/v2/write" and probe.content == b""


@pytest.mark.parametrize("options, params", [
    ({"database": "x", "precision": "us"}, {"db": "x", "precision": "u"}),  # 1.x reads "us" as ns
    ({"database": "x"}, {"db": "x", "precision": "n"}),
    ({"precision": "s"}, {"precision": "s"}),  # QuestDB, VictoriaMetrics
])
async def test_v1_writes_use_v1_precision_names(mock_http, options, params):
    seen, _ = mock_http
    sink = InfluxSink("http://h:8086", **options)
    await run_briefly(Flow("v1", sources=[ListSource([[Tick("s", "S", 1.0, 2.0)]])], sinks=[sink]))
    assert seen[-1].url.path == "/write"
    assert dict(seen[-1].url.params) == params
    assert "Authorization" not in seen[-1].headers


async def test_5xx_429_and_network_errors_are_retried(mock_http):
    seen, answers = mock_http
    answers.extend([
        httpx.Response(503, json={"error": "shutting down"}),
        httpx.Response(429, text="slow down"),
        httpx.Response(500, json={"error": "timeout"}),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    ])
    sink = InfluxSink("http://h:8086", database="x", retry=Retry(backoff=0.001, max_backoff=0.002))
    data = [Tick("s", f"S{i}", 1.0, 2.0 + i) for i in range(3)]
    result, registry = await run_briefly(Flow("tr", sources=[ListSource([data])], sinks=[sink]))
    assert result.clean
    assert sample(registry, "flows_sink_retries_total", "tr", "influx") == 5
    assert sample(registry, "flows_errors_total", "tr", "influx", error_type="InfluxWriteError") == 3
    assert sample(registry, "flows_errors_total", "tr", "influx", error_type="ConnectError") == 1
    assert sample(registry, "flows_errors_total", "tr", "influx", error_type="ReadTimeout") == 1
    assert sample(registry, "flows_records_discarded_total", "tr", "influx", reason="rejected") == 0
    assert len([r for r in seen if r.content]) == 6


async def test_a_finite_retry_policy_gives_up_and_counts_write_failed(mock_http):
    _, answers = mock_http
    answers.extend([httpx.Response(502)] * 3)
    sink = InfluxSink("http://h:8086", database="x", retry=Retry(attempts=3, backoff=0.001))
    data = [Tick("s", "S", 1.0, 2.0), Tick("s", "S", 1.0, 3.0)]
    result, registry = await run_briefly(Flow("gu", sources=[ListSource([data])], sinks=[sink]))
    assert result.clean
    assert sample(registry, "flows_records_discarded_total", "gu", "influx", reason="write_failed") == 2


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_refused_credentials_fail_at_open(monkeypatch, status):
    def handler(request):
        return httpx.Response(status, json={"code": "unauthorized", "message": "bad token"})

    monkeypatch.setattr(influx_module.httpx, "AsyncClient",
                        functools.partial(httpx.AsyncClient, transport=httpx.MockTransport(handler)))
    sink = InfluxSink("http://h:8086", bucket="b", org="o", token="t")
    with pytest.raises(InfluxConfigError, match=f"HTTP {status}: bad token"):
        await sink.open()
    assert sink._client is None


def test_write_errors_say_whether_they_are_transient():
    sink = InfluxSink("http://h:8086", database="x")
    assert sink.is_transient(InfluxWriteError(500, "x"))
    assert sink.is_transient(InfluxWriteError(503, "x"))
    assert sink.is_transient(InfluxWriteError(429, "x"))
    assert sink.is_transient(InfluxWriteError(408, "x"))
    assert not sink.is_transient(InfluxWriteError(400, "partial write: field type conflict"))
    assert not sink.is_transient(InfluxWriteError(404, "database not found"))
    assert not sink.is_transient(InfluxWriteError(413, "too large"))
    assert sink.is_transient(httpx.ConnectError("x"))
    assert sink.is_transient(httpx.WriteTimeout("x"))
    assert sink.is_transient(httpx.RemoteProtocolError("x"))
    assert not sink.is_transient(LineProtocolError("x"))
    assert str(InfluxWriteError(400, "bad")) == "HTTP 400: bad"


@needs_influxd
async def test_a_tag_too_long_for_influxdb_is_rejected_alone(server, db):
    """Fault 3: one record InfluxDB refuses (a series key past 64 KiB) among
    good ones: the good ones are stored, the bad one counted rejected."""
    good = [Tick("x", f"S{i}", 10.0 + i, 1_700_000_000.0 + i) for i in range(20)]
    huge = Tick("x", "Y" * 70_000, 1.0, 1_700_000_050.0)
    sink = InfluxSink(server.url, database=db, batch_size=100)
    flow = Flow("long", sources=[ListSource([good[:10], [huge], good[10:]])], sinks=[sink])
    with trio.fail_after(20):
        result, registry = await run_briefly(flow)
    assert result.clean
    assert [p["symbol"] for p in points(server.url, db)] == [t.symbol for t in good]
    assert sample(registry, "flows_records_discarded_total", "long", "influx", reason="rejected") == 1
    assert sample(registry, "flows_sink_retries_total", "long", "influx") == 0


class GatedSource:
    """Source: sends its first batch, waits for ``gate``, sends the rest."""

    name = "gated"

    def __init__(self, batches: list[list[Tick]]) -> None:
        self.batches = batches
        self.gate = trio.Event()

    async def run(self, outbox) -> None:
        from flows import Batch

        for i, records in enumerate(self.batches):
            if i == 1:
                await self.gate.wait()
            await outbox.send(Batch(records))


ADMIN = ("admin", "admin-password")


@pytest.fixture(scope="module")
def guarded():
    if influxd_path() is None:
        pytest.skip("influxd (InfluxDB 1.x) is not installed: apt-get install influxdb")
    with InfluxServer(admin=ADMIN) as s:
        create_database(s.url, "guarded", auth=ADMIN)
        yield s


@needs_influxd
@pytest.mark.parametrize("when", ["at open", "mid-run"])
async def test_refused_credentials_fail_the_sink_instead_of_dropping_records(guarded, when):
    """Fault 3: with authentication on, a wrong password (or one changed while
    the flow runs) fails the sink with InfluxDB's message, not retried for ever
    nor every record counted as rejected."""
    user = f"writer_{when.replace(' ', '_').replace('-', '_')}"
    query(guarded.url, f"CREATE USER \"{user}\" WITH PASSWORD 'pw-1'", method="POST", auth=ADMIN)
    query(guarded.url, f'GRANT WRITE ON "guarded" TO "{user}"', method="POST", auth=ADMIN)
    password = "pw-wrong" if when == "at open" else "pw-1"
    url = guarded.url.replace("http://", f"http://{user}:{password}@")
    data = [Tick("x", f"S{i}", 10.0 + i, 1_700_000_000.0 + i) for i in range(10)]
    source = GatedSource([data[:5], data[5:]])
    sink = InfluxSink(url, database="guarded", batch_size=5, retry=Retry(backoff=0.01))
    flow = Flow("auth", sources=[source], sinks=[sink],
                supervision=Supervision(max_restarts=1, backoff=0.0))
    registry = CollectorRegistry()

    async def change_password_after_the_first_write() -> None:
        if when == "mid-run":
            with deadline(20, "the first write"):
                while not sample(registry, "flows_sink_batch_records_sum", "auth", "influx"):
                    await trio.sleep(0.01)
            await trio.to_thread.run_sync(functools.partial(
                query, guarded.url, f"SET PASSWORD FOR \"{user}\" = 'pw-2'", method="POST",
                auth=ADMIN))
        source.gate.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(change_password_after_the_first_write)
            with pytest.raises(FlowFailed) as failed:
                await Runtime(flow, registry=registry, metrics_addr=None).run()
    assert "HTTP 401" in str(failed.value) and "authorization failed" in str(failed.value)
    assert sample(registry, "flows_records_discarded_total", "auth", "influx", reason="rejected") == 0
    assert sample(registry, "flows_sink_retries_total", "auth", "influx") == 0
    if when == "mid-run":
        assert sample(registry, "flows_sink_batch_records_sum", "auth", "influx") == 5
        assert sample(registry, "flows_records_discarded_total", "auth", "influx",
                      reason="write_failed") == 5
