"""The Flow builder: sources merged into a chain of stages, fanned out to sinks."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from ._actors import FunctionStage
from ._channels import Edge
from ._metrics import SlowThresholds

__all__ = ["Flow", "FlowError", "Supervision"]


class FlowError(Exception):
    """A flow that cannot be built or run; the message names the culprit."""


@attrs.frozen(kw_only=True)
class Supervision:
    """Restart policy for crashed actors.

    An actor that raises is restarted after ``backoff`` seconds (doubling up
    to ``max_backoff``); more than ``max_restarts`` restarts within
    ``window`` seconds stops the flow with an error.
    """

    max_restarts: int = attrs.field(default=5, validator=attrs.validators.ge(0))
    window: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    backoff: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    max_backoff: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))


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


def _as_stage(obj: Any) -> Any:
    if not hasattr(obj, "run") and callable(obj):
        return FunctionStage(obj)
    return obj


class Flow:
    """A named dataflow graph.

    ::

        flow = Flow(
            "crypto",
            sources=[SyntheticMarket(symbols=500)],
            stages=[ChangeDetector(rel=0.0005, heartbeat=60.0)],
            sinks=[SQLiteSink("ticks.db")],
        )

    Parameters:
        name: the flow's name (the ``flow`` label of every metric).
        sources: one or more sources; their batches are merged.
        stages: a chain of stages; a plain function ``batch -> batch | None``
            (sync or async) is turned into a stage.
        sinks: one or more sinks, each with its own channel (fan-out).
        capacity: default channel capacity, in batches.
        edges: per-consumer channel settings, keyed by the consumer's name.
        supervision: restart policy for actors that raise.
        slow: thresholds above which batches and poll cycles are logged
            and counted as slow.
    """

    def __init__(
        self,
        name: str,
        *,
        sources: Sequence[Any],
        stages: Sequence[Any | Callable[..., Any]] = (),
        sinks: Sequence[Any],
        capacity: int = 8,
        edges: Mapping[str, Edge] | None = None,
        supervision: Supervision | None = None,
        slow: SlowThresholds | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise FlowError("a flow needs a non-empty name")
        self.name = name
        self.sources = list(sources)
        self.stages = [_as_stage(s) for s in stages]
        self.sinks = list(sinks)
        self.default_edge = Edge(capacity=capacity)
        self.edges = dict(edges or {})
        self.supervision = supervision or Supervision()
        self.slow = slow or SlowThresholds()
        self._validate()

    def _validate(self) -> None:
        if not self.sources:
            raise FlowError(f"flow {self.name!r} has no sources")
        if not self.sinks:
            raise FlowError(f"flow {self.name!r} has no sinks")
        seen: set[str] = set()
        for kind, actors, want in (
            ("source", self.sources, 1),
            ("stage", self.stages, 2),
            ("sink", self.sinks, 1),
        ):
            for actor in actors:
                name = getattr(actor, "name", None)
                if not isinstance(name, str) or not name:
                    raise FlowError(f"{kind} {actor!r} in flow {self.name!r} has no name")
                if name in seen:
                    raise FlowError(
                        f"flow {self.name!r} has two actors named {name!r}; "
                        "give one a different name="
                    )
                seen.add(name)
                got = _arity(actor)
                if got != want:
                    raise FlowError(
                        f"{kind} {name!r}: run() takes {got} channel argument(s), "
                        f"a {kind} takes {want}"
                    )
        for name in self.edges:
            if name not in seen or name in {s.name for s in self.sources}:
                raise FlowError(f"flow {self.name!r}: edges names {name!r}, which is not a stage or sink")

    def edge(self, consumer: str) -> Edge:
        """The channel settings of the edge into ``consumer``."""
        return self.edges.get(consumer, self.default_edge)

    @property
    def actors(self) -> list[Any]:
        return [*self.sources, *self.stages, *self.sinks]

    def kind(self, actor: Any) -> str:
        if any(actor is s for s in self.sources):
            return "source"
        if any(actor is s for s in self.sinks):
            return "sink"
        return "stage"

    def __repr__(self) -> str:
        names = lambda xs: ",".join(a.name for a in xs)
        return f"Flow({self.name!r}: [{names(self.sources)}] -> [{names(self.stages)}] -> [{names(self.sinks)}])"
