"""Observing a running flow from a real Prometheus, and the repo's monitoring files.

One flow (synthetic market -> change detection -> SQLite + JSONL) runs for
the whole module in a background thread with its own trio loop; one
Prometheus (Debian package) scrapes it every second and loads
``monitoring/alerts.yml``. Prometheus's first scrape lands ~5 s after it
starts, whatever the interval, so both are module-scoped and the tests
poll Prometheus's HTTP API (an external process) with short sleeps, for at
most ~20 s.

Checked here:

- the PromQL answers a dashboard shows (p99 batch time per stage,
  records/s, send-wait, end-to-end p99 at the sinks) exist, are finite and
  plausible, and agree with the flow's own /status;
- ``promtool check metrics`` passes on /metrics;
- ``dashboards/flows.json`` is what ``dashboards/generate.py`` writes from
  the metric declarations (``flows.all_metrics()``: the core table plus what
  registered components declare), every metric it queries is declared, every
  core one is on /metrics (a component's own families are registered when that
  component runs: checked here for the HTTP and websocket source bases against
  the exchange emulator), and every query runs on Prometheus (with the kind
  variables resolved);
- ``monitoring/alerts.yml`` and ``monitoring/prometheus.yml`` pass promtool,
  use only known metrics, load in Prometheus and stay quiet on a healthy flow.
"""

from __future__ import annotations

import bisect
import importlib.util
import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

from flows import (
    FAST_BUCKETS,
    LATENCY_BUCKETS,
    METRICS,
    ChangeDetector,
    Flow,
    MetricFamily,
    Runtime,
    all_metrics,
    declared_metrics,
)
from flows.testing import ListSink, wait_until
from flows.testing.emulator import Emulator
from sinks.jsonl import JSONLSink
from sinks.sqlite import SQLiteSink
from sources.binance import BinanceStream, BinanceTickers
from sources.synthetic import SyntheticMarket

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "flows.json"
ALERTS = ROOT / "monitoring" / "alerts.yml"
PROM_CONFIG = ROOT / "monitoring" / "prometheus.yml"

FLOW = "obs"
SYMBOLS, INTERVAL = 200, 0.05
NOMINAL = SYMBOLS / INTERVAL  # records/s the source makes when it keeps up
STAGES = {"synthetic": "source", "change": "stage", "sqlite": "sink", "jsonl": "sink"}
WAIT = 20.0  # longest wait for Prometheus to have an answer

ALL = all_metrics()  # the core table plus what registered components declare
# Families declared by components (HTTP and stream sources) this flow lacks,
# and core ones that only get series with an error or a slow operation.
DECLARED = set(ALL) - set(METRICS)
SERIES_LATER = DECLARED | {
    "flows_errors_total", "flows_gaps_total", "flows_slow_batches_total", "flows_slow_poll_cycles_total",
}


def needs(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian package prometheus)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the running flow ----------------------------------------------------------


class FlowThread:
    """Runs a Flow with its endpoints in a thread of its own (its own trio loop)."""

    def __init__(self, flow: Flow) -> None:
        self.runtime = Runtime(flow, registry=CollectorRegistry(),
                               metrics_addr="127.0.0.1:0", drain_timeout=5.0)
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._main, name="flow", daemon=True)

    def _main(self) -> None:
        async def body() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.runtime.run)
                self._started.set()

        try:
            trio.run(body)
        except BaseException as exc:
            self.error = exc
        finally:
            self._started.set()

    def start(self) -> str:
        self._thread.start()
        self._started.wait(10)
        if self.error is not None or self.runtime.metrics_url is None:
            raise RuntimeError(f"the flow did not start: {self.error!r}")
        return self.runtime.metrics_url

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self.runtime.stop, trio_token=self._token)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the flow did not drain"
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def flow_url(tmp_path_factory) -> Any:
    tmp = tmp_path_factory.mktemp("obs")
    flow = Flow(
        FLOW,
        sources=[SyntheticMarket(symbols=SYMBOLS, interval=INTERVAL)],
        stages=[ChangeDetector(rel=0.0005)],
        sinks=[SQLiteSink(tmp / "obs.db", flush_interval=0.1),
               JSONLSink(tmp / "obs.jsonl", flush_interval=0.1, fsync=False)],
    )
    runner = FlowThread(flow)
    url = runner.start()
    yield url
    runner.stop()


@pytest.fixture(scope="module")
def metrics_text(flow_url) -> str:
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=flow_url) as client:
        while True:  # until every actor has moved (the sinks flush every 0.1 s)
            text = client.get("/metrics").text
            if re.search(rf'^flows_end_to_end_latency_seconds_count{{flow="{FLOW}",'
                         rf'stage="jsonl"}} [1-9]', text, re.MULTILINE) or time.monotonic() > deadline:
                return text
            time.sleep(0.1)


# -- Prometheus ------------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log
        self.client = httpx.Client(base_url=url, timeout=5.0)

    def api(self, path: str, **params: Any) -> Any:
        body = self.client.get(f"/api/v1/{path}", params=params).json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> dict[str, float]:
        """Instant query -> {stage (or the whole label set): value}."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        assert data["resultType"] == "vector", (expr, data)
        out = {}
        for series in data["result"]:
            m = series["metric"]
            key = m.get("stage", json.dumps(m, sort_keys=True))
            out[key] = float(series["value"][1])
        return out

    def wait_for(self, expr: str, ok: Any, what: str) -> dict[str, float]:
        deadline = time.monotonic() + WAIT
        while True:
            result = self.query(expr)
            if ok(result):
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"after {WAIT:g}s Prometheus still answers {result} for {what}: "
                            f"{expr}\n--- prometheus log ---\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)


@pytest.fixture(scope="module")
def prom(flow_url, tmp_path_factory) -> Any:
    needs("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    target = flow_url.removeprefix("http://").rstrip("/")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        f"rule_files: [{json.dumps(str(ALERTS))}]\n"
        "scrape_configs:\n"
        "  - job_name: flows\n"
        f"    static_configs: [{{targets: [{json.dumps(target)}]}}]\n"
    )
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if server.client.get("/-/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after 15s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        server.client.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def finite_positive(expected: set[str]) -> Any:
    def ok(result: dict[str, float]) -> bool:
        good = {k for k, v in result.items() if math.isfinite(v) and v > 0}
        return expected <= good
    return ok


def bucket_index(bounds: tuple[float, ...], value: float) -> int:
    return bisect.bisect_left(bounds, value)


def status(flow_url: str) -> dict[str, Any]:
    body = httpx.get(f"{flow_url}/status").json()
    return {"uptime": body["uptime_seconds"], **{a["name"]: a for a in body["actors"]}}


# -- 1. Prometheus answers what the dashboard shows, consistent with /status ---------


def test_prometheus_answers_agree_with_status(prom, flow_url):
    sel = f'{{flow="{FLOW}"}}'
    before = status(flow_url)
    assert {k: v["kind"] for k, v in before.items() if k != "uptime"} == STAGES
    p99_rate = (f"histogram_quantile(0.99, sum by (le, stage) "
                f"(rate(flows_batch_processing_seconds_bucket{sel}[5s])))")
    sent = f"sum by (stage) (rate(flows_records_sent_total{sel}[5s]))"
    received = f"sum by (stage) (rate(flows_records_received_total{sel}[5s]))"
    send_wait = f"sum by (stage) (rate(flows_send_wait_seconds_sum{sel}[5s]))"
    e2e_rate = (f"histogram_quantile(0.99, sum by (le, stage) "
                f"(rate(flows_end_to_end_latency_seconds_bucket{sel}[5s])))")
    sinks = {n for n, k in STAGES.items() if k == "sink"}
    prom.wait_for(p99_rate, finite_positive(set(STAGES)), "p99 batch time of every stage")
    prom.wait_for(sent, finite_positive({"synthetic", "change"}), "records/s sent")
    prom.wait_for(e2e_rate, finite_positive(sinks), "end-to-end p99 at the sinks")
    # A rate over a window Prometheus has not filled yet is extrapolated from
    # too few samples (and comes out low): wait until [5s] holds 5 scrapes.
    prom.wait_for(f"count_over_time(flows_records_sent_total{sel}[5s])",
                  lambda r: r and min(r.values()) >= 5, "5 s of scrapes")
    # Compare over at least 5 s of /status with Prometheus's 5 s window ending now.
    time.sleep(max(0.0, 5.0 - (status(flow_url)["uptime"] - before["uptime"])))
    after = status(flow_url)
    at = time.time()
    dt = after["uptime"] - before["uptime"]

    # Stage names: Prometheus knows exactly the actors /status lists.
    p99 = prom.query(p99_rate, at)
    assert set(p99) == set(STAGES)
    for stage, value in p99.items():
        assert 0 < value <= FAST_BUCKETS[-1], (stage, value)  # inside the bucket range
        assert value < 0.5, f"{stage}: p99 batch time {value}s is implausible here"

    # Records/s: the same order of magnitude as /status counts over the same period.
    rates = {("sent", k): v for k, v in prom.query(sent, at).items()}
    rates |= {("received", k): v for k, v in prom.query(received, at).items()}
    assert {k for _, k in rates} == set(STAGES)
    for (counter, stage), prom_rate in rates.items():
        own = (after[stage][counter] - before[stage][counter]) / dt
        assert math.isfinite(prom_rate) and prom_rate >= 0
        if own == 0:
            assert prom_rate == 0, (counter, stage)
            continue
        assert 0.5 <= prom_rate / own <= 2.0, (counter, stage, prom_rate, own)
    source_rate = rates[("sent", "synthetic")]
    assert 0.2 * NOMINAL <= source_rate <= 1.25 * NOMINAL, source_rate
    assert rates[("received", "change")] == pytest.approx(source_rate, rel=0.5)
    assert 0 < rates[("sent", "change")] < rates[("received", "change")]  # unchanged ticks dropped
    for sink in sinks:
        assert rates[("received", sink)] == pytest.approx(rates[("sent", "change")], rel=0.5)
        assert rates[("sent", sink)] == 0

    # Backpressure: seconds blocked per second, per stage; at most 1.
    waits = prom.query(send_wait, at)
    assert set(waits) == set(STAGES)
    for stage, value in waits.items():
        assert math.isfinite(value) and 0 <= value <= 1.0, (stage, value)
        h0, h1 = (s[stage].get("send_wait_seconds") or {} for s in (before, after))
        own = ((h1.get("count", 0) * (h1.get("mean") or 0))
               - (h0.get("count", 0) * (h0.get("mean") or 0))) / dt
        assert abs(value - own) < 0.25, (stage, value, own)

    # End-to-end p99 only at the sinks, within the bucket range and plausible.
    e2e = {k: v for k, v in prom.query(e2e_rate, at).items() if math.isfinite(v)}
    assert set(e2e) == sinks
    for sink, value in e2e.items():
        assert 0 < value <= LATENCY_BUCKETS[-1], (sink, value)
        assert value < 5.0, f"{sink}: end-to-end p99 {value}s is implausible here"

    # Same histograms, same interpolation: Prometheus's figures over the whole
    # run match /status's (read up to a scrape interval apart: the median falls
    # in the same or a neighbouring bucket, the counts are close).
    for family, key, bounds, who in (
        ("flows_batch_processing_seconds", "processing_seconds", FAST_BUCKETS, set(STAGES)),
        ("flows_end_to_end_latency_seconds", "end_to_end_seconds", LATENCY_BUCKETS, sinks),
    ):
        p50 = prom.query(f"histogram_quantile(0.5, sum by (le, stage) ({family}_bucket{sel}))", at)
        count = prom.query(f"sum by (stage) ({family}_count{sel})", at)
        for stage in who:
            own = after[stage][key]
            distance = abs(bucket_index(bounds, p50[stage]) - bucket_index(bounds, own["p50"]))
            assert distance <= 1, (family, stage, p50[stage], own["p50"])
            assert 0.75 <= count[stage] / own["count"] <= 1.33, (family, stage, count[stage], own)


def test_metrics_pass_promtool(metrics_text):
    needs("promtool")
    check = subprocess.run(["promtool", "check", "metrics"], input=metrics_text,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


# -- 2. The Grafana dashboard ------------------------------------------------------


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("dashboards_generate",
                                                  ROOT / "dashboards" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_queries(board: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """([(panel title, expr)], {variable: query}) of a dashboard."""
    exprs = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for t in inner.get("targets", []):
                exprs.append((inner["title"], t["expr"]))
    variables = {
        v["name"]: (v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
        for v in board["templating"]["list"] if v["type"] == "query"
    }
    return exprs, variables


def metric_names(text: str) -> set[str]:
    """The flows_ metric families named in PromQL (or any) text."""
    names = set()
    for name in re.findall(r"\bflows_[a-z0-9_]+", text):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) in ALL:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def test_dashboard_is_generated_and_well_formed():
    board = json.loads(DASHBOARD.read_text())
    assert DASHBOARD.read_text() == load_generator().render(), (
        "dashboards/flows.json differs from what dashboards/generate.py writes: "
        "run python dashboards/generate.py"
    )
    assert board["schemaVersion"] >= 36  # Grafana 9
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["flow"]["query"]["query"] == "label_values(flows_records_sent_total, flow)"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Flow", "Sources", "Stages", "Sinks", "Slow operations"]
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert 'flow=~"$flow"' in t["expr"], (panel["title"], t["expr"])
    # Nothing overlaps on the 24-column grid.
    cells = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def test_dashboard_metrics_exist_and_are_exported(metrics_text):
    exprs, variables = dashboard_queries(json.loads(DASHBOARD.read_text()))
    used = metric_names(" ".join(e for _, e in exprs) + " ".join(variables.values()))
    unknown = used - set(ALL)
    assert not unknown, f"the dashboard queries metrics flows does not declare: {unknown}"
    typed = set(re.findall(r"^# TYPE (\S+) ", metrics_text, re.MULTILINE))
    for name in used:
        if name in DECLARED:
            continue  # registered when its component runs: see the test below
        base = name.removesuffix("_total") if ALL[name].kind == "counter" else name
        assert base in typed or name in typed, f"{name} has no # TYPE line on /metrics"
        if name in SERIES_LATER:
            continue
        assert re.search(rf'^{name}(_bucket|_count|_sum)?{{flow="{FLOW}"', metrics_text, re.MULTILINE), (
            f"{name} has no series on a running flow's /metrics"
        )


def test_dashboard_covers_every_metric():
    exprs, variables = dashboard_queries(json.loads(DASHBOARD.read_text()))
    used = metric_names(" ".join(e for _, e in exprs) + " ".join(variables.values()))
    assert used == set(ALL), (
        f"not on the dashboard: {set(ALL) - used}; add panels in dashboards/generate.py"
    )
    rows = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "row"]
    assert "Other components" not in rows  # every shipped family has a hand-made panel


def test_a_newly_declared_family_gets_a_generic_panel(monkeypatch):
    generator = load_generator()
    extra = {
        "flows_source_fix_sessions_total": MetricFamily(
            "flows_source_fix_sessions_total", "counter", "FIX sessions opened.", labels=("reason",)),
        "flows_source_fix_logon_seconds": MetricFamily(
            "flows_source_fix_logon_seconds", "histogram", "FIX logon time."),
    }
    monkeypatch.setattr(generator.flows, "all_metrics", lambda: {**ALL, **extra})
    board = generator.build()
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows[-1] == "Other components"
    exprs, _ = dashboard_queries(board)
    assert {t for t, _ in exprs} >= set(extra)
    queried = generator.metric_names(" ".join(e for _, e in exprs), {**ALL, **extra})
    assert queried == set(extra) | set(ALL)
    for title, expr in exprs:
        assert 'flow=~"$flow"' in expr, (title, expr)
    # a panel asking for a family nobody declares stops the generator
    monkeypatch.setattr(generator.flows, "all_metrics", lambda: dict(METRICS))
    with pytest.raises(SystemExit, match="undeclared metrics"):
        generator.build()


async def test_declared_families_reach_metrics_when_their_component_runs(nursery, autojump_clock):
    """HttpSource's and WebSocketSource's own families are not on every
    registry: they are registered once such a source runs, with the declared
    kind, help and labels, and pass promtool."""
    emulator = Emulator(seed=3, assets=10, tick_interval=0)
    url = await nursery.start(emulator.serve)
    symbols = emulator.symbols("binance")[:3]
    sink = ListSink()
    flow = Flow("own", sources=[
        BinanceTickers(symbols=symbols, base_url=url, every=1.0),
        BinanceStream(symbols=symbols, base_url=url.replace("http://", "ws://")),
    ], sinks=[sink])
    registry = CollectorRegistry()
    runtime = Runtime(flow, registry=registry, metrics_addr=None)
    declared = {f.name: f for cls in (BinanceTickers, BinanceStream) for f in declared_metrics(cls)}
    async with trio.open_nursery() as inner:
        await inner.start(runtime.run)
        await wait_until(lambda: {t.source for t in sink.records} == {"binance", "binance_stream"})
        text = generate_latest(registry).decode()
        runtime.stop()
    # (the LiveCoinWatch and FMP sources' own families: see their tests)
    assert set(declared) == DECLARED - {"flows_source_credits_remaining",
                                        "flows_source_credits_spent_total",
                                        "flows_source_skipped_total"}
    for name, family in declared.items():
        base = name.removesuffix("_total") if family.kind == "counter" else name
        assert {f"# TYPE {n} {family.kind}\n" for n in (name, base)} & {*text.splitlines(True)}, name
        assert {f"# HELP {n} {family.help}\n" for n in (name, base)} & {*text.splitlines(True)}, name
        sample = re.search(rf"^{name}(_bucket|_count)?{{(.*?)}}", text, re.MULTILINE)
        assert sample is not None, f"{name} has no series"
        labels = [kv.split("=")[0] for kv in re.findall(r'(\w+)="', sample.group(2))]
        assert set(labels) - {"le"} == {"flow", "stage", *family.labels}, name
    if shutil.which("promtool"):
        check = await trio.run_process(["promtool", "check", "metrics"], stdin=text.encode(),
                                       capture_stdout=True, capture_stderr=True, check=False)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()


def resolve(expr: str, values: dict[str, list[str]]) -> str:
    expr = expr.replace("$__rate_interval", "5s").replace("$flow", FLOW)
    for name, found in values.items():
        expr = expr.replace(f"${name}", "(" + "|".join(map(re.escape, found)) + ")")
    return expr


def test_dashboard_queries_run_on_prometheus(prom, flow_url):
    exprs, variables = dashboard_queries(json.loads(DASHBOARD.read_text()))
    # Wait until the sinks have end-to-end series over a rate window.
    prom.wait_for(f'flows_end_to_end_latency_seconds_count{{flow="{FLOW}"}} > 0',
                  lambda r: {"sqlite", "jsonl"} <= set(r), "sinks' end-to-end counts")
    # label_values(flows_records_sent_total, flow)
    assert FLOW in prom.api("label/flow/values", **{"match[]": "flows_records_sent_total"})
    # The kind variables sort the actors by kind (query_result + /stage="..."/).
    kinds: dict[str, list[str]] = {}
    for name in ("source", "stage", "sink"):
        inner = variables[name].removeprefix("query_result(").removesuffix(")")
        result = prom.query(resolve(inner, {}))
        kinds[name] = sorted(result)
    assert kinds == {
        kind: sorted(n for n, k in STAGES.items() if k == kind) for kind in ("source", "stage", "sink")
    }
    empty = []
    for title, expr in exprs:
        result = prom.query(resolve(expr, kinds))  # fails on a PromQL error
        if not result:
            empty.append((title, expr))
    # Only panels of series that appear later (HTTP sources, errors, slow
    # operations, drops at actors that drop nothing) may be empty here.
    for title, expr in empty:
        optional = SERIES_LATER | {"flows_records_discarded_total"}
        assert metric_names(expr) <= optional, f"panel {title!r} shows no data: {expr}"
    assert len(empty) < len(exprs) / 2


# -- 3. Prometheus config and alert rules ----------------------------------------------


def test_alert_rules_and_config_pass_promtool():
    needs("promtool")
    rules = subprocess.run(["promtool", "check", "rules", str(ALERTS)],
                           capture_output=True, text=True, check=False)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run(["promtool", "check", "config", str(PROM_CONFIG)],
                            capture_output=True, text=True, check=False)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "9099" in PROM_CONFIG.read_text()


def test_alert_rules_use_known_metrics():
    text = ALERTS.read_text()
    used = metric_names(text)
    assert used, "no flows_ metric in the rules"
    assert not used - set(ALL), f"unknown metrics in alerts.yml: {used - set(ALL)}"
    for needed in ("flows_batch_processing_seconds", "flows_source_circuit_state",
                   "flows_channel_buffer_batches", "flows_records_sent_total",
                   "flows_actor_restarts_total", "flows_slow_batches_total"):
        assert needed in used


def test_alert_rules_load_and_stay_quiet_on_a_healthy_flow(prom):
    deadline = time.monotonic() + WAIT
    while True:
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r["health"] == "ok" for r in rules):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"rules not all evaluated ok: {[(r['name'], r['health'], r.get('lastError')) for r in rules]}")
        time.sleep(0.25)
    assert len(rules) == 12
    active = [(r["name"], a["labels"]) for r in rules for a in r.get("alerts", [])]
    assert active == [], f"alerts pending or firing on a healthy flow: {active}"
