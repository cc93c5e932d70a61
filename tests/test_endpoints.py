"""The HTTP endpoints of a running flow: /metrics, /healthz, /readyz, /status."""

from __future__ import annotations

import re
import shutil

import httpx
import pytest
import trio
import trio.testing

from flows import METRICS, ChangeDetector, Flow, Runtime
from flows.testing import GatedSink, ListSink
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
