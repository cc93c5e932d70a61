"""Discovering components: the ``flows.sources`` and ``flows.sinks`` entry points.

A package makes its sources and sinks known to flows by listing them in its
``pyproject.toml``::

    [project.entry-points."flows.sources"]
    bitstamp = "flows_bitstamp:BitstampTickers"

``components()`` lists what every installed distribution registered,
without importing anything; ``Component.load()`` imports one. When flows
itself runs from a source checkout (its ``pyproject.toml`` beside the
``flows`` package), the checkout's own entry points are read from that file,
so a checkout that was never installed, or whose install predates a change
of entry points, lists what its code holds.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import tomllib
from pathlib import Path
from typing import Any

import attrs

from ._metrics import METRICS, MetricFamily, declared_metrics

__all__ = ["GROUPS", "Component", "ComponentError", "all_metrics", "components", "load_component"]

GROUPS = {"source": "flows.sources", "sink": "flows.sinks"}
"""Actor kind -> entry-point group."""

log = logging.getLogger("flows.registry")

_CHECKOUT = Path(__file__).resolve().parent.parent / "pyproject.toml"


class ComponentError(Exception):
    """A component that cannot be found or loaded; the message is one line."""


@attrs.frozen
class Component:
    """One registered source or sink (not imported until ``load()``).

    ``kind`` is ``source`` or ``sink``, ``name`` the entry point's name,
    ``value`` the object's path (``module:Class``), ``distribution`` the
    package that registered it.
    """

    kind: str
    name: str
    value: str
    distribution: str

    @property
    def group(self) -> str:
        return GROUPS[self.kind]

    def load(self) -> Any:
        """Import the component's class; ComponentError (one line) if that fails."""
        module, _, attr = self.value.partition(":")
        try:
            obj: Any = importlib.import_module(module.strip())
            for part in attr.strip().split(".") if attr.strip() else ():
                obj = getattr(obj, part)
        except Exception as exc:
            detail = " ".join(str(exc).split())
            raise ComponentError(
                f"{self.group} entry point {self.name!r} = {self.value!r} (from "
                f"{self.distribution}) cannot be loaded: {type(exc).__name__}: {detail}"
            ) from None
        if not callable(obj) or not callable(getattr(obj, "run", None)):
            raise ComponentError(
                f"{self.group} entry point {self.name!r} = {self.value!r} (from "
                f"{self.distribution}) is not an actor class (no run method)"
            )
        return obj

    def summary(self) -> str:
        """The first sentence or paragraph of the component's docstring, on one
        line (loads it)."""
        doc = (self.load().__doc__ or "").strip().split("\n\n")[0]
        return " ".join(doc.split()).replace("``", "`")


def _checkout_entry_points() -> dict[str, dict[str, str]] | None:
    """{group: {name: value}} from the checkout's pyproject.toml, if flows runs from one."""
    try:
        project = tomllib.loads(_CHECKOUT.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    if project.get("name") != "flows":
        return None
    return project.get("entry-points", {})


def components(kind: str | None = None) -> list[Component]:
    """The registered components (of ``kind``: ``source`` or ``sink``):
    sources then sinks, by name. Nothing is imported: call ``Component.load()``."""
    if kind is not None and kind not in GROUPS:
        raise ValueError(f"kind must be one of {sorted(GROUPS)}, not {kind!r}")
    checkout = _checkout_entry_points()
    found: list[Component] = []
    for k, group in GROUPS.items():
        if kind is not None and k != kind:
            continue
        for ep in importlib.metadata.entry_points(group=group):
            dist = ep.dist.name if ep.dist is not None else "?"
            if checkout is not None and dist == "flows":
                continue  # the checkout's own list below describes the code that runs
            found.append(Component(k, ep.name, ep.value, dist))
        if checkout is not None:
            found += [Component(k, n, v, "flows") for n, v in checkout.get(group, {}).items()]
    order = list(GROUPS)
    return sorted(set(found), key=lambda c: (order.index(c.kind), c.name, c.distribution))


def load_component(kind: str, name: str) -> Any:
    """The class registered as ``name`` under ``kind`` (``source``/``sink``).

    ```python
    SyntheticMarket = load_component("source", "synthetic")
    ```
    """
    matches = [c for c in components(kind) if c.name == name]
    if not matches:
        known = ", ".join(c.name for c in components(kind)) or "none"
        raise ComponentError(f"no {kind} named {name!r} is registered (known: {known})")
    if len({c.value for c in matches}) > 1:
        raise ComponentError(f"{kind} {name!r} is registered by several packages: "
                             + ", ".join(f"{c.value} ({c.distribution})" for c in matches))
    return matches[0].load()


def all_metrics() -> dict[str, MetricFamily]:
    """Every metric family: the core ones (``flows.METRICS``) plus those each
    registered component declares, by name. Loads the components; one that
    cannot be loaded is skipped with a warning. Two different declarations
    of one name are a ValueError naming both declarers."""
    out: dict[str, MetricFamily] = dict(METRICS)
    owner = dict.fromkeys(METRICS, "flows.METRICS")
    for component in components():
        try:
            cls = component.load()
        except ComponentError as exc:
            log.warning("%s", exc)
            continue
        for family in declared_metrics(cls):
            known = out.setdefault(family.name, family)
            if known != family:
                raise ValueError(
                    f"metric {family.name} is declared differently by {owner[family.name]} "
                    f"and {component.value}: {known!r} and {family!r}"
                )
            owner.setdefault(family.name, component.value)
    return out
