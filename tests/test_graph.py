"""Flows as graphs: branches, merges, splits, routes; acks, drain and
validation on a graph; the --graph output."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import trio
import trio.testing
from _cli import run_cli

from flows import Batch, ChangeDetector, Edge, Flow, FlowError, Runtime, Tick, stage
from flows.testing import GatedSink, ListSink, ListSource, sample


class AckingSource:
    """Sends ``n`` batches (endless when None) of ``size`` ticks with unique
    timestamps, each batch with an ack hook that records its outcomes."""

    def __init__(self, name: str, n: int | None = 10, size: int = 10, symbols: int = 5) -> None:
        self.name, self.n, self.size, self.symbols = name, n, size, symbols
        self.acks: dict[int, list[str]] = {}
        self.sent = 0
        self.records: list[Tick] = []

    def hook(self, i: int):
        return lambda outcome: self.acks.setdefault(i, []).append(outcome)

    async def run(self, outbox) -> None:
        while self.n is None or self.sent < self.n:
            i = self.sent
            records = [
                Tick(self.name, f"S{j % self.symbols}", 100.0 + i * self.size + j,
                     float(i * self.size + j))
                for j in range(self.size)
            ]
            try:
                await outbox.send(Batch(records, acks=[self.hook(i)]))
            except trio.Cancelled:  # a fan-out cut midway acks "failed"
                self.cut = records
                raise
            self.records += records
            self.sent += 1

    cut: list[Tick] = []
    """The records of a send cancelled midway (some consumers may have them)."""

    def outcomes(self) -> Counter:
        """Each batch sent acked exactly once: the count of each outcome. A
        send cut short acks ``failed``."""
        if self.acks.get(self.sent) == ["failed"]:
            del self.acks[self.sent]
        assert sorted(self.acks) == list(range(self.sent)), "a batch was never acked"
        twice = {i: v for i, v in self.acks.items() if len(v) != 1}
        assert not twice, f"batches acked more than once: {twice}"
        return Counter(v[0] for v in self.acks.values())


async def run(flow: Flow, registry, **options):
    return await Runtime(flow, registry=registry, metrics_addr=None, **options).run()


def even(t: Tick) -> bool:
    return int(t.ts) % 2 == 0


async def test_branch_merge_split_each_record_reaches_exactly_its_sinks(registry):
    a, b = AckingSource("a"), AckingSource("b")
    raw_a, everything, evens, odds = (ListSink(name=n) for n in ("raw_a", "all", "evens", "odds"))

    @stage
    def double(batch):
        return batch.replace([Tick(t.source, t.symbol, 2 * t.price, t.ts) for t in batch])

    flow = Flow("graph")
    from_a = flow.source(a)
    from_a.to(raw_a)                                   # a branch of a only
    both = from_a.merge(flow.source(b))                # a merge of two streams
    both.to(everything)
    doubled = both.then(double)
    yes, no = doubled.split(even)                      # a split of every batch in two
    yes.to(evens)
    no.to(odds)
    result = await run(flow, registry)

    assert result.clean
    key = lambda t: (t.source, t.ts)
    assert sorted(map(key, raw_a.records)) == sorted(map(key, a.records))
    assert sorted(map(key, everything.records)) == sorted(map(key, a.records + b.records))
    assert sorted(map(key, evens.records)) == sorted(key(t) for t in a.records + b.records if even(t))
    assert sorted(map(key, odds.records)) == sorted(key(t) for t in a.records + b.records if not even(t))
    assert all(t.price == 2 * (100.0 + t.ts) for t in evens.records + odds.records)
    assert a.outcomes() == {"written": 10} and b.outcomes() == {"written": 10}
    assert sample(registry, "flows_records_sent_total", "graph", "double") == 200


async def test_a_split_batch_acks_after_every_part_and_with_the_worst_outcome(registry):
    source = AckingSource("s", n=50)
    kept, stalled = ListSink(name="kept"), GatedSink(name="stalled")
    flow = Flow("worst")
    yes, no = flow.source(source).split(even)
    yes.to(kept)
    no.to(stalled, edge=Edge(capacity=2, policy="drop_oldest"))
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.testing.wait_all_tasks_blocked()
        assert source.sent == 50
        # the even halves are written, but no batch may ack before its odd half is handled
        assert len(kept.records) == 250 and len(source.acks) == 48
        stalled.gate.set()
    assert source.outcomes() == {"dropped": 48, "written": 2}
    assert [int(t.ts) // 10 for t in stalled.records[::5]] == [48, 49]


async def test_sigterm_drains_a_graph_and_acks_every_batch_once_with_a_drop_oldest_branch(registry):
    source = AckingSource("s", n=None)
    fast, lossy = ListSink(name="fast"), ListSink(name="lossy")
    flow = Flow("term")
    polled = flow.source(source)
    moved = polled.then(ChangeDetector(rel=0.0))
    moved.to(fast)
    moved.filter(even, name="evens").to(lossy, edge=Edge(capacity=1, policy="drop_oldest"))
    polled.to(ListSink(name="raw"))
    rt = Runtime(flow, registry=registry, metrics_addr=None, handle_signals=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with trio.fail_after(30):
            while source.sent < 300:
                await trio.lowlevel.checkpoint()
        os.kill(os.getpid(), signal.SIGTERM)
    assert rt.stop_reason == "signal SIGTERM"
    outcomes = source.outcomes()
    assert set(outcomes) <= {"written", "dropped"} and sum(outcomes.values()) == source.sent
    assert fast.records[:len(source.records)] == source.records  # the blocking branch lost nothing
    assert len(fast.records) - len(source.records) in (0, len(source.cut))  # and got a cut send's part
    through = fast.records[len(source.records):]  # that part went down the evens branch too
    dropped = sample(registry, "flows_records_discarded_total", "term", "lossy", reason="drop_oldest")
    assert len(lossy.records) + dropped == len(source.records) // 2 + sum(map(even, through))
    assert outcomes.get("dropped", 0) == dropped / 5        # five even records a batch


async def test_a_fan_out_cut_by_a_stop_midway_still_acks_once_as_failed(registry):
    # batch 1 reaches the fast sink, then blocks on the stalled one's full edge; the
    # stop cancels that send: the part that went out must still settle the batch's
    # ack (failed: not every consumer had it), or the batch is never acked
    source = AckingSource("s", n=None)
    fast, stalled = ListSink(name="fast"), GatedSink(name="stalled")
    flow = Flow("cut")
    polled = flow.source(source)
    polled.to(fast)
    polled.to(stalled, edge=Edge(capacity=1))
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.testing.wait_all_tasks_blocked()
        assert source.sent == 1 and len(fast.records) == 20
        rt.stop()
        await trio.testing.wait_all_tasks_blocked()
        stalled.gate.set()
    assert source.acks == {0: ["written"], 1: ["failed"]}
    assert len(stalled.records) == 10


async def test_a_send_to_one_full_edge_cut_by_a_stop_acks_failed(registry):
    # one plain edge (the direct path): batch 1 blocks on the stalled sink's full
    # edge and the stop cancels its send; its hook must still be called (failed),
    # or whoever counts acks still to come (a resume file's last write) waits forever
    source = AckingSource("s", n=None)
    stalled = GatedSink(name="stalled")
    flow = Flow("cut_one")
    flow.source(source).to(stalled, edge=Edge(capacity=1))
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.testing.wait_all_tasks_blocked()
        assert source.sent == 1
        rt.stop()
        await trio.testing.wait_all_tasks_blocked()
        stalled.gate.set()
    assert source.acks == {0: ["written"], 1: ["failed"]}
    assert len(stalled.records) == 10


async def test_a_send_begun_once_cancelled_acks_failed(registry):
    acks: list[str] = []

    class CancelledSend:
        name = "cancelled"

        async def run(self, outbox) -> None:
            with trio.CancelScope() as scope:
                scope.cancel()  # a stop already pending when the send starts
                await outbox.send(Batch([Tick("s", "X", 1.0, 1.0)], acks=[acks.append]))

    flow = Flow("late")
    flow.source(CancelledSend()).to(ListSink())
    await run(flow, registry)
    assert acks == ["failed"]


async def test_route_by_key_and_unread_branches_are_counted_unrouted(registry):
    sources = [AckingSource(name, n=4) for name in ("binance", "coinbase", "kraken")]
    got = {name: ListSink(name=name) for name in ("to_binance", "to_coinbase")}
    flow = Flow("route")
    routes = flow.source(*sources).route(lambda t: t.source, ["binance", "coinbase", "okx"], name="by")
    routes["binance"].to(got["to_binance"])
    routes["coinbase"].to(got["to_coinbase"])        # okx and other: nobody reads them
    await run(flow, registry)
    assert {t.source for t in got["to_binance"].records} == {"binance"}
    assert len(got["to_coinbase"].records) == 40
    assert sample(registry, "flows_records_discarded_total", "route", "kraken", reason="unrouted") == 40
    assert sources[0].outcomes() == {"written": 4}
    assert sources[2].outcomes() == {"skipped": 4}   # every record went nowhere
    assert flow.describe()["edges"][0]["branch"] == "by=binance"
    with pytest.raises(KeyError, match="other"):
        routes["bitstamp"]


async def test_merged_inputs_drain_only_after_every_input_ended(registry):
    early, late = ListSource([[Tick("e", "X", 1.0, 0.0)]], name="early"), AckingSource("late", n=30)
    sink = ListSink()
    flow = Flow("drain")
    flow.merge(flow.source(early), flow.source(late).then(lambda b: b, name="relay")).to(sink)
    result = await run(flow, registry)
    assert result.clean and len(sink.records) == 1 + 300


async def test_a_stage_fed_twice_merges_and_runs_once(registry):
    a, b = AckingSource("a", n=3), AckingSource("b", n=3)
    relay = stage(lambda batch: batch, name="relay")
    sink = ListSink()
    flow = Flow("twice")
    flow.source(a).then(relay)
    flow.source(b).then(relay).to(sink)
    assert [i["from"] for i in flow.describe()["edges"] if i["to"] == "relay"] == ["a", "b"]
    await run(flow, registry)
    assert len(sink.records) == 60


async def test_status_shows_edges_with_buffer_and_send_wait(registry):
    source = AckingSource("s", n=None)
    sink = GatedSink()
    flow = Flow("st")
    flow.source(source).to(sink, edge=Edge(capacity=3)).filter(even, name="evens").to(ListSink())
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.testing.wait_all_tasks_blocked()
        edges = {e["to"]: e for e in rt.status()["edges"]}
        assert edges["gated"]["buffer"] == {"used": 3, "capacity": 3}
        assert edges["gated"]["policy"] == "block" and edges["gated"]["branch"] is None
        assert edges["collect"]["branch"] == "evens"
        sink.gate.set()
        with trio.fail_after(30):
            while not rt.status()["edges"][0]["send_wait_seconds"]:
                await trio.lowlevel.checkpoint()
        rt.stop()


# -- validation ---------------------------------------------------------------


def test_a_cycle_fails_at_once_naming_the_stage():
    flow = Flow("cyc")
    relay = stage(lambda b: b, name="relay")
    out = flow.source(ListSource([])).then(relay).then(stage(lambda b: b, name="back"))
    with pytest.raises(FlowError, match="feeding 'relay' from this stream makes a cycle"):
        out.then(relay)


def test_a_name_used_twice_fails_at_once():
    flow = Flow("dup")
    source = ListSource([])
    polled = flow.source(source)
    polled.to(ListSink())
    with pytest.raises(FlowError, match="two actors named 'collect'"):
        polled.to(ListSink())
    with pytest.raises(FlowError, match="'list' is a source, used as a sink"):
        polled.to(source)


def test_a_stream_that_feeds_nothing_fails_validation_and_the_runtime():
    flow = Flow("dangling")
    polled = flow.source(ListSource([]))
    polled.to(ListSink())
    polled.then(ChangeDetector())
    with pytest.raises(FlowError, match="stream of stage 'change' feeds nothing"):
        flow.validate()
    with pytest.raises(FlowError, match="feeds nothing"):
        Runtime(flow, metrics_addr=None)


def test_a_bad_run_signature_fails_at_once():
    class TwoArgSink:
        name = "bad"

        async def run(self, inbox, outbox):
            pass

    flow = Flow("sig")
    with pytest.raises(FlowError, match="sink 'bad': run\\(\\) takes 2 channel argument\\(s\\), a sink takes 1"):
        flow.source(ListSource([])).to(TwoArgSink())


BROKEN = {
    "cycle": "relay = stage(lambda b: b, name='relay')\n"
             "flow.source(ListSource([])).then(relay).then(relay)\n",
    "dangling": "flow.source(ListSource([])).then(ChangeDetector())\n",
    "duplicate": "s = flow.source(ListSource([]))\ns.to(ListSink())\ns.to(ListSink())\n",
}


@pytest.mark.parametrize("fault", sorted(BROKEN))
def test_the_cli_reports_a_broken_graph_in_one_line_with_exit_2(tmp_path: Path, fault: str):
    path = tmp_path / "broken.py"
    path.write_text(
        "from flows import ChangeDetector, Flow, stage\n"
        "from flows.testing import ListSink, ListSource\n"
        "flow = Flow('broken')\n" + BROKEN[fault]
    )
    done = run_cli(str(path), "--metrics-addr", "0", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flows: error:"), done.stderr
    assert {"cycle": "'relay'", "dangling": "'change'", "duplicate": "'collect'"}[fault] in lines[0]


def test_graph_option_prints_text_and_mermaid(tmp_path: Path):
    path = tmp_path / "g.py"
    path.write_text(
        "from flows import ChangeDetector, Edge, Flow\n"
        "from flows.testing import ListSink, ListSource\n"
        "flow = Flow('g')\n"
        "polled = flow.source(ListSource([], name='feed'))\n"
        "polled.to(ListSink(name='raw'))\n"
        "def is_btc(t): return t.symbol.startswith('BTC')\n"
        "btc, rest = polled.then(ChangeDetector()).split(is_btc)\n"
        "btc.to(ListSink(name='btc'), edge=Edge(policy='conflate'))\n"
    )
    done = run_cli(str(path), "--graph", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "feed → raw (capacity 8), change (capacity 8)" in out
    assert "change → btc (is_btc, conflate, capacity 8)" in out
    assert "```mermaid\nflowchart LR\n" in out
    assert '    n0(["feed"])' in out and '    n3[("btc")]' in out
    assert '    n1 -.->|"is_btc, conflate"| n3' in out


def test_the_chain_shorthand_is_a_graph_too():
    flow = Flow("chain", sources=[ListSource([], name="a"), ListSource([], name="b")],
                stages=[ChangeDetector()], sinks=[ListSink(name="x"), ListSink(name="y")])
    assert [(e["from"], e["to"]) for e in flow.describe()["edges"]] == [
        ("a", "change"), ("b", "change"), ("change", "x"), ("change", "y")
    ]
    assert repr(flow) == "Flow('chain': [a,b] -> [change] -> [x,y])"


async def test_a_function_stage_returning_its_own_batch_passes_the_ack_on(registry):
    source = AckingSource("s", n=5)
    flow = Flow("same")
    flow.source(source).then(lambda batch: batch, name="identity").to(ListSink())
    await run(flow, registry)
    assert source.outcomes() == {"written": 5}


async def test_unrouted_counts_records_that_reached_no_consumer_once(registry):
    source = AckingSource("s", n=2)  # ts 0..19
    sink = ListSink()
    flow = Flow("overlap")
    polled = flow.source(source)
    polled.filter(lambda t: t.ts % 2 == 0, name="even").to(sink)
    polled.filter(lambda t: t.ts % 3 == 0, name="third").to(sink)
    await run(flow, registry)
    reached = {t.ts for t in source.records if t.ts % 2 == 0 or t.ts % 3 == 0}
    assert len(sink.records) == 10 + 7
    assert sample(registry, "flows_records_discarded_total", "overlap", "s", reason="unrouted") == 20 - len(reached)
    assert sample(registry, "flows_records_sent_total", "overlap", "s") == len(reached)
