"""Actor contracts and the function-to-stage adapter.

An actor is any object with a ``name`` and an async ``run``:

- a source: ``async def run(self, outbox)``
- a stage: ``async def run(self, inbox, outbox)``
- a sink: ``async def run(self, inbox)``

Actors do not close their channel ends: the runtime does, once the actor
has returned, so a crashed actor can be restarted on the same channels.
A source's ``run`` returning means the source is exhausted (a finite flow).

An actor may also define ``setup(context: RunContext)``: the runtime calls
it once per run, before any actor starts (``context.fresh`` asks it to
ignore saved state such as checkpoints and offsets; a source with a symbol
universe keeps only the symbols ``context.shard`` owns).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

import attrs

from ._channels import Inbox, Outbox
from ._records import Batch
from ._shard import Shard

__all__ = ["FunctionStage", "RunContext", "Sink", "Source", "Stage", "stage"]


@attrs.frozen(kw_only=True)
class RunContext:
    """What the runtime tells each actor's optional ``setup`` hook."""

    flow: str
    fresh: bool = False
    shard: Shard | None = None
    """When set, sources poll only the symbols this shard owns."""
    rate_budget: Any = None
    """A ``RateBudget`` (or its Redis URL) HTTP sources share with other
    processes (``--rate-budget``); None: each source paces itself."""


@runtime_checkable
class Source(Protocol):
    name: str

    async def run(self, outbox: Outbox) -> None: ...


@runtime_checkable
class Stage(Protocol):
    name: str

    async def run(self, inbox: Inbox, outbox: Outbox) -> None: ...


@runtime_checkable
class Sink(Protocol):
    name: str

    async def run(self, inbox: Inbox) -> None: ...


StageFunction = Callable[[Batch], Awaitable[Batch | None] | Batch | None]


class FunctionStage:
    """A stage made from a function ``batch -> batch | None`` (sync or async).

    Returning ``None`` or an empty batch drops the batch; the records are
    counted as discarded with reason ``filtered`` and the batch is acked
    ``skipped``. Return ``batch.replace(records)`` to keep its ack hooks and
    creation time. A function that raises
    gets its batch counted as discarded (reason ``error``) and the stage is
    restarted by the supervisor. A sync function may be run in its
    producer's task (``inline``, ``process``: see "Inlined stages" in the
    concepts).
    """

    def __init__(self, fn: StageFunction, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "stage")
        self._is_async = inspect.iscoroutinefunction(fn)

    @property
    def inline(self) -> bool:
        """A sync function may run in its producer's task (see ``InlinePort``)."""
        return not self._is_async

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        metrics = inbox.metrics
        async for batch in inbox:
            if self._is_async:
                try:
                    out = await self.fn(batch)  # type: ignore[misc]
                except Exception:
                    metrics.discarded("error", len(batch.records))
                    raise
                out = self._settle(batch, out, metrics)
            else:
                out = self.process(batch, metrics)
            if out is not None:
                await outbox.send(out)

    def process(self, batch: Batch, metrics: Any) -> Batch | None:
        """The batch a sync function makes of ``batch`` (None: dropped)."""
        try:
            out: Any = self.fn(batch)
        except Exception:
            metrics.discarded("error", len(batch.records))
            raise
        return self._settle(batch, out, metrics)

    @staticmethod
    def _settle(batch: Batch, out: Batch | None, metrics: Any) -> Batch | None:
        """Count what ``out`` left out of ``batch``; carry its ack hooks over."""
        kept = 0 if out is None else len(out.records)
        if kept < len(batch.records):
            metrics.discarded("filtered", len(batch.records) - kept)
        if out is None:
            batch.ack("skipped")
            return None
        if batch.acks and out is not batch:  # a new Batch, not batch.replace(): carry the hooks over
            out.acks, batch.acks = batch.acks + out.acks, ()
        return out

    def __repr__(self) -> str:
        return f"FunctionStage({self.name!r})"


def stage(fn: StageFunction | None = None, *, name: str | None = None) -> Any:
    """Decorator: turn ``async def f(batch) -> batch | None`` into a stage.

    ```python
    @stage
    async def only_btc(batch):
        return batch.replace([t for t in batch if t.symbol.startswith("BTC")])
    ```
    """
    if fn is None:
        return lambda f: FunctionStage(f, name)
    return FunctionStage(fn, name)
