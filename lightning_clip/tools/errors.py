"""Configuration errors as one line that names the option (``lightning-clip`` prints it and exits 2).

jsonargparse reports a bad value deep in a YAML file as a tree of nested union/subclass errors
ending in a dump of the whole value ("Expected a <class 'str'>. Got value: {...}"). This module
reads that tree and says what is wrong where:

- an unknown key: ``trainer.strategy (ARCDDPStrategy): unknown option `num_byzantines`; did you
  mean `num_byzantine`?`` (the valid options come from the class's signature, as jsonargparse
  resolves it, ``**kwargs`` forwarding included);
- a value of the wrong kind: ``trainer.callbacks (GradientClipping): invalid value 'abc' for
  `threshold`: it takes a positive number (fixed) or a threshold policy (ThresholdPolicy classes:
  FixedThreshold, ...)`` (from the parameter's docstring and its type's subclasses);
- a registered strategy name (``ddp_arc``) given ``init_args``: which ``class_path`` to write;
- otherwise a constructor's own message, prefixed by the class that raised it.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import re
import traceback
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = ["UsageError", "describe_error"]


class UsageError(Exception):
    """An error in what the user asked for (exit status 2)."""


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        out.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ if cur.__cause__ is not None else (
            None if cur.__suppress_context__ else cur.__context__)
    return out


# --------------------------------------------------------------------------------------------------
# jsonargparse's error text as a tree.

_KEY_RE = re.compile(r'^Parser key "([^"]+)":?$')
_CLASS_RE = re.compile(r"^Problem with given class_path '([^']+)':?$")
_UNKNOWN_RE = re.compile(r"^Option '([^']+)' is not accepted")
_MISMATCH_RE = re.compile(r"^(Expected a dot import path string: |Not a valid subclass of |Expected a <class |"
                          r"Expected a path but )")
_TYPE_RE = re.compile(r"<class '([\w.]+)'>")


@dataclass
class _Node:
    text: str
    indent: int
    parent: _Node | None = None
    children: list[_Node] = field(default_factory=list)

    def ancestors(self) -> list[_Node]:
        """From the root down to the parent."""
        out = []
        node = self.parent
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    @property
    def key(self) -> str | None:
        """The option of a ``Parser key "..."`` line."""
        m = _KEY_RE.match(self.text)
        return m.group(1) if m else None

    @property
    def class_path(self) -> str | None:
        """The class of a ``Problem with given class_path '...'`` line."""
        m = _CLASS_RE.match(self.text)
        return m.group(1) if m else None

    def child_value(self, prefix: str) -> str | None:
        """The rest of the first child line that starts with ``prefix``."""
        return next((c.text[len(prefix):].strip() for c in self.children if c.text.startswith(prefix)), None)


def _tree(text: str) -> list[_Node]:
    """Every line of ``text`` as a node whose parent is the nearest line above it indented less."""
    nodes: list[_Node] = []
    stack: list[_Node] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped:
            continue
        indent = len(raw) - len(raw.lstrip())
        node = _Node(stripped[2:] if stripped.startswith("- ") else stripped, indent)
        while stack and stack[-1].indent >= indent:
            stack.pop()
        if stack:
            node.parent = stack[-1]
            stack[-1].children.append(node)
        stack.append(node)
        nodes.append(node)
    return nodes


def _where(path: list[_Node]) -> str:
    """``trainer.callbacks (GradientClipping) > threshold (PercentileThreshold)`` from the key/class lines."""
    parts: list[str] = []
    for node in path:
        if node.key is not None:
            parts.append(node.key)
        elif node.class_path is not None:
            name = node.class_path.rsplit(".", 1)[-1]
            if parts:
                parts[-1] += f" ({name})"
            else:
                parts.append(name)
    return " > ".join(parts)


# --------------------------------------------------------------------------------------------------
# What a class accepts.


def _import(path: str) -> Any:
    import importlib

    module, _, name = path.rpartition(".")
    if not module:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _class_parser(cls: type) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, fail_untyped=False)
    return parser


def _options(cls: type) -> list[str]:
    """The init arguments jsonargparse accepts for ``cls`` (``**kwargs`` resolved as it resolves them)."""
    try:
        keys = list(_class_parser(cls).get_defaults().keys())
    except Exception:  # fall back on the plain signature
        keys = [p.name for p in inspect.signature(cls).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return list(dict.fromkeys(k.split(".")[0] for k in keys))


def _own_options(cls: type) -> list[str]:
    """The named parameters of ``cls.__init__`` itself (what a short list of valid options shows)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _param_help(cls: type, name: str) -> str | None:
    """The first sentence of the docstring of ``cls``'s parameter ``name``, if jsonargparse found one."""
    try:
        actions = _class_parser(cls)._actions
    except Exception:
        return None
    text = next((a.help for a in actions if a.dest == name and isinstance(a.help, str)), None)
    if not text:
        return None
    text = " ".join(text.replace("``", "").split())
    return text.split(". ")[0].rstrip(".")


def _subclass_names(cls: type, limit: int = 8) -> list[str]:
    """Public concrete subclasses of ``cls`` (``cls`` too when concrete), by name."""
    seen: dict[str, None] = {}
    todo = [cls]
    while todo:
        c = todo.pop(0)
        if not inspect.isabstract(c) and not c.__name__.startswith("_") and c is not cls:
            seen.setdefault(c.__name__)
        todo.extend(c.__subclasses__())
    names = sorted(seen)
    return names if len(names) <= limit else [*names[:limit], "..."]


_KINDS = {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false", "NoneType": "null"}


def _kinds(subtypes: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """A union's members from its ``Subtypes: [...]`` line: plain kinds, and classes with their subclasses."""
    plain: list[str] = []
    classes: list[tuple[str, list[str]]] = []
    for path in _TYPE_RE.findall(subtypes):
        name = path.rsplit(".", 1)[-1]
        if name in _KINDS:
            plain.append(_KINDS[name])
            continue
        cls = _import(path)
        subs = _subclass_names(cls) if isinstance(cls, type) else []
        classes.append((name, subs))
    return plain, classes


def _suggest(bad: str, options: list[str]) -> str:
    close = difflib.get_close_matches(bad, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    return "valid options: " + ", ".join(options)


# --------------------------------------------------------------------------------------------------
# The messages.


def _unknown_option(leaf: _Node, option: str) -> str:
    path = leaf.ancestors()
    class_path = next((n.class_path for n in reversed(path) if n.class_path is not None), None)
    bad = option.split(".")[0]
    where = _where(path)
    msg = f"{where}: unknown option `{bad}`" if where else f"unknown option `{bad}`"
    if class_path is not None:
        cls = _import(class_path)
        if isinstance(cls, type):
            options = _options(cls)
            owners = _callbacks_with_option(bad) if _nested_arg(leaf) else []
            if owners and cls.__name__ not in owners:
                return (f"{msg}: on the command line `--trainer.callbacks.{bad}=...` sets an option of the LAST "
                        f"callback in the list ({cls.__name__}); `{bad}` is an option of {' / '.join(owners)}: "
                        "change it in the YAML file")
            suggestion = _suggest(bad, options)
            if suggestion.startswith("valid"):
                suggestion = _suggest(bad, _own_options(cls) or options)
            msg += f"; {suggestion}"
    return msg


def _nested_arg(leaf: _Node) -> bool:
    """Whether the failing value came from one command-line ``--a.b.option=value`` (jsonargparse's NestedArg)."""
    root = leaf.ancestors()[0] if leaf.ancestors() else leaf
    return any("NestedArg(" in (n.child_value("Given value:") or "") for n in [root, *_descendants(root)])


def _descendants(node: _Node) -> list[_Node]:
    out: list[_Node] = []
    todo = list(node.children)
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(n.children)
    return out


def _callbacks_with_option(option: str) -> list[str]:
    """This package's callbacks that take ``option``."""
    import importlib

    try:
        module = importlib.import_module("lightning_clip.callbacks")
    except ImportError:  # pragma: no cover - the CLI imports Lightning anyway
        return []
    return [name for name in getattr(module, "__all__", [])
            if isinstance(cls := getattr(module, name, None), type) and option in _own_options(cls)]


def _registered_strategy(name: str) -> type | None:
    try:
        from lightning.pytorch.strategies import StrategyRegistry
    except ImportError:  # pragma: no cover - Lightning is a dependency
        return None
    entry = dict.get(StrategyRegistry, name)  # the registry's own get() instantiates the strategy
    strategy = entry.get("strategy") if isinstance(entry, dict) else None
    return strategy if isinstance(strategy, type) else None


def _given_init_args(union: _Node) -> list[str]:
    """The init_args keys of the value a union was given (a dict, or one command-line NestedArg)."""
    given = union.child_value("Given value:") or ""
    nested = re.match(r"NestedArg\(key='([^']+)'", given)
    if nested:
        return [nested.group(1).split(".")[-1]]
    try:
        value = ast.literal_eval(given)
    except (ValueError, SyntaxError):
        return []
    init_args = value.get("init_args") if isinstance(value, dict) else None
    return list(init_args) if isinstance(init_args, dict) else []


def _typed_param(leaf: _Node, union: _Node | None) -> str | None:
    """A plain typed parameter of a class inside the union given a value of the wrong kind (``num_byzantine: one``)."""
    inner = leaf.parent
    if inner is None or inner.key is None or (union is not None and union not in inner.ancestors()):
        return None
    kind_m = _TYPE_RE.search(leaf.text)
    if kind_m is None or not leaf.text.startswith("Expected a <class "):
        return None
    kind_name = kind_m.group(1).rsplit(".", 1)[-1]
    kind = _KINDS.get(kind_name, f"a {kind_name}")
    got = leaf.text.split("Got value:", 1)[1].strip() if "Got value:" in leaf.text else ""
    owner_path = next((n.class_path for n in reversed(inner.ancestors()) if n.class_path is not None), None)
    owner = _import(owner_path) if owner_path is not None else None
    doc = _param_help(owner, inner.key) if isinstance(owner, type) else None
    where = _where(inner.ancestors())
    prefix = f"{where}: " if where else ""
    return f"{prefix}invalid value {got!r} for `{inner.key}`: it takes {kind}" + (f" ({doc})" if doc else "")


def _mismatch(leaf: _Node) -> str | None:
    union = next((n for n in reversed(leaf.ancestors()) if n.child_value("Subtypes:") is not None), None)
    typed = _typed_param(leaf, union)
    if typed is not None:
        return typed
    param = union.key if union is not None else None
    if union is None or param is None:
        return None
    path = union.ancestors() + [union]
    where = _where(union.ancestors())
    name_m = re.match(r"Expected a dot import path string: (\S+)", leaf.text)
    name = name_m.group(1) if name_m else ""
    strategy = _registered_strategy(name) if name else None
    if strategy is not None:
        path_txt = f"{strategy.__module__}.{strategy.__qualname__}"
        note = (f"`{name}` is a registered strategy name, which takes no init_args: write `class_path: {path_txt}` "
                "with them")
        options = _options(strategy)
        bad = [k for k in _given_init_args(union) if k not in options]
        if bad:
            return (f"{_where(path)} ({strategy.__name__}): unknown option `{bad[0]}`; {_suggest(bad[0], options)} "
                    f"({note})")
        return f"{_where(path)}: {note}"
    value = union.child_value("Given value:") or ""
    value = value if len(value) <= 80 else value[:77] + "..."
    plain, classes = _kinds(union.child_value("Subtypes:") or "")
    owner_path = next((n.class_path for n in reversed(union.ancestors()) if n.class_path is not None), None)
    owner = _import(owner_path) if owner_path is not None else None
    takes = _param_help(owner, param) if isinstance(owner, type) else None
    if takes is None:
        described = [f"a {name} ({', '.join(subs)})" if subs else f"a {name}" for name, subs in classes]
        takes = " or ".join(plain + described) or "another kind of value"
    elif classes:
        takes += " (" + "; ".join(f"{name} classes: {', '.join(subs)}" if subs else name
                                  for name, subs in classes) + ")"
    prefix = f"{where}: " if where else ""
    return f"{prefix}invalid value {value!r} for `{param}`: it takes {takes}"


def _from_tree(text: str) -> str | None:
    """The message for jsonargparse's nested union/subclass error ``text``, if it is one of ours."""
    nodes = _tree(text)
    leaves = [n for n in nodes if not n.children]
    unknown = [(n, m.group(1)) for n in leaves if (m := _UNKNOWN_RE.match(n.text))]
    if unknown:
        leaf, option = max(unknown, key=lambda lo: len(lo[0].ancestors()))
        return _unknown_option(leaf, option)
    mismatches = [n for n in leaves if _MISMATCH_RE.match(n.text)]
    # The deepest first; at one depth, a class path that did not resolve says most.
    for leaf in sorted(mismatches, key=lambda n: (-len(n.ancestors()), not n.text.startswith("Expected a dot"))):
        msg = _mismatch(leaf)
        if msg is not None:
            return msg
    return None


# --------------------------------------------------------------------------------------------------
# A constructor's own message.


def _owner(tb: TracebackType | None) -> str | None:
    """Name of the innermost class (of this package, or a user class being constructed) that raised."""
    frames = list(traceback.walk_tb(tb))
    for frame, _ in reversed(frames):
        obj = frame.f_locals.get("self")
        if obj is None:
            continue
        module = type(obj).__module__ or ""
        if module.startswith("lightning_clip") and not module.startswith(
            ("lightning_clip.exceptions", "lightning_clip.tools.cli", "lightning_clip.tools.errors")
        ):
            return type(obj).__name__
        if frame.f_code.co_name == "__init__" and not module.startswith(
            ("lightning", "jsonargparse", "torch", "argparse", "builtins")
        ):
            return type(obj).__name__
    return None


def _one_paragraph(text: str, limit: int = 1200) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    # jsonargparse appends dumps of the whole value ("Given value: ..."); they are noise here.
    kept = [ln for ln in lines if not ln.startswith(("Given value", "Subclass types expect", "- a ", "Subtypes:"))]
    msg = " ".join(kept or lines)
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _parser_key(chain: list[BaseException]) -> str | None:
    for e in chain:
        m = re.search(r'[Kk]ey "([^"]+)"', str(e))
        if m:
            return m.group(1)
    return None


def _union_constructor_error(chain: list[BaseException]) -> str | None:
    """A class's own message among a union's member errors (jsonargparse tries ``str`` too and reports both).

    ``trainer.strategy`` is ``str | Strategy``: when ``ARCDDPStrategy(...)`` raises a cross-field error at
    instantiation, the union's list holds "Expected a <class 'str'>" and the constructor's message; the
    latter is the one to show, with the class and the option it came from.
    """
    for e in chain:
        text = str(e)
        if "Does not validate against any of the Union subtypes" not in text or "Errors:" not in text:
            continue
        nodes = _tree(text)
        errors = next((n for n in nodes if n.text == "Errors:"), None)
        if errors is None:
            continue
        said = [c for c in errors.children if not c.children and not _MISMATCH_RE.match(c.text)
                and not c.text.startswith(("Problem with given class_path", "Not a valid subclass"))]
        if not said:
            continue
        key = next((n.key for n in nodes if n.key is not None), None) or _parser_key(chain)
        given = re.search(r"class_path='([\w.]+)'", text) or re.search(r"'class_path': '([\w.]+)'", text)
        owner = given.group(1).rsplit(".", 1)[-1] if given else None
        where = key or ""
        if owner:
            where = f"{where} ({owner})" if where else owner
        return f"{where}: {said[0].text}" if where else said[0].text
    return None


def describe_error(exc: BaseException) -> str:
    """The user-facing one-line message of a configuration error, naming the option."""
    chain = _chain(exc)
    union_said = _union_constructor_error(chain)
    if union_said is not None:
        return _one_paragraph(union_said)
    # A constructor's own check ("Expected argument `mode` to be one of ...") is the most precise.
    said = next((e for e in reversed(chain) if "Expected argument" in str(e)), None)
    if said is None:
        for e in chain:
            msg = _from_tree(str(e))
            if msg is not None:
                return _one_paragraph(msg)
    # The root cause is what a constructor said; the outer layers are jsonargparse's union/subclass wrapping.
    root = said or next((e for e in reversed(chain) if isinstance(e, (ValueError, TypeError))), chain[-1])
    text = str(root) or type(root).__name__
    # jsonargparse folds the errors of a Union's members into one text; keep the constructor's own line.
    ours = [ln.strip().lstrip("- ").strip() for ln in text.splitlines() if "Expected argument" in ln]
    msg = _one_paragraph(ours[0] if ours else text)
    owner = _owner(root.__traceback__)
    if owner and not msg.startswith(owner):
        msg = f"{owner}: {msg}"
    key = _parser_key(chain)
    if key and key not in msg:
        msg = f"{msg} (option `{key}`)"
    return msg
