"""A flow graph as text and as Mermaid, from its /status description.

Both work on the plain description ``/status`` serves (``actors`` with
``name`` and ``kind``, ``edges`` with ``from``, ``to``, ``branch``,
``policy``, ``capacity``), so ``python -m flows.run FILE --graph`` and
``python -m flows.top`` draw the same picture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["chain_line", "graph_lines", "mermaid"]

_SHAPES = {"source": ('(["', '"])'), "stage": ('["', '"]'), "sink": ('[("', '")]')}


def _edge_note(edge: Mapping[str, Any], *, capacity: bool) -> str:
    notes = []
    if edge.get("branch"):
        notes.append(str(edge["branch"]))
    policy = edge.get("policy", "block")
    if policy != "block":
        notes.append(policy)
    if capacity and edge.get("capacity") is not None:
        notes.append(f"capacity {edge['capacity']}")
    return ", ".join(notes)


def chain_line(status: Mapping[str, Any]) -> str | None:
    """``a, b → stage → sink1, [conflate] sink2`` when the graph is a chain
    (every layer feeds all of the next, no branches); else None."""
    actors = status.get("actors", [])
    edges = status.get("edges", [])
    if any(e.get("branch") for e in edges):
        return None
    feeds: dict[str, set[str]] = {}
    for e in edges:
        feeds.setdefault(e["from"], set()).add(e["to"])
    layer = [a["name"] for a in actors if a["kind"] == "source"]
    layers = [layer]
    seen = set(layer)
    while True:
        nxt = {c for name in layer for c in feeds.get(name, ())}
        if not nxt:
            break
        if any(feeds.get(name, set()) != nxt for name in layer) or nxt & seen:
            return None
        layer = [a["name"] for a in actors if a["name"] in nxt]
        layers.append(layer)
        seen |= nxt
    if len(seen) != len(actors):
        return None
    policy = {e["to"]: e.get("policy", "block") for e in edges}

    def name(n: str) -> str:
        p = policy.get(n, "block")
        return n if p == "block" else f"[{p}] {n}"

    return " → ".join(", ".join(name(n) for n in layer) for layer in layers if layer)


def graph_lines(status: Mapping[str, Any], *, capacity: bool = False) -> list[str]:
    """One line per producer: ``producer → consumer (branch, policy), ...``."""
    out = []
    for actor in status.get("actors", []):
        mine = [e for e in status.get("edges", []) if e["from"] == actor["name"]]
        if not mine:
            continue
        targets = []
        for e in mine:
            note = _edge_note(e, capacity=capacity)
            targets.append(f"{e['to']} ({note})" if note else e["to"])
        out.append(f"{actor['name']} → {', '.join(targets)}")
    return out


def _quote(text: str) -> str:
    return text.replace('"', "#quot;")


def mermaid(status: Mapping[str, Any]) -> str:
    """A Mermaid ``flowchart LR``: sources as stadiums, stages as boxes,
    sinks as cylinders; edges labelled with their branch and any
    non-blocking policy (dotted)."""
    ids = {a["name"]: f"n{i}" for i, a in enumerate(status.get("actors", []))}
    lines = ["flowchart LR"]
    for a in status.get("actors", []):
        left, right = _SHAPES.get(a["kind"], _SHAPES["stage"])
        lines.append(f"    {ids[a['name']]}{left}{_quote(a['name'])}{right}")
    for e in status.get("edges", []):
        note = _edge_note(e, capacity=False)
        dotted = e.get("policy", "block") != "block"
        arrow = "-.->" if dotted else "-->"
        label = f'|"{_quote(note)}"|' if note else ""
        lines.append(f"    {ids[e['from']]} {arrow}{label} {ids[e['to']]}")
    return "\n".join(lines)
