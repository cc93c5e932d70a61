"""The Flow builder: a directed acyclic graph of sources, stages and sinks.

A ``Stream`` is what flows out of something: one or more sources, a stage,
a merge of streams, or one branch of a split or a route. A stream feeds any
number of stages and sinks; each consumer has its own bounded channel with
its own ``Edge`` settings::

    flow = Flow("crypto")
    polled = flow.source(BinanceTickers(symbols=[...]), CoinbaseTickers(products=[...]))
    polled.to(JSONLSink("raw.jsonl"))                      # every raw tick
    moved = polled.then(ChangeDetector(rel=5e-4, heartbeat=60))
    moved.to(PostgresSink(dsn=...))
    btc, rest = moved.split(lambda t: t.symbol.startswith("BTC"))
    btc.to(RedisStreamSink(url=..., stream="btc"))

``Flow(name, sources=..., stages=..., sinks=...)`` builds the same kind of
graph for a chain: the sources merged, the stages in a row, the last
stream fanned out to the sinks.

Cycles, two actors with one name and actors whose ``run`` has the wrong
signature fail at once; a source or stage whose output reaches no consumer
fails when the flow is validated (by the runtime, before it starts, and by
``flow.validate()``). Split and route branches nothing consumes are
allowed: their records are dropped and counted (reason ``unrouted``).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from ._actors import FunctionStage
from ._channels import Edge
from ._metrics import SlowThresholds
from ._render import graph_lines, mermaid

__all__ = ["Branch", "Flow", "FlowError", "Routes", "Stream", "Supervision"]


class FlowError(Exception):
    """A flow that cannot be built or run; the message names the culprit."""


@attrs.frozen(kw_only=True)
class Supervision:
    """Restart policy for crashed actors.

    An actor that raises is restarted after ``backoff`` seconds (doubling up
    to ``max_backoff``); more than ``max_restarts`` restarts within
    ``window`` seconds stops the flow with an error.

    A restart policy, not a ``flows.Retry``: its budget is restarts per
    window (a crash loop stops the flow; a rare crash never uses it up),
    and its waits have no jitter, since a restart is local and whatever the
    restarted actor sends to a server goes through that actor's own
    ``Retry``, which jitters.
    """

    max_restarts: int = attrs.field(default=5, validator=attrs.validators.ge(0))
    window: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    backoff: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    max_backoff: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))


_WANT = {"source": 1, "stage": 2, "sink": 1}


def _arity(actor: Any) -> int:
    run = getattr(actor, "run", None)
    if run is None or not inspect.iscoroutinefunction(run):
        raise FlowError(f"{actor!r} is not an actor: it needs an async run() method")
    params = [
        p
        for p in inspect.signature(run).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(params)


def _as_stage(obj: Any, name: str | None = None) -> Any:
    if not hasattr(obj, "run") and callable(obj):
        return FunctionStage(obj, name)
    if name is not None:
        raise FlowError(f"then(name={name!r}) names a function stage; {obj!r} has its own name")
    return obj


def _label(fn: Any, fallback: str) -> str:
    name = getattr(fn, "__name__", "")
    return name if name.isidentifier() else fallback


# -- splitting -------------------------------------------------------------


class _Splitter:
    """Divides a batch's records among ``n`` branches (each record to one)."""

    name: str
    labels: tuple[str, ...]

    def partition(self, records: list[Any]) -> list[list[Any]]:
        raise NotImplementedError


class _Split(_Splitter):
    def __init__(self, predicate: Callable[[Any], Any], name: str) -> None:
        self.predicate, self.name = predicate, name
        self.labels = (name, f"not {name}")

    def partition(self, records: list[Any]) -> list[list[Any]]:
        pred = self.predicate
        yes: list[Any] = []
        no: list[Any] = []
        for record in records:
            (yes if pred(record) else no).append(record)
        return [yes, no]


class _Route(_Splitter):
    def __init__(self, key: Callable[[Any], Hashable], values: Sequence[Hashable], name: str) -> None:
        self.key, self.name = key, name
        self.index = {value: i for i, value in enumerate(values)}
        if len(self.index) != len(values):
            raise FlowError(f"route {name!r}: a value is listed twice in {list(values)!r}")
        self.labels = (*(f"{name}={v}" for v in values), f"{name}=other")

    def partition(self, records: list[Any]) -> list[list[Any]]:
        key, index = self.key, self.index
        other = len(index)
        parts: list[list[Any]] = [[] for _ in range(other + 1)]
        for record in records:
            parts[index.get(key(record), other)].append(record)
        return parts


@attrs.frozen
class Branch:
    """One output of a split or route: records its splitter sends to ``index``."""

    splitter: _Splitter
    index: int

    @property
    def label(self) -> str:
        return self.splitter.labels[self.index]


Chain = tuple[Branch, ...]
"""The branches a record passes between a producer and a consumer (empty: all)."""


@attrs.frozen
class Tap:
    """Part of a stream: what ``producer`` sends, narrowed by ``chain``."""

    producer: str
    chain: Chain = ()

    def label(self) -> str:
        return " / ".join(b.label for b in self.chain)


@attrs.define(eq=False)
class _Node:
    actor: Any
    kind: str
    inputs: list[Tap] = attrs.field(factory=list)
    edge: Edge | None = None


# -- streams ---------------------------------------------------------------


class Stream:
    """What flows out of sources, a stage, a merge, or a branch of a split.

    Consuming a stream never changes it: it can feed any number of stages
    and sinks, each over its own channel.
    """

    def __init__(self, flow: Flow, taps: Iterable[Tap]) -> None:
        self.flow = flow
        self.taps: tuple[Tap, ...] = tuple(dict.fromkeys(taps))

    def then(self, stage: Any, *, edge: Edge | None = None, name: str | None = None) -> Stream:
        """Feed this stream into ``stage`` (an actor, or a function
        ``batch -> batch | None`` named ``name``, default its ``__name__``);
        returns the stage's output stream.

        Feeding a stage that is already in the flow merges this stream into
        its input."""
        node = self.flow._consume(_as_stage(stage, name), "stage", self, edge)
        return Stream(self.flow, [Tap(node.actor.name)])

    def to(self, *sinks: Any, edge: Edge | None = None) -> Stream:
        """Feed this stream into each sink; returns this stream, for chaining."""
        if not sinks:
            raise FlowError(f"flow {self.flow.name!r}: to() needs at least one sink")
        for sink in sinks:
            self.flow._consume(sink, "sink", self, edge)
        return self

    def split(self, predicate: Callable[[Any], Any], *, name: str | None = None) -> tuple[Stream, Stream]:
        """``(matching, rest)``: records for which ``predicate`` is true, and the others."""
        splitter = _Split(predicate, name or self.flow._splitter_name(predicate, "split"))
        self.flow._splits.append((splitter, self.taps))
        matching, rest = (self._branch(splitter, i) for i in (0, 1))
        return matching, rest

    def filter(self, predicate: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """The records for which ``predicate`` is true (the rest are ``unrouted``)."""
        return self.split(predicate, name=name or self.flow._splitter_name(predicate, "filter"))[0]

    def route(
        self, key: Callable[[Any], Hashable], values: Iterable[Hashable], *, name: str | None = None
    ) -> Routes:
        """One stream per value of ``key(record)`` in ``values``, plus ``.other``
        for records whose key is not listed:

        ```python
        by_source = polled.route(lambda t: t.source, ["binance", "coinbase"])
        by_source["binance"].to(SQLiteSink("binance.db"))
        by_source.other.to(ConsoleSink())
        ```
        """
        values = list(values)
        if not values:
            raise FlowError(f"flow {self.flow.name!r}: route() needs at least one value")
        splitter = _Route(key, values, name or self.flow._splitter_name(key, "route"))
        self.flow._splits.append((splitter, self.taps))
        streams = {v: self._branch(splitter, i) for i, v in enumerate(values)}
        return Routes(streams, self._branch(splitter, len(values)))

    def merge(self, *others: Stream) -> Stream:
        """One stream of this stream's and ``others``' records."""
        return self.flow.merge(self, *others)

    def _branch(self, splitter: _Splitter, index: int) -> Stream:
        branch = Branch(splitter, index)
        return Stream(self.flow, [Tap(t.producer, (*t.chain, branch)) for t in self.taps])

    def __repr__(self) -> str:
        parts = [t.producer + (f"[{t.label()}]" if t.chain else "") for t in self.taps]
        return f"Stream({', '.join(parts)})"


class Routes(Mapping[Hashable, Stream]):
    """The streams of a route, by key value; ``other`` has the unlisted keys."""

    def __init__(self, streams: dict[Hashable, Stream], other: Stream) -> None:
        self._streams, self.other = streams, other

    def __getitem__(self, value: Hashable) -> Stream:
        try:
            return self._streams[value]
        except KeyError:
            raise KeyError(f"route has no value {value!r}; use .other for unlisted keys") from None

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._streams)

    def __len__(self) -> int:
        return len(self._streams)


# -- the flow --------------------------------------------------------------


class Flow:
    """A named dataflow graph.

    ```python
    flow = Flow("crypto")
    polled = flow.source(SyntheticMarket(symbols=500))
    polled.to(JSONLSink("raw.jsonl"))
    polled.then(ChangeDetector(rel=0.0005, heartbeat=60.0)).to(SQLiteSink("ticks.db"))

    # a chain, in one call
    flow = Flow(
        "crypto",
        sources=[SyntheticMarket(symbols=500)],
        stages=[ChangeDetector(rel=0.0005, heartbeat=60.0)],
        sinks=[SQLiteSink("ticks.db")],
    )
    ```

    Parameters:
        name: the flow's name (the ``flow`` label of every metric).
        sources: a chain's sources, merged. Omit ``sources``, ``stages`` and
            ``sinks`` to build the graph with ``source()``, ``then()``,
            ``to()``, ``split()``, ``route()`` and ``merge()``.
        stages: a chain's stages, in a row (a plain function
            ``batch -> batch | None``, sync or async, becomes a stage).
        sinks: a chain's sinks: the last stream fanned out to them.
        capacity: default channel capacity, in batches.
        edges: channel settings by consumer name (or pass ``edge=`` to
            ``then``/``to``).
        supervision: restart policy for actors that raise.
        slow: thresholds above which batches and poll cycles are logged
            and counted as slow.
    """

    def __init__(
        self,
        name: str,
        *,
        sources: Sequence[Any] | None = None,
        stages: Sequence[Any | Callable[..., Any]] = (),
        sinks: Sequence[Any] | None = None,
        capacity: int = 8,
        edges: Mapping[str, Edge] | None = None,
        supervision: Supervision | None = None,
        slow: SlowThresholds | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise FlowError("a flow needs a non-empty name")
        self.name = name
        self.default_edge = Edge(capacity=capacity)
        self.edges = dict(edges or {})
        self.supervision = supervision or Supervision()
        self.slow = slow or SlowThresholds()
        self._nodes: dict[str, _Node] = {}
        self._splits: list[tuple[_Splitter, tuple[Tap, ...]]] = []
        self._splitter_names: set[str] = set()
        self.gap_source: Any = None
        """The source behind ``gaps()``, once asked for."""
        if sources is not None or sinks is not None:
            self._chain(sources or [], stages, sinks or [])

    def _chain(self, sources: Sequence[Any], stages: Sequence[Any], sinks: Sequence[Any]) -> None:
        if not sources:
            raise FlowError(f"flow {self.name!r} has no sources")
        if not sinks:
            raise FlowError(f"flow {self.name!r} has no sinks")
        stream = self.source(*sources)
        for s in stages:
            stream = stream.then(s)
        stream.to(*sinks)
        self.validate()

    # -- building ------------------------------------------------------------

    def source(self, *sources: Any) -> Stream:
        """Add sources; returns the stream of their merged output."""
        if not sources:
            raise FlowError(f"flow {self.name!r}: source() needs at least one source")
        for actor in sources:
            node = self._node(actor, "source")
            if node is None:
                self._add(actor, "source")
        return Stream(self, [Tap(a.name) for a in sources])

    def gaps(self) -> Stream:
        """The stream of ``Gap`` records every source of the flow reports
        (disconnects, silences, lost updates, failed polls, open circuits),
        to route to a sink so stored data says where it is incomplete."""
        if self.gap_source is None:
            from ._gaps import GapStream

            self.gap_source = GapStream()
            self._add(self.gap_source, "source")
        return Stream(self, [Tap(self.gap_source.name)])

    def merge(self, *streams: Stream) -> Stream:
        """One stream of all the given streams' records."""
        for s in streams:
            if not isinstance(s, Stream) or s.flow is not self:
                raise FlowError(f"flow {self.name!r}: merge() takes streams of this flow, got {s!r}")
        return Stream(self, [t for s in streams for t in s.taps])

    def _name_of(self, actor: Any, kind: str) -> str:
        name = getattr(actor, "name", None)
        if not isinstance(name, str) or not name:
            raise FlowError(f"{kind} {actor!r} in flow {self.name!r} has no name")
        return name

    def _node(self, actor: Any, kind: str) -> _Node | None:
        """The node already holding ``actor``, or None for a new actor."""
        name = self._name_of(actor, kind)
        node = self._nodes.get(name)
        if node is None:
            return None
        if node.actor is not actor:
            raise FlowError(
                f"flow {self.name!r} has two actors named {name!r}; give one a different name="
            )
        if node.kind != kind:
            raise FlowError(f"flow {self.name!r}: {name!r} is a {node.kind}, used as a {kind}")
        return node

    def _add(self, actor: Any, kind: str) -> _Node:
        name = actor.name
        got = _arity(actor)
        if got != _WANT[kind]:
            raise FlowError(
                f"{kind} {name!r}: run() takes {got} channel argument(s), a {kind} takes {_WANT[kind]}"
            )
        node = self._nodes[name] = _Node(actor, kind)
        return node

    def _consume(self, actor: Any, kind: str, stream: Stream, edge: Edge | None) -> _Node:
        if stream.flow is not self:
            raise FlowError(f"flow {self.name!r}: that stream belongs to flow {stream.flow.name!r}")
        node = self._node(actor, kind)
        if node is None:
            node = self._add(actor, kind)
        else:
            self._check_acyclic(node, stream)
        if edge is not None:
            if node.edge is not None and node.edge != edge:
                raise FlowError(f"flow {self.name!r}: {kind} {node.actor.name!r} given two edges")
            node.edge = edge
        node.inputs.extend(t for t in stream.taps if t not in node.inputs)
        return node

    def _check_acyclic(self, node: _Node, stream: Stream) -> None:
        target = node.actor.name
        seen: set[str] = set()
        todo = [t.producer for t in stream.taps]
        while todo:
            name = todo.pop()
            if name == target:
                raise FlowError(
                    f"flow {self.name!r}: feeding {target!r} from this stream makes a cycle "
                    f"({target!r} is upstream of it)"
                )
            if name not in seen:
                seen.add(name)
                todo.extend(t.producer for t in self._nodes[name].inputs)

    def _splitter_name(self, fn: Any, kind: str) -> str:
        base = _label(fn, kind)
        for n in itertools.count(1):
            name = base if n == 1 and base != kind else f"{base}{n}"
            if name not in self._splitter_names:
                self._splitter_names.add(name)
                return name
        raise AssertionError  # pragma: no cover

    # -- reading the graph ---------------------------------------------------

    def validate(self) -> Flow:
        """Check the whole graph; raises FlowError naming the culprit."""
        if not self.sources:
            raise FlowError(f"flow {self.name!r} has no sources")
        consumed = {t.producer for n in self._nodes.values() for t in n.inputs}
        for node in self._nodes.values():
            if node.kind != "sink" and node.actor.name not in consumed:
                raise FlowError(
                    f"flow {self.name!r}: the stream of {node.kind} {node.actor.name!r} "
                    "feeds nothing; give it a consumer with .then() or .to()"
                )
        for name in self.edges:
            target = self._nodes.get(name)
            if target is None or target.kind == "source":
                raise FlowError(
                    f"flow {self.name!r}: edges names {name!r}, which is not a stage or sink"
                )
        return self

    def _of_kind(self, kind: str) -> list[Any]:
        return [n.actor for n in self._nodes.values() if n.kind == kind]

    @property
    def sources(self) -> list[Any]:
        return self._of_kind("source")

    @property
    def stages(self) -> list[Any]:
        return self._of_kind("stage")

    @property
    def sinks(self) -> list[Any]:
        return self._of_kind("sink")

    @property
    def actors(self) -> list[Any]:
        """Every actor: sources, then stages, then sinks (each in the order added)."""
        return [*self.sources, *self.stages, *self.sinks]

    def kind(self, actor: Any) -> str:
        """``source``, ``stage`` or ``sink``."""
        return self._nodes[actor.name].kind

    def edge(self, consumer: str) -> Edge:
        """The channel settings of the edge into ``consumer``."""
        node = self._nodes.get(consumer)
        if node is not None and node.edge is not None:
            return node.edge
        return self.edges.get(consumer, self.default_edge)

    def inputs(self, consumer: str) -> list[Tap]:
        """The taps feeding ``consumer``."""
        return list(self._nodes[consumer].inputs)

    def consumers(self, producer: str) -> list[tuple[str, Chain]]:
        """``(consumer, chain)`` for every tap of ``producer``'s output."""
        return [
            (name, tap.chain)
            for name, node in self._nodes.items()
            for tap in node.inputs
            if tap.producer == producer
        ]

    def unconsumed(self, producer: str) -> list[Chain]:
        """Branches of ``producer``'s output that no consumer reads (``unrouted``)."""
        used = [chain for _, chain in self.consumers(producer)]
        out: list[Chain] = []
        for splitter, taps in self._splits:
            for tap in taps:
                if tap.producer != producer:
                    continue
                chains = [(*tap.chain, Branch(splitter, i)) for i in range(len(splitter.labels))]
                read = [any(_starts(c, chain) for c in used) for chain in chains]
                if any(read):  # else nobody reads the split at all: no work to do
                    out += [c for c, r in zip(chains, read) if not r and c not in out]
        return out

    def links(self) -> list[tuple[str, str, str]]:
        """``(producer, consumer, branch label)`` for every edge of the graph."""
        return [
            (tap.producer, name, tap.label())
            for name, node in self._nodes.items()
            for tap in node.inputs
        ]

    def describe(self) -> dict[str, Any]:
        """The graph as plain data: ``actors`` (name, kind) and ``edges``
        (from, to, branch, capacity, policy), as ``/status`` serves it."""
        edges = []
        for producer, consumer, branch in self.links():
            e = self.edge(consumer)
            edges.append({"from": producer, "to": consumer, "branch": branch or None,
                          "capacity": e.capacity, "policy": e.policy})
        actors = [{"name": a.name, "kind": self.kind(a)} for a in self.actors]
        return {"flow": self.name, "actors": actors, "edges": edges}

    def to_text(self) -> str:
        """The graph in a few lines: its actors, then one line per producer."""
        d = self.describe()
        lines = [f"flow {self.name}"]
        for kind in ("source", "stage", "sink"):
            names = [a["name"] for a in d["actors"] if a["kind"] == kind]
            if names:
                lines.append(f"  {kind}s: {', '.join(names)}")
        lines += [f"  {line}" for line in graph_lines(d, capacity=True)]
        return "\n".join(lines)

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart (renders in Markdown on code hosts)."""
        return mermaid(self.describe())

    def __repr__(self) -> str:
        if self._is_chain():
            names = lambda xs: ",".join(a.name for a in xs)
            return (f"Flow({self.name!r}: [{names(self.sources)}] -> [{names(self.stages)}] "
                    f"-> [{names(self.sinks)}])")
        return f"Flow({self.name!r}: {len(self._nodes)} actors, {len(self.links())} edges)"

    def _is_chain(self) -> bool:
        if self._splits:
            return False
        sources = {a.name for a in self.sources}
        stages = self.stages
        for i, stage in enumerate(stages):
            want = sources if i == 0 else {stages[i - 1].name}
            if {t.producer for t in self._nodes[stage.name].inputs} != want:
                return False
        last = {stages[-1].name} if stages else sources
        return all({t.producer for t in self._nodes[s.name].inputs} == last for s in self.sinks)


def _starts(chain: Chain, prefix: Chain) -> bool:
    return chain[: len(prefix)] == prefix
