"""Discovering components through entry points: what flows ships, what another
package adds, a broken registration, and `python -m flows.run --list`."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from _cli import ROOT

import flows
from flows import Component, ComponentError, components, load_component
from flows.run import demo_flow

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]


def shipped_actor_classes() -> set[str]:
    """``module:Class`` of every public class with a ``run`` method in sources/ and sinks/."""
    found = set()
    for package in ("sources", "sinks"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.stem.startswith("_"):
                continue
            module = importlib.import_module(f"{package}.{path.stem}")
            for name in getattr(module, "__all__", ()):
                obj = getattr(module, name)
                if inspect.isclass(obj) and inspect.iscoroutinefunction(getattr(obj, "run", None)):
                    found.add(f"{module.__name__}:{name}")
    return found


def test_every_shipped_source_and_sink_is_registered():
    registered = {c.value: c for c in components() if c.distribution == "flows"}
    assert set(registered) == shipped_actor_classes()
    for c in registered.values():
        cls = c.load()
        assert c.kind == ("source" if c.value.startswith("sources.") else "sink")
        assert c.group == f"flows.{c.kind}s"
        assert PYPROJECT[c.group][c.name] == c.value
        summary = c.summary()
        assert summary.startswith(f"{c.kind.capitalize()}: "), (c.name, summary)
        assert "\n" not in summary and "``" not in summary
        assert load_component(c.kind, c.name) is cls


def test_components_by_kind_and_unknown_names():
    sources, sinks = components("source"), components("sink")
    assert {c.kind for c in sources} == {"source"} and {c.kind for c in sinks} == {"sink"}
    assert components() == sources + sinks
    assert load_component("source", "synthetic").__name__ == "SyntheticMarket"
    with pytest.raises(ComponentError, match=r"no sink named 'nope' is registered \(known: .*sqlite"):
        load_component("sink", "nope")
    with pytest.raises(ValueError, match="kind"):
        components("stage")


def test_the_installed_entry_points_match_the_checkout_when_installed_from_it(monkeypatch, tmp_path):
    """When flows is installed (pip install -e .), its metadata carries the same
    entry points as pyproject.toml, and the registry finds them there alone."""
    try:
        dist = importlib.metadata.distribution("flows")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("flows is not installed: the registry reads pyproject.toml")
    installed = {(ep.group, ep.name, ep.value) for ep in dist.entry_points
                 if ep.group in flows._registry.GROUPS.values()}
    if not installed:
        pytest.skip("the installed flows metadata predates its entry points: pip install -e .")
    assert installed == {(g, n, v) for g in PYPROJECT if g.startswith("flows.")
                         for n, v in PYPROJECT[g].items()}
    from_checkout = components()
    monkeypatch.setattr(flows._registry, "_CHECKOUT", tmp_path / "no-pyproject.toml")
    assert components() == from_checkout  # from the installed metadata only


def test_flows_run_loads_plugins_only_through_the_registry():
    tree = ast.parse((ROOT / "flows" / "run.py").read_text())
    imported = {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
    assert not imported & {"sources", "sinks"}
    flow = demo_flow(":memory:")
    kinds = {type(a).__name__: type(a) for a in [*flow.sources, *flow.sinks]}
    assert kinds["SyntheticMarket"] is load_component("source", "synthetic")
    assert kinds["SQLiteSink"] is load_component("sink", "sqlite")
    assert kinds["ConsoleSink"] is load_component("sink", "console")


# -- a third-party package -------------------------------------------------------------

THIRD_PARTY = '''
"""A component package that is not flows."""

from flows import Batch, MetricFamily, Outbox, Tick

PINGS = MetricFamily("flows_source_pings_total", "counter", "Pings sent, by outcome.",
                     labels=("reason",))


class PingSource:
    """Source: pings an exchange and sends one Tick.

    More text that --list does not show.
    """

    METRICS = (PINGS,)

    def __init__(self, name="ping"):
        self.name = name

    async def run(self, outbox: Outbox) -> None:
        outbox.metrics.labeled(PINGS, "ok").inc()
        await outbox.send(Batch([Tick(self.name, "BTC", 1.0, 1.0)]))


class NotAnActor:
    """Nothing to run."""
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A site directory holding an installed package ``flows-ping`` whose
    entry points register a source, a sink that does not import and a
    class that is not an actor."""
    site = tmp_path / "site"
    (site / "flows_ping").mkdir(parents=True)
    (site / "flows_ping" / "__init__.py").write_text(THIRD_PARTY)
    info = site / "flows_ping-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flows-ping\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[flows.sources]\n"
        "ping = flows_ping:PingSource\n"
        "idle = flows_ping:NotAnActor\n"
        "\n[flows.sinks]\n"
        "broken = flows_ping_missing.sink:Nope\n"
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    sys.modules.pop("flows_ping", None)


def test_another_package_registers_a_component_and_its_metrics(third_party):
    theirs = {c.name: c for c in components() if c.distribution == "flows-ping"}
    assert set(theirs) == {"ping", "idle", "broken"}
    assert theirs["ping"] == Component("source", "ping", "flows_ping:PingSource", "flows-ping")
    assert theirs["ping"].summary() == "Source: pings an exchange and sends one Tick."
    assert load_component("source", "ping").__name__ == "PingSource"
    assert flows.all_metrics()["flows_source_pings_total"].labels == ("reason",)
    with pytest.raises(ComponentError) as info:
        theirs["broken"].load()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("flows.sinks entry point 'broken' = 'flows_ping_missing.sink:Nope' "
                              "(from flows-ping) cannot be loaded: ModuleNotFoundError")
    with pytest.raises(ComponentError, match=r"'idle' .* is not an actor class"):
        theirs["idle"].load()


def list_cli(*site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, site)])}
    return subprocess.run([sys.executable, "-m", "flows.run", "--list"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_list_prints_one_line_per_component_with_its_doc():
    proc = list_cli()
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == len(components())
    kinds = [line.split()[0] for line in lines]
    assert kinds == sorted(kinds, key=["source", "sink"].index)  # sources, then sinks
    by_name = {(line.split()[0], line.split()[1]): line for line in lines}
    assert by_name[("source", "synthetic")].split(None, 3)[2:] == [
        "sources.synthetic:SyntheticMarket", "Source: a random-walk market."]
    assert by_name[("sink", "sqlite")].split(None, 3)[2:] == [
        "sinks.sqlite:SQLiteSink", "Sink: store Ticks in a SQLite table."]


def test_list_reports_a_broken_entry_point_in_one_line(third_party):
    proc = list_cli(third_party)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == 2, proc.stderr
    assert errors[0].startswith("flows: error: flows.sources entry point 'idle'")
    assert errors[1].startswith("flows: error: flows.sinks entry point 'broken' = "
                                "'flows_ping_missing.sink:Nope' (from flows-ping) cannot be loaded: "
                                "ModuleNotFoundError: No module named 'flows_ping_missing'")
    ping = [line for line in proc.stdout.splitlines() if " ping " in line]
    assert len(ping) == 1 and ping[0].split()[:3] == ["source", "ping", "flows_ping:PingSource"]
    assert ping[0].endswith("Source: pings an exchange and sends one Tick.")
    assert "synthetic" in proc.stdout  # the rest is still listed
