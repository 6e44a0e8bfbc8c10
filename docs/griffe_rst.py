"""A griffe extension: the package's docstrings use Sphinx markup; the site renders Markdown.

It rewrites every docstring of the loaded package before mkdocstrings renders it:

- roles (``:class:`~a.b.C```, ``:func:`name```, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``, ``:exc:``) become
  cross-references (``[`C`][a.b.C]``) when the name resolves, from the object's own scope, to a public object of
  the package, and inline code otherwise (a private name, or another library's object); a cross-reference to a
  public object the reference does not render is a broken link, which ``mkdocs build --strict`` refuses;
- simple reStructuredText tables (``===== =====`` borders) become Markdown tables;
- literal blocks (a paragraph ending in ``::``, then an indented block) become fenced code blocks.

The docstrings stay as they are in the source (``help()`` and IDEs show them unchanged).
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|data|mod|exc|obj):`(~?)([^`<>]+?)`")
BORDER = re.compile(r"^( *)(=+)( +=+)+ *$")
SHELL_STARTS = ("lightning-clip", "python -m", "pip ", "$ ", "tensorboard")


def _public(path: str) -> bool:
    return all(not part.startswith("_") for part in path.split("."))


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` as written in ``obj``'s docstring, or ``None``."""
    if name.startswith("lightning_clip"):
        return name
    head, _, rest = name.partition(".")
    scopes: list[Any] = [obj, *_parents(obj)]
    for scope in scopes:
        member = scope.members.get(head) if hasattr(scope, "members") else None
        if member is not None:
            path = member.path if not member.is_alias else member.target_path
            return f"{path}.{rest}" if rest else path
    try:
        path = obj.resolve(head)
    except (griffe.NameResolutionError, AttributeError):
        return None
    return f"{path}.{rest}" if rest else path


def _parents(obj: griffe.Object) -> list[griffe.Object]:
    out = []
    parent = obj.parent
    while parent is not None:
        out.append(parent)
        parent = parent.parent
    return out


def _roles(text: str, obj: griffe.Object, package: griffe.Module) -> str:
    def replace(match: re.Match[str]) -> str:
        kind, tilde, target = match.group(1), match.group(2), match.group(3).strip()
        title = target.rsplit(".", 1)[-1] if tilde else target
        if kind in ("func", "meth"):
            title += "()"
        path = _resolve(obj, target)
        if path is None or not path.startswith(package.name + ".") and path != package.name:
            return f"`{title}`"
        try:
            found = package.modules_collection.get_member(path) if hasattr(package, "modules_collection") else None
        except (KeyError, ValueError):
            found = None
        if found is None:
            found = _lookup(package, path)
        if found is None or not _public(path) or not _is_public(found):
            return f"`{title}`"
        return f"[`{title}`][{path}]"

    return ROLE.sub(replace, text)


def _is_public(obj: Any) -> bool:
    """Public, and so rendered: griffe's rule (``__all__`` where a module has one), up to the module."""
    node = obj
    while node is not None and not getattr(node, "is_module", False):
        if not node.is_public:
            return False
        node = node.parent
    return True


def _lookup(package: griffe.Module, path: str) -> griffe.Object | griffe.Alias | None:
    parts = path.split(".")[1:]
    node: Any = package
    for part in parts:
        members = getattr(node, "members", None)
        if not members or part not in members:
            return None
        node = members[part]
    return node


def _rows(lines: list[str], spans: list[int]) -> list[list[str]]:
    """The rows of a table body; a line whose first cell is empty continues the row above."""
    rows: list[list[str]] = []
    for line in lines:
        if not line.strip():
            continue
        bounds = [*spans[1:], None]
        cells = [line[a:b].strip() for a, b in zip(spans, bounds)]
        if rows and not cells[0]:
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    return rows


def _border_after(lines: list[str], start: int) -> int | None:
    """The index of the border closing the rows from ``start`` (no blank line between), or ``None``."""
    k = start
    while k < len(lines) and lines[k].strip() and not BORDER.match(lines[k]):
        k += 1
    return k if k < len(lines) and k > start and BORDER.match(lines[k]) else None


def _tables(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = BORDER.match(lines[i])
        first = _border_after(lines, i + 1) if m else None
        if m is None or first is None:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group(1)
        spans = [mm.start() for mm in re.finditer(r"=+", lines[i])]
        second = _border_after(lines, first + 1)
        if second is not None:  # a header, then the body
            header = [" ".join(c).strip() for c in zip(*_rows(lines[i + 1:first], spans))]
            body, end = _rows(lines[first + 1:second], spans), second
        else:
            header, body, end = [""] * len(spans), _rows(lines[i + 1:first], spans), first
        if out and out[-1].strip():
            out.append("")
        out.append(indent + "| " + " | ".join(header) + " |")
        out.append(indent + "|" + "|".join("---" for _ in spans) + "|")
        out.extend(indent + "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body)
        out.append("")
        i = end + 1
    return "\n".join(out)


def _literal_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            base = len(line) - len(line.lstrip())
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and len(lines[j]) - len(lines[j].lstrip()) > base:
                block: list[str] = []
                while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base):
                    block.append(lines[j])
                    j += 1
                while block and not block[-1].strip():
                    block.pop()
                strip = min(len(b) - len(b.lstrip()) for b in block if b.strip())
                body = [b[strip:] for b in block]
                lang = "bash" if body[0].lstrip().startswith(SHELL_STARTS) else "python"
                intro = line.rstrip()[:-2].rstrip()
                pad = " " * base
                if intro.strip():
                    out.append(intro + ":")
                    out.append("")
                out.append(pad + "```" + lang)
                out.extend(pad + b if b.strip() else "" for b in body)
                out.append(pad + "```")
                out.append("")
                i = j
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


ARGS = re.compile(r"^(?P<indent> *)(?:Args|Arguments|Parameters):\s*$")
NAMES = re.compile(r"^\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+$")


def _grouped_args(text: str) -> str:
    """``a, b, c: what they are`` in an ``Args:`` section becomes one entry per name (the same description)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        m = ARGS.match(lines[i])
        i += 1
        if not m:
            continue
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(m["indent"])):
            entry_indent = len(lines[i]) - len(lines[i].lstrip())
            j = i + 1
            while j < len(lines) and lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) > entry_indent:
                j += 1
            entry = " ".join(line.strip() for line in lines[i:j])
            head, sep, description = entry.partition(": ")
            if sep and NAMES.match(head.strip()):
                pad = " " * entry_indent
                out.extend(f"{pad}{name.strip()}: {description}" for name in head.split(","))
            else:
                out.extend(lines[i:j])
            i = j
    return "\n".join(out)


def convert(text: str, obj: griffe.Object, package: griffe.Module) -> str:
    """The Markdown form of one docstring of ``package``."""
    return _roles(_literal_blocks(_tables(_grouped_args(text))), obj, package)


def _walk(obj: Any, seen: set[int]) -> Any:
    if id(obj) in seen or obj.is_alias:
        return
    seen.add(id(obj))
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member, seen)


def _runtime_signature(func: griffe.Function) -> None:
    """Give ``func`` the parameters of its ``__signature__`` when the code sets one at import time (a module that
    needs an optional extra not installed keeps the signature of its source)."""
    try:
        owner: Any = importlib.import_module(func.module.path)
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and (err.name or "").startswith("lightning_clip"):
            raise
        return
    for part in func.path[len(func.module.path) + 1:].split("."):
        owner = getattr(owner, part, None)
    signature = getattr(owner, "__dict__", {}).get("__signature__")
    if not isinstance(signature, inspect.Signature):
        return
    source_names = {p.kind: p.name for p in func.parameters if p.kind.name.startswith("var_")}
    params = []
    for p in signature.parameters.values():
        kind = griffe.ParameterKind(p.kind.description)
        annotation = None if p.annotation is p.empty else (
            p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation))
        default = None if p.default is p.empty else repr(p.default)
        name = source_names.get(kind, p.name)  # the source's name of *args / **kwargs, as its docstring says
        params.append(griffe.Parameter(name, annotation=annotation, kind=kind, default=default))
    func.parameters = griffe.Parameters(*params)


class SphinxMarkupToMarkdown(griffe.Extension):
    """Rewrite the Sphinx markup of every docstring of the loaded package as Markdown."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg, set()):
            if obj.is_function:
                _runtime_signature(obj)
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj, pkg)
