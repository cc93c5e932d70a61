"""A property over random small DAGs: whatever the shape, the edge policies
(block or conflate) and the finite inputs, no record is lost on block
edges, each source batch is acked exactly once, and the flow drains and
ends by itself."""

from __future__ import annotations

from collections import Counter
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from flows import Batch, Edge, Flow, Runtime, Tick
from flows.testing import ListSink

PREDICATES = [lambda t, k=k: int(t.ts) % (k + 2) == 0 for k in range(3)]


class Source:
    def __init__(self, name: str, batches: list[list[Tick]]) -> None:
        self.name, self.batches = name, batches
        self.acks: dict[int, list[str]] = {}

    async def run(self, outbox: Any) -> None:
        for i, records in enumerate(self.batches):
            hook = lambda outcome, i=i: self.acks.setdefault(i, []).append(outcome)
            await outbox.send(Batch(list(records), acks=[hook]))


# an input: (producer index, None | (predicate index, which side))
taps = st.tuples(
    st.integers(0, 50),
    st.none() | st.tuples(st.integers(0, len(PREDICATES) - 1), st.booleans()),
)


@st.composite
def graphs(draw: Any) -> dict[str, Any]:
    n_sources = draw(st.integers(1, 3))
    n_stages = draw(st.integers(0, 4))
    n_sinks = draw(st.integers(1, 3))
    consumers = []
    for i in range(n_stages + n_sinks):
        kind = "stage" if i < n_stages else "sink"
        upstream = n_sources + min(i, n_stages)  # producers defined before this node
        inputs = draw(st.lists(taps, min_size=1, max_size=3))
        consumers.append({
            "kind": kind,
            "inputs": sorted({(p % upstream, b) for p, b in inputs}, key=repr),
            "policy": draw(st.sampled_from(["block", "block", "conflate"])),
            "capacity": draw(st.integers(1, 3)),
            "copy": draw(st.booleans()),
        })
    sources = []
    for s in range(n_sources):
        sizes = draw(st.lists(st.integers(1, 6), max_size=5))
        ts = iter(range(1000))
        sources.append([
            [Tick(f"src{s}", f"S{j % 3}", 1.0 + s, float(next(ts))) for j in range(size)]
            for size in sizes
        ])
    return {"sources": sources, "consumers": consumers}


def build(spec: dict[str, Any]) -> tuple[Flow, list[Source], list[ListSink], list[dict[str, Any]]]:
    flow = Flow("prop")
    sources = [Source(f"src{i}", b) for i, b in enumerate(spec["sources"])]
    streams = [flow.source(s) for s in sources]
    splits: dict[tuple[int, int], Any] = {}
    sinks, nodes = [], []
    consumed: set[int] = set()
    for i, c in enumerate(spec["consumers"]):
        parts = []
        for producer, branch in c["inputs"]:
            consumed.add(producer)
            if branch is None:
                parts.append(streams[producer])
            else:
                k, side = branch
                if (producer, k) not in splits:
                    splits[(producer, k)] = streams[producer].split(PREDICATES[k], name=f"p{k}")
                parts.append(splits[(producer, k)][0 if side else 1])
        stream = flow.merge(*parts)
        edge = Edge(capacity=c["capacity"], policy=c["policy"])
        if c["kind"] == "stage":
            fn = (lambda b: b.replace(list(b.records))) if c["copy"] else (lambda b: b)
            streams.append(stream.then(fn, edge=edge, name=f"stage{i}"))
        else:
            sinks.append(ListSink(name=f"sink{i}"))
            stream.to(sinks[-1], edge=edge)
        nodes.append(c)
    last = ListSink(name="rest")  # whatever nothing consumed, so no stream dangles
    dangling = [s for i, s in enumerate(streams) if i not in consumed]
    if dangling:
        flow.merge(*dangling).to(last)
        sinks.append(last)
    return flow, sources, sinks, nodes


def expected(spec: dict[str, Any], flow: Flow) -> dict[str, tuple[Counter, bool]]:
    """Per sink: the records it must get (a multiset) and whether a conflate
    edge lies on some path to it (then it gets a subset, latest per key)."""
    out: dict[str, tuple[Counter, bool]] = {}
    for i, batches in enumerate(spec["sources"]):
        out[f"src{i}"] = (Counter(t for b in batches for t in b), False)
    for actor in flow.actors[len(spec["sources"]):]:
        name = actor.name
        got: Counter = Counter()
        lossy = flow.edge(name).policy == "conflate"
        for tap in flow.inputs(name):
            records, upstream_lossy = out[tap.producer]
            lossy |= upstream_lossy
            for t, n in records.items():
                if all(b.splitter.partition([t])[b.index] for b in tap.chain):
                    got[t] += n
        out[name] = (got, lossy)
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_random_dags_lose_nothing_on_block_edges_ack_once_and_drain(spec: dict[str, Any]) -> None:
    flow, sources, sinks, _ = build(spec)
    want = expected(spec, flow)

    async def main() -> Any:
        with trio.fail_after(10):
            return await Runtime(flow, registry=CollectorRegistry(), metrics_addr=None).run()

    result = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert result.clean and result.reason == "exhausted"
    for sink in sinks:
        records, lossy = want[sink.name]
        got = Counter(sink.records)
        if lossy:
            assert set(got) <= set(records), sink.name
        else:
            assert got == records, sink.name
    for source in sources:
        assert sorted(source.acks) == list(range(len(source.batches))), f"{source.name}: unacked"
        assert all(len(v) == 1 for v in source.acks.values()), f"{source.name}: acked twice"
        assert {v[0] for v in source.acks.values()} <= {"written", "skipped"}
