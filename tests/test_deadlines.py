"""Every polling wait in the tests has a deadline, so a regression fails
instead of spinning forever (in virtual time, under ``MockClock``).

A polling wait is a ``while`` loop that sleeps or yields between checks:
``await trio.sleep(...)``, ``trio.lowlevel.checkpoint()``,
``wait_all_tasks_blocked()`` in async code, ``time.sleep(...)`` in sync
code. An async one must sit inside ``with trio.fail_after(...)`` (or
``move_on_after``, or ``flows.testing.deadline``, which says what was
awaited), or be ``flows.testing.wait_until``; a sync one (a subprocess, a
real server) must check ``time.monotonic()``. A loop that is not a wait (a
fake server's feed) says so with ``# not a wait:`` on its ``while`` line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import trio

from flows.testing import deadline, wait_until

ROOT = Path(__file__).resolve().parent.parent
CHECKED = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "flows" / "testing").glob("*.py"))
_YIELDS = {"sleep", "checkpoint", "wait_all_tasks_blocked"}
_DEADLINES = {"fail_after", "fail_at", "move_on_after", "move_on_at", "deadline"}


def _called(node: ast.AST, names: set[str]) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in names:
                return True
    return False


def _sets_deadline(node: ast.With | ast.AsyncWith) -> bool:
    return any(_called(item.context_expr, _DEADLINES) for item in node.items)


def _mentions_monotonic(loop: ast.While) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "monotonic" for n in ast.walk(loop))


def unbounded_waits(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line`` of each polling loop in ``path`` that has no deadline."""
    source = path.read_text()
    lines = source.splitlines()
    found: list[str] = []

    def visit(node: ast.AST, is_async: bool, bounded: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            is_async, bounded = isinstance(node, ast.AsyncFunctionDef), False
        elif isinstance(node, (ast.With, ast.AsyncWith)) and _sets_deadline(node):
            bounded = True
        elif isinstance(node, ast.While) and _called(ast.Module(node.body, []), _YIELDS):
            ok = bounded if is_async else _mentions_monotonic(node)
            if not ok and "# not a wait:" not in lines[node.lineno - 1]:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
        for child in ast.iter_child_nodes(node):
            visit(child, is_async, bounded)

    visit(ast.parse(source), False, False)
    return found


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_polling_wait_has_a_deadline(path):
    assert unbounded_waits(path) == []


def test_the_check_finds_an_unbounded_wait(tmp_path):
    sample = tmp_path / "t.py"
    sample.write_text(
        "import time, trio\n"
        "async def f(x):\n"
        "    while not x():\n"
        "        await trio.sleep(1)\n"
        "    with trio.fail_after(5):\n"
        "        while not x():\n"
        "            await trio.sleep(1)\n"
        "def g(x):\n"
        "    while not x():\n"
        "        time.sleep(1)\n"
    )
    found = [line.split(":")[1] for line in unbounded_waits(sample, tmp_path)]
    assert found == ["3", "9"]


async def test_a_deadline_says_what_was_awaited(autojump_clock):
    with pytest.raises(trio.TooSlowError, match="waited 5s .* for the moon"):
        with deadline(5, "the moon"):
            await trio.sleep_forever()
    with pytest.raises(trio.TooSlowError, match="lambda: False"):
        await wait_until(lambda: False, timeout=3)
