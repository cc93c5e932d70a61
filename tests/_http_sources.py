"""Checks every HTTP source's tests share, against the exchange emulator."""

from __future__ import annotations

import trio
from prometheus_client import CollectorRegistry

from flows import Flow, Runtime
from flows.testing import ListSink, sample


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
        while source.cycles < cycles + 2:
            await trio.sleep(0.5)
        assert len(sink.records) >= before + n  # recovered
        assert rt.ready()[0]
        rt.stop()
