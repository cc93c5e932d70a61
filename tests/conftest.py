"""Shared fixtures: a fresh metrics registry per test; every batch a
source tags with its ``source`` is checked to hold only that source's
records (change detection trusts the tag).

Hypothesis runs without its per-example deadline: the suite runs on shared,
loaded machines, where a stall of the process says nothing about the code."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings
from prometheus_client import CollectorRegistry

from flows import Batch, Outbox

settings.register_profile("shared-machine", deadline=None)
settings.load_profile("shared-machine")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(autouse=True)
def batches_tagged_truthfully(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a test in which some batch tagged with a ``source`` held a
    record of another source (counted here: an assertion inside an actor
    would only restart it)."""
    send, wrong = Outbox.send, []

    async def checked(self: Outbox, batch: Batch) -> None:
        if batch.source is not None:
            wrong.extend(r for r in batch.records if getattr(r, "source", None) != batch.source)
        await send(self, batch)

    monkeypatch.setattr(Outbox, "send", checked)
    yield
    assert not wrong, f"batches tagged with a source held records of another: {wrong[:3]}"
