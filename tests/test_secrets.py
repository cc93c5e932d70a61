"""Secrets (issue 17, fault 6): no password, token or API key of a component's
configuration shows in repr(), errors, logs (text and JSON, DEBUG), /status
or /metrics.

Every component that takes a URL, DSN, key or token is run with fake
secrets: against real servers where they are cheap (Redis with a password,
InfluxDB), a fake HTTP server that refuses every request and echoes the
credentials it got (as some APIs do in their error bodies), and closed
ports; then everything the flow showed is searched for the secrets.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import textwrap

import pytest
import redis
import trio
from _cli import ENV
from _http_sources import serve_answers
from prometheus_client import CollectorRegistry, generate_latest

from flows import Flow, Retry, Runtime, Supervision, add_secret, redact
from flows.testing import sample, wait_until
from flows.testing._ports import free_port
from flows.testing.influx import InfluxServer, create_database, influxd_path
from flows.testing.redis import RedisServer
from sinks.influx import InfluxSink
from sinks.postgres import PostgresSink
from sinks.redis import RedisStreamSink
from sources.binance import BinanceStream, BinanceTickers
from sources.coincap import CoinCapPrices
from sources.coingecko import CoinGeckoPrices
from sources.redis import RedisStreamSource
from sources.synthetic import SyntheticMarket

# Fake secrets, one per place a component takes one (none is a substring of another).
INFLUX_PW = "influx-pw-Zq81"
INFLUX_REFUSED_PW = "influx-refused-pw-Xc42"
INFLUX_TOKEN = "influx-token-Vb73"
PG_URL_PW = "pg-url-pw-Nm64"
PG_KV_PW = "pg-kv-pw-Lk95"
REDIS_PW = "redis-pw-Jh16"
REDIS_WRONG_PW = "redis-wrong-pw-Gf27"
COINCAP_KEY = "coincap-key-Ds38"
GECKO_KEY = "gecko-key-Sa49"
BINANCE_KEY = "binance-key-Po50"
WS_PW = "ws-pw-Iu61"
WS_KEY = "ws-listen-key-Yt72"
SECRETS = [INFLUX_PW, INFLUX_REFUSED_PW, INFLUX_TOKEN, PG_URL_PW, PG_KV_PW, REDIS_PW,
           REDIS_WRONG_PW, COINCAP_KEY, GECKO_KEY, BINANCE_KEY, WS_PW, WS_KEY]

FLOW = "sec"


def leaked(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


async def refusing_server(nursery) -> str:
    """An HTTP server that answers every request 401, its body echoing the
    request's credential headers (InfluxDB writes get InfluxDB's answer)."""

    def answer(head: bytes) -> tuple[int, bytes, bytes]:
        if b" /write" in head or b" /api/v2/write" in head:
            return 401, b"application/json", b'{"error":"authorization failed"}'
        lines = head.decode("latin-1").split("\r\n")[1:]
        echoed = [line for line in lines if line and not line.lower().startswith(
            ("host:", "accept", "connection:", "user-agent:", "content-length:"))]
        return 401, b"application/json", json.dumps({"error": f"refused: {echoed}"}).encode()

    return await serve_answers(nursery, answer, lambda head: None)


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, protocol=2)
        client.config_set("requirepass", REDIS_PW)
        client.close()
        yield server


@pytest.fixture(scope="module")
def influx_server():
    if influxd_path() is None:
        pytest.skip("influxd (InfluxDB 1.x) is not installed: apt-get install influxdb")
    with InfluxServer() as server:
        create_database(server.url, "sec")
        yield server


def closed_port() -> int:
    return free_port()  # nothing listens there


def components(fake: str, redis_port: int, influx_port: int | None) -> tuple[list, list]:
    """Every component that takes a URL, DSN, key or token, with fake secrets."""
    dead = closed_port()
    sources = [
        SyntheticMarket(symbols=5, interval=0.05),  # records for the sinks to write
        CoinCapPrices(symbols=["bitcoin"], api_key=COINCAP_KEY, base_url=fake, every=0.1),
        CoinGeckoPrices(symbols=["bitcoin"], api_key_env="FLOWS_TEST_GECKO_KEY", base_url=fake,
                        every=0.1),
        BinanceTickers(symbols=["BTCUSDT"], headers={"X-MBX-APIKEY": BINANCE_KEY},
                       base_url=fake, every=0.1),
        RedisStreamSource(f"redis://:{REDIS_WRONG_PW}@127.0.0.1:{redis_port}/0", stream="in",
                          group="g", name="redis_in"),
        BinanceStream(symbols=["BTCUSDT"], retry=Retry(backoff=0.05, max_backoff=0.1),
                      base_url=f"ws://feed:{WS_PW}@127.0.0.1:{dead}/ws?listenKey={WS_KEY}"),
    ]
    sinks = [
        InfluxSink(f"{fake.replace('http://', f'http://flows:{INFLUX_REFUSED_PW}@')}",
                   database="sec", token=INFLUX_TOKEN, name="influx_refused"),
        PostgresSink(f"postgresql://flows:{PG_URL_PW}@127.0.0.1:{dead}/market", name="pg_url",
                     connect_timeout=2),
        PostgresSink(f"host=127.0.0.1 port={dead} user=flows password={PG_KV_PW} dbname=market",
                     name="pg_kv", connect_timeout=2),
        RedisStreamSink(f"redis://:{REDIS_PW}@127.0.0.1:{redis_port}/0", stream="out",
                        name="redis_out"),
    ]
    if influx_port is not None:
        sinks.append(InfluxSink(f"http://flows:{INFLUX_PW}@127.0.0.1:{influx_port}",
                                database="sec", flush_interval=0.05, name="influx"))
    return sources, sinks


async def test_no_secret_shows_in_reprs_logs_status_or_metrics(
    nursery, redis_server, influx_server, monkeypatch, caplog
):
    monkeypatch.setenv("FLOWS_TEST_GECKO_KEY", GECKO_KEY)
    caplog.set_level(logging.DEBUG)
    fake = await refusing_server(nursery)
    sources, sinks = components(fake, redis_server.port, influx_server.port)
    registry = CollectorRegistry()
    rt = Runtime(
        Flow(FLOW, sources=sources, sinks=sinks,
             supervision=Supervision(max_restarts=1000, backoff=0.02, max_backoff=0.05)),
        registry=registry, metrics_addr=None, drain_timeout=0.5,
    )
    slots = {slot.actor.name: slot for slot in rt.slots}

    def errors(stage: str) -> float:
        return sum(s.value for m in registry.collect() if m.name == "flows_errors"
                   for s in m.samples if s.labels.get("stage") == stage and s.name.endswith("_total"))

    done = trio.Event()

    async def run() -> None:
        await rt.run()
        done.set()

    nursery.start_soon(run)
    await wait_until(lambda: (
        slots["influx_refused"].restarts >= 2
        and sample(registry, "flows_records_discarded_total", FLOW, "coincap",
                   reason="request_failed") >= 1
        and sample(registry, "flows_records_discarded_total", FLOW, "coingecko",
                   reason="request_failed") >= 1
        and sample(registry, "flows_records_discarded_total", FLOW, "binance",
                   reason="request_failed") >= 1
        and sample(registry, "flows_source_reconnects_total", FLOW, "binance_stream",
                   reason="error") >= 1
        and errors("redis_in") >= 1 and errors("pg_url") >= 1 and errors("pg_kv") >= 1
        and sample(registry, "flows_sink_batch_records_count", FLOW, "redis_out") >= 1
        and sample(registry, "flows_sink_batch_records_count", FLOW, "influx") >= 1
    ), timeout=30)
    status = json.dumps(rt.status())
    metrics = generate_latest(registry).decode()
    rt.stop()
    await done.wait()

    assert "InfluxConfigError" in (slots["influx_refused"].last_error or "")
    assert "***" in slots["influx_refused"].last_error
    shown = {
        "status": status,
        "metrics": metrics,
        "reprs": " ".join(repr(c) for c in [*sources, *sinks]),
        "log": "\n".join(
            f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records
        ) + caplog.text,
    }
    for where, text in shown.items():
        assert not leaked(text), f"{where} shows {leaked(text)}"
    assert "refused: " in shown["log"]  # the servers' echoes were logged, masked
    assert "HTTP Request:" in shown["log"]  # httpx's lines were there to check


CLI_FLOW = """
from flows import Flow, Retry, Supervision
from sinks.influx import InfluxSink
from sinks.postgres import PostgresSink
from sinks.redis import RedisStreamSink
from sources.binance import BinanceStream, BinanceTickers
from sources.coincap import CoinCapPrices
from sources.synthetic import SyntheticMarket

flow = Flow(
    "sec",
    sources=[
        SyntheticMarket(symbols=5, interval=0.05),
        CoinCapPrices(symbols=["bitcoin"], api_key={coincap!r}, base_url={fake!r}, every=0.1),
        BinanceTickers(symbols=["BTCUSDT"], headers={{"X-MBX-APIKEY": {binance!r}}},
                       base_url={fake!r}, every=0.1),
        BinanceStream(symbols=["BTCUSDT"], base_url={ws!r}, retry=Retry(backoff=0.05, max_backoff=0.1)),
    ],
    sinks=[
        InfluxSink({influx!r}, database="sec", token={token!r}, name="influx_refused"),
        PostgresSink({pg_url!r}, name="pg_url", connect_timeout=2),
        PostgresSink({pg_kv!r}, name="pg_kv", connect_timeout=2),
        RedisStreamSink({redis_url!r}, name="redis_out"),
    ],
    supervision=Supervision(max_restarts=1000, backoff=0.02, max_backoff=0.05),
)
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_cli_logs_at_debug_show_no_secret(nursery, tmp_path, fmt):
    fake = await refusing_server(nursery)
    dead = closed_port()
    path = tmp_path / "secret_flow.py"
    path.write_text(textwrap.dedent(CLI_FLOW.format(
        fake=fake, coincap=COINCAP_KEY, binance=BINANCE_KEY, token=INFLUX_TOKEN,
        ws=f"ws://feed:{WS_PW}@127.0.0.1:{dead}/ws?listenKey={WS_KEY}",
        influx=fake.replace("http://", f"http://flows:{INFLUX_REFUSED_PW}@"),
        pg_url=f"postgresql://flows:{PG_URL_PW}@127.0.0.1:{dead}/market",
        pg_kv=f"host=127.0.0.1 port={dead} user=flows password={PG_KV_PW} dbname=market",
        redis_url=f"redis://:{REDIS_PW}@127.0.0.1:{dead}/0",
    )))
    done = await trio.run_process(
        [sys.executable, "-m", "flows.run", str(path), "--duration", "1.5", "--drain-timeout",
         "0.5", "--metrics-addr", "0", "--log-level", "DEBUG", "--log-format", fmt],
        cwd=tmp_path, env=ENV, capture_stdout=True, capture_stderr=True, check=False,
    )
    out = done.stdout.decode() + done.stderr.decode()
    assert not leaked(out), leaked(out)
    assert "InfluxConfigError" in out and "refuses writes" in out, out[-3000:]
    assert "HTTP Request:" in out  # DEBUG shows httpx's lines, redacted
    assert "flows:***@" in out and "refused: " in out
    if fmt == "json":
        lines = [line for line in done.stderr.decode().splitlines() if line.startswith("{")]
        assert lines and all(json.loads(line)["event"] is not None for line in lines)


def test_httpx_per_request_lines_are_quiet_below_debug():
    from flows._log import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("text", "INFO")
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert not logging.getLogger("httpcore").isEnabledFor(logging.DEBUG)
        setup_logging("json", "DEBUG")
        assert logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert logging.getLogger("httpcore").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_log_formatters_redact_every_line():
    from flows._log import JsonFormatter, TextFormatter

    record = logging.LogRecord("x", logging.WARNING, __file__, 1,
                               "connecting to %s", ("http://u:p4ss-word@h:1/?token=t0k3n-abc",),
                               None)
    record.dsn = "host=h password=p4ss-word"
    text = TextFormatter().format(record)
    event = json.loads(JsonFormatter().format(record))
    for shown in (text, event["event"], event["dsn"]):
        assert "p4ss-word" not in shown and "t0k3n-abc" not in shown
    assert event["event"] == "connecting to http://u:***@h:1/?token=***"


_counter = itertools.count()


def fresh(prefix: str) -> str:
    """A secret no other test registered."""
    return f"{prefix}-{next(_counter)}-Rr0"


@pytest.mark.parametrize(("text", "shown"), [
    ("http://reader:s3cr3t@influx:8086/write?db=m&p=s3cr3t",
     "http://reader:***@influx:8086/write?db=m&p=***"),
    ("redis://:p@ss@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://default:pw1@h:6380/1 and redis://tok3n@h", "rediss://default:***@h:6380/1 and redis://***@h"),
    ("postgresql://u:p%40ss@h/db?sslpassword=x&application_name=a",
     "postgresql://u:***@h/db?sslpassword=***&application_name=a"),
    ("host=db user=flows password='a b\\' c' dbname=m", "host=db user=flows password='***' dbname=m"),
    ("host=db password = plain dbname=m", "host=db password = *** dbname=m"),
    ("GET https://api.x/v1?apiKey=abc&symbol=BTC&signature=ff#access_token=z",
     "GET https://api.x/v1?apiKey=***&symbol=BTC&signature=***#access_token=***"),
    ("{'authorization': 'Bearer abc.def', 'x-cg-demo-api-key': 'k1'}",
     "{'authorization': 'Bearer ***', 'x-cg-demo-api-key': '***'}"),
    ("Authorization: Token user:pw", "Authorization: Token ***"),
    ("max_keys=1000 key=('binance', 'BTC') http://h:1/x?symbol=BTC",
     "max_keys=1000 key=('binance', 'BTC') http://h:1/x?symbol=BTC"),
    ('password authentication failed for user "flows"',
     'password authentication failed for user "flows"'),
])
def test_redact(text, shown):
    assert redact(text) == shown


def test_added_and_learnt_secrets_are_masked_wherever_they_appear():
    key = fresh("api-key")
    assert redact(f"HTTP 401: unknown key {key}") == f"HTTP 401: unknown key {key}"
    add_secret(key, None, "", "ab")  # None, empty and short values are ignored
    assert redact(f"HTTP 401: unknown key {key}") == "HTTP 401: unknown key ***"
    assert redact("ab") == "ab"
    password = fresh("pw")
    assert redact(f"redis://:{password}@h/0", learn=True) == "redis://:***@h/0"
    assert redact(f"WRONGPASS {password} is not it") == "WRONGPASS *** is not it"
    user_only = fresh("user")  # a user name alone is masked in URLs, not learnt
    redact(f"postgresql://{user_only}@h/db", learn=True)
    assert redact(f"role {user_only}") == f"role {user_only}"


def test_component_reprs_and_config_errors_mask_secrets():
    pw = fresh("influx-cfg")
    sink = InfluxSink(f"http://flows:{pw}@127.0.0.1:8086/prefix", database="m", token=fresh("t"))
    assert repr(sink) == "InfluxSink('http://flows:***@127.0.0.1:8086/prefix', database='m', " \
                         "measurement='ticks')"
    assert sink.url == "http://127.0.0.1:8086/prefix"  # the client never sees the password
    assert sink._headers["Authorization"].startswith("Basic ")
    for bad in (f"ftp://u:{pw}x@h", f"http://u:{pw}y@h:port"):
        with pytest.raises(ValueError) as info:
            InfluxSink(bad)
        assert pw not in str(info.value) and "***" in str(info.value)
    pg_pw = fresh("pg-cfg")
    assert pg_pw not in repr(PostgresSink(f"postgresql://u:{pg_pw}@h/db"))
    assert pg_pw not in repr(PostgresSink(f"host=h password='{pg_pw}' dbname=db"))
    r_pw = fresh("redis-cfg")
    assert r_pw not in repr(RedisStreamSink(f"redis://:{r_pw}@h:6379/0"))
    assert r_pw not in repr(RedisStreamSource(f"redis://u:{r_pw}@h:6379/0"))
    header_key = fresh("hdr")
    BinanceTickers(symbols=["BTCUSDT"], headers={"X-MBX-APIKEY": header_key})
    assert redact(f"echo {header_key}") == "echo ***"
