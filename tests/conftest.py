"""Shared fixtures: a fresh metrics registry per test.

Hypothesis runs without its per-example deadline: the suite runs on shared,
loaded machines, where a stall of the process says nothing about the code."""

from __future__ import annotations

import pytest
from hypothesis import settings
from prometheus_client import CollectorRegistry

settings.register_profile("shared-machine", deadline=None)
settings.load_profile("shared-machine")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()
