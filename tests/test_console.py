"""sinks.console: record lines and the periodic per-stage summary."""

from __future__ import annotations

import io

import pytest

from flows import ChangeDetector, Flow, Tick
from flows.testing import ListSource, assert_component_metrics, run_briefly
from sinks.console import ConsoleSink
from sources.synthetic import SyntheticMarket


async def test_records_mode_prints_each_record():
    out = io.StringIO()
    data = [Tick("x", "BTCUSDT", 50000.5, 1.0), Tick("x", "ETHUSDT", 3000.25, 2.0)]
    flow = Flow("c", sources=[ListSource([data])], sinks=[ConsoleSink(mode="records", stream=out)])
    _, registry = await run_briefly(flow)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["1.000 x BTCUSDT 50000.5", "2.000 x ETHUSDT 3000.25"]
    assert_component_metrics(registry, "c", "console", "sink")


async def test_summary_mode_reports_every_stage_periodically(autojump_clock):
    out = io.StringIO()
    source = SyntheticMarket(symbols=20, interval=1.0, unchanged=0.5, limit=200)
    flow = Flow("s", sources=[source], stages=[ChangeDetector()],
                sinks=[ConsoleSink(every=3.0, stream=out)])
    await run_briefly(flow)
    text = out.getvalue()
    # 10 ticks, one per (mock) second: summaries at 3, 6, 9 and the final one
    assert text.count("-- flow s at") == 4
    last = text.split("-- flow s at")[-1]
    assert "source synthetic" in last and "in=      200" in last
    assert "stage  change" in last and "dropped[unchanged=" in last
    assert "sink   console" in last and "p99=" in last


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        ConsoleSink(mode="fancy")
