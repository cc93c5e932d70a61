"""mkdocs hooks (mkdocs.yml ``hooks:``): a component page's Metrics section.

A page under ``docs/sources/`` or ``docs/sinks/`` holds the marker below
where its metrics go; the hook writes there the families its rendered
components (its ``::: module.Class`` lines) declare, so the list comes from
the declarations and is written nowhere else.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import metrics_reference

MARKER = "<!-- metrics of the components above -->"
DIRECTIVE = re.compile(r"^::: ([\w.]+)$", re.MULTILINE)


def rendered_classes(markdown: str) -> list[type]:
    """The classes a page renders with ``::: module.Class``."""
    if str(HERE.parent) not in sys.path:  # mkdocs resets sys.path after loading the hooks
        sys.path.insert(0, str(HERE.parent))
    found = []
    for path in DIRECTIVE.findall(markdown):
        module, _, name = path.rpartition(".")
        found.append(getattr(importlib.import_module(module), name))
    return found


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    kind = "sink" if page.file.src_uri.startswith("sinks/") else "source"
    return markdown.replace(MARKER, metrics_reference.component_metrics(rendered_classes(markdown), kind))
