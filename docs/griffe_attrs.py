"""A griffe extension for the docs build: the ``__init__`` of attrs classes.

attrs writes a class's ``__init__`` at import time, so griffe's static
analysis sees no parameters: a docstring's ``Parameters:`` section would not
match the signature, and the rendered table would have no defaults. This
extension imports each attrs class and gives griffe the real signature.
mkdocs.yml loads it (``extensions: [docs/griffe_attrs.py]``).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import attrs
import griffe

ROOT = Path(__file__).resolve().parent.parent  # the checkout, whatever is installed

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


def _default(cls: type, parameter: inspect.Parameter) -> str | None:
    """The default as the docs show it (``None`` when the parameter is required)."""
    if parameter.default is inspect.Parameter.empty:
        return None
    if parameter.default is attrs.NOTHING:  # a factory: say what it makes
        field = {f.alias: f for f in attrs.fields(cls)}[parameter.name]
        factory = field.default.factory
        private = field.default.takes_self or factory.__name__.startswith("_")
        return "computed" if private else f"{factory.__name__}()"
    if isinstance(parameter.default, type):
        return parameter.default.__name__
    return repr(parameter.default)


def _attrs_init(node: griffe.Class) -> griffe.Function | None:
    """An ``__init__`` for ``node`` from the runtime class, if it is an attrs class."""
    try:
        cls = griffe.dynamic_import(node.path, import_paths=[ROOT, *sys.path])
    except ImportError:
        return None
    if not (isinstance(cls, type) and attrs.has(cls)):
        return None
    parameters = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
    for p in inspect.signature(cls).parameters.values():
        annotation = p.annotation if isinstance(p.annotation, str) else None
        parameters.append(griffe.Parameter(p.name, annotation=annotation, kind=_KINDS[p.kind],
                                           default=_default(cls, p)))
    return griffe.Function("__init__", lineno=0, endlineno=0, parent=node,
                           parameters=griffe.Parameters(*parameters), returns="None")


def _visit(obj: griffe.Object, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if isinstance(obj, griffe.Class) and "__init__" not in obj.members and any(
            "attr" in str(d.value) for d in obj.decorators):
        init = _attrs_init(obj)
        if init is not None:
            obj.set_member("__init__", init)
    for member in obj.members.values():
        if not member.is_alias and (member.is_module or member.is_class):
            _visit(member, seen)  # type: ignore[arg-type]


class AttrsInit(griffe.Extension):
    """Give attrs classes the ``__init__`` attrs generates."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _visit(pkg, set())
