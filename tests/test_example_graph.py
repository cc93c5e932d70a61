"""examples/graph.py against the exchange emulator: each sink gets exactly
the records its path leads to."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from flows import Runtime
from flows.testing import sample, wait_until
from flows.testing.emulator import Emulator

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "graph.py"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.setenv("FLOWS_EXCHANGE_URL", "http://127.0.0.1:9")  # the module-level flow
    spec = importlib.util.spec_from_file_location("graph_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_raw_changed_and_btc_ticks_reach_their_sinks(example, tmp_path, nursery, capsys):
    emulator = Emulator(seed=2, assets=20, tick_interval=0.05, unchanged=0.5)
    url = await nursery.start(emulator.serve)
    flow = example.build(url, tmp_path, every=0.1)
    registry = CollectorRegistry()
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        await wait_until(lambda: sample(registry, "flows_records_sent_total", "graph", "change") >= 40)
        rt.stop()
    polled = sum(sample(registry, "flows_records_sent_total", "graph", s) for s in ("binance", "coinbase"))
    changed = sample(registry, "flows_records_sent_total", "graph", "change")
    raw = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert len(raw) == polled and {r["source"] for r in raw} == {"binance", "coinbase"}
    with sqlite3.connect(tmp_path / "graph_ticks.db") as db:
        stored = db.execute("select symbol from ticks").fetchall()
    assert len(stored) == changed < polled   # unchanged prices were skipped
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    btc_changed = sum(1 for (symbol,) in stored if symbol.startswith("BTC"))
    assert printed and all("BTC" in line for line in printed)
    conflated = sample(registry, "flows_records_discarded_total", "graph", "console", reason="conflated")
    assert len(printed) + conflated == btc_changed
    # the rest of the split reached SQLite: no record of change went nowhere
    assert sample(registry, "flows_records_discarded_total", "graph", "change", reason="unrouted") == 0
