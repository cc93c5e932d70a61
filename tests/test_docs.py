"""The README and the documentation site (docs/, mkdocs.yml): the README's
commands, every link resolves, every page is in the nav, every Python example
compiles and the README's example builds its Flow.

``mkdocs build --strict`` itself runs in ``.ci/run`` (it needs the ``docs``
extra); this module checks what can break without it, in well under a second.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

import flows

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

INSTALL_AND_RUN = "pip install -e . && python -m flows.run"
TEST_CMD = "pip install -e '.[test]' && python -m pytest"

LINK = re.compile(r"(?<!!)\[[^\]]+\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (links in code are not links)."""
    return FENCE.sub("", text)


def python_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == "python"]


def test_readme_is_short_and_holds_both_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for command in (INSTALL_AND_RUN, TEST_CMD):
        assert f"```sh\n{command}\n```" in text, command


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for match in LINK.finditer(prose(page.read_text())):
        url = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", url) or url.startswith("#"):
            continue
        target = (page.parent / url.split("#")[0]).resolve()
        if not target.exists():
            broken.append(url)
    assert not broken, f"{page.name}: links to missing files {broken}"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = re.findall(r":\s+(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    assert len(nav) == len(set(nav))
    missing = [p for p in nav if not (DOCS / p).exists()]
    assert not missing, f"mkdocs.yml names missing pages {missing}"
    unlisted = sorted(str(p.relative_to(DOCS)) for p in PAGES if str(p.relative_to(DOCS)) not in nav)
    assert not unlisted, f"pages not in mkdocs.yml's nav: {unlisted}"


def test_the_pages_the_issue_names_exist():
    names = {str(p.relative_to(DOCS)) for p in PAGES}
    assert {"index.md", "getting-started.md", "concepts.md", "graphs.md", "writing-a-component.md",
            "emulator.md", "benchmarks.md", "api.md", "operations/metrics.md",
            "operations/observing.md", "operations/scaling-out.md"} <= names
    for family in ("sources", "sinks"):
        modules = {p.stem for p in (ROOT / family).glob("*.py") if not p.stem.startswith("_")}
        pages = {Path(n).stem for n in names if n.startswith(f"{family}/")}
        assert modules <= pages, f"{family} without a page: {sorted(modules - pages)}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_compile(page):
    for i, block in enumerate(python_blocks(page.read_text())):
        try:
            compile(block, f"{page.name} block {i + 1}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        except SyntaxError as exc:
            pytest.fail(f"{page.name}, Python block {i + 1} does not compile: {exc}\n{block}")


def test_readme_example_builds_its_flow():
    (example,) = python_blocks(README.read_text())
    namespace: dict = {}
    exec(compile(example, "README example", "exec"), namespace)
    flow = namespace["flow"]
    assert isinstance(flow, flows.Flow)
    text = flow.validate().to_text()
    assert "change → sqlite" in text and "console (is_btc" in text


def standalone_flow_examples() -> list[tuple[str, str]]:
    """(where, code) of every docs example that starts with its imports and builds a Flow."""
    found = []
    for page in PAGES:
        for i, block in enumerate(python_blocks(page.read_text())):
            body = ast.parse(block).body
            if ("Flow(" in block and "Flow(...," not in block and body
                    and isinstance(body[0], ast.Import | ast.ImportFrom)):
                found.append((f"{page.relative_to(DOCS)} block {i + 1}", block))
    return found


@pytest.mark.parametrize(("where", "code"), standalone_flow_examples(), ids=lambda v: v if " block " in v else "")
def test_standalone_examples_build_their_flows(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, value in {"REDIS_URL": "redis://127.0.0.1:6379/0", "CONSUMER": "c1",
                        "PG_DSN": "postgresql://127.0.0.1/flows"}.items():
        monkeypatch.setenv(name, value)
    namespace: dict = {}
    exec(compile(code, where, "exec"), namespace)
    built = [v for v in namespace.values() if isinstance(v, flows.Flow)]
    for flow in built:
        flow.validate()


# -- one reference: a component's parameters live in its docstring, its metrics in its declarations

METRICS_MARKER = "<!-- metrics of the components above -->"
COMPONENT_PAGES = sorted([*(DOCS / "sources").glob("*.md"), *(DOCS / "sinks").glob("*.md")])
DIRECTIVE = re.compile(r"^::: ([\w.]+)$", re.MULTILINE)
PARAMETERS = re.compile(r"^Parameters:\n((?:(?: {4}.*)?\n)+)", re.MULTILINE)
PARAMETER = re.compile(r"^ {4}(\w+)(?: \([^)]*\))?:", re.MULTILINE)


def documented_parameters(cls: type) -> list[str]:
    """The names the docstring's Google-style ``Parameters:`` section documents."""
    doc = inspect.getdoc(cls) or ""
    section = PARAMETERS.search(doc + "\n")
    return PARAMETER.findall(section.group(1)) if section else []


def rendered_classes(page: Path) -> list[type]:
    found = []
    for path in DIRECTIVE.findall(page.read_text()):
        module, _, name = path.rpartition(".")
        found.append(getattr(importlib.import_module(module), name))
    return found


def registered_classes() -> list[type]:
    classes = []
    for component in flows.components():
        try:
            classes.append(component.load())
        except flows.ComponentError:  # an optional dependency missing: not ours to check
            continue
    return [c for c in classes if c.__module__.split(".")[0] in ("sources", "sinks")]


@pytest.mark.parametrize("page", COMPONENT_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_component_pages_have_no_hand_written_reference(page):
    text = page.read_text()
    tables = re.findall(r"^\| *(?:parameter|metric)\b.*\|$", text, re.MULTILINE | re.IGNORECASE)
    assert not tables, f"{page.name}: a hand-written reference table {tables} (docstrings hold it)"
    listed = re.findall(r"^\s*[-|] *`flows_\w+`", text, re.MULTILINE)
    assert not listed, f"{page.name}: metrics listed by hand {listed} (use {METRICS_MARKER})"


def test_every_registered_component_is_rendered_on_its_page():
    for cls in registered_classes():
        page = DOCS / f"{cls.__module__.replace('.', '/')}.md"
        assert cls in rendered_classes(page), f"{page.name} does not render ::: {cls.__module__}.{cls.__name__}"
        assert METRICS_MARKER in page.read_text(), f"{page.name} has no {METRICS_MARKER}"


@pytest.mark.parametrize("cls", [*registered_classes(), flows.HttpSource, flows.WebSocketSource, flows.BatchingSink],
                         ids=lambda c: c.__name__)
def test_every_parameter_is_documented_in_the_docstring(cls):
    """mkdocstrings renders the section as the page's parameter table, defaults from the signature."""
    signature = inspect.signature(cls)
    own = [p.name for p in signature.parameters.values()
           if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    documented = documented_parameters(cls)
    missing = [name for name in own if name not in documented]
    assert not missing, f"{cls.__name__}: parameters without a docstring entry: {missing}"
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        bases = [b.__name__ for b in cls.__mro__[1:] if b is not object]
        assert any(f"[{b}]" in (cls.__doc__ or "") for b in bases), \
            f"{cls.__name__} takes **options: its docstring must link the base whose parameters they are"


def option_rows(page: Path) -> dict[str, str]:
    """{first word of the option cell: default cell} of a page's ``| option | default | meaning |`` table."""
    text = page.read_text()
    table = text.split("| option | default | meaning |\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for row in table.splitlines():
        option, default = (cell.strip() for cell in row.strip("|").split("|")[:2])
        rows[option.strip("`").split()[0]] = default
    return rows


@pytest.mark.parametrize(("module", "page"), [("flows.run", "getting-started.md"),
                                              ("flows.top", "operations/observing.md")])
def test_command_line_tables_match_the_parsers(module, page):
    """The docs' option table and ``--help`` hold the same options and defaults."""
    parser = importlib.import_module(module)._parser()
    rows = option_rows(DOCS / page)
    options = {}
    for action in parser._actions:
        if action.dest == "help":
            continue
        name = action.option_strings[0] if action.option_strings else action.metavar or action.dest.upper()
        options[name] = action.default
    assert set(rows) == set(options), f"{page}: table {sorted(rows)} vs --help {sorted(options)}"
    for name, default in options.items():
        if default not in (None, False):
            assert f"`{default}`" in rows[name], f"{page}: {name} default {default!r}, table says {rows[name]}"
