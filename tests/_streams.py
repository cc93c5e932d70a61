"""What the websocket stream tests share: an emulator feed and metric readers."""

from __future__ import annotations

from flows import RECONNECT_REASONS
from flows.testing import running_source, sample, wait_until
from flows.testing.emulator import Emulator

FLOW = "live"
FROZEN = 1e9  # a tick interval no test outlives: prices stay put


def feed_starter(nursery, path: str = "", *, seed: int):
    """``start(**emulator_options) -> (emulator, ws URL of the feed at path)``."""

    async def start(**options):
        options.setdefault("seed", seed)
        options.setdefault("assets", 20)
        emulator = Emulator(**options)
        url = await nursery.start(emulator.serve)
        return emulator, url.replace("http://", "ws://") + path

    return start


def running(source, sink=None, **flow_options):
    return running_source(source, sink, flow=FLOW, **flow_options)


def until(condition, timeout: float = 60.0, poll: float = 0.05):
    return wait_until(condition, timeout, poll)


def reconnect_counts(registry, stage: str) -> dict[str, float]:
    return {r: sample(registry, "flows_source_reconnects_total", FLOW, stage, reason=r)
            for r in RECONNECT_REASONS}


def discarded_count(registry, stage: str, reason: str) -> float:
    return sample(registry, "flows_records_discarded_total", FLOW, stage, reason=reason)


def subscriptions(emulator, exchange: str) -> list[set[str]]:
    return [set(s) for s in emulator.stats[exchange]["ws"]["subscriptions"]]
