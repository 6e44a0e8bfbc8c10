"""The layers of the package, enforced: who may import whom.

=================================== ===================================================================
modules                             may not import (directly or through any module of ours they import)
=================================== ===================================================================
``core``, ``robust``, ``sim``,      Lightning, our Lightning glue (``callbacks``, ``distributed.strategy``)
``exceptions``, ``tags``            and ``tools``; nor ``torch.distributed`` directly, except
                                    ``core.dtensor_norms`` (the one batched norm reduction of sharded gradients)
``robust``, ``core``                also ``sim`` and ``distributed``
``sim``                             also ``distributed``
``distributed`` (all of it)         ``sim`` and ``callbacks`` (a simulated attack reaches the strategy as a
                                    send transform)
``distributed.hook``, ``.exchange`` also Lightning, our glue and ``tools``
``flower`` (all of it)              ``sim`` and ``callbacks`` (simulated sites reach it as transforms passed in);
                                    nothing but ``flower`` imports ``flwr`` (``import lightning_clip`` works
                                    without Flower, and ``lightning_clip.flower`` names the extra when it is missing)
everything outside ``tools``        ``tools``
every module                        another module's private (``_name``) names
=================================== ===================================================================

Two independent checks:

* source level: every ``import`` of every module (top level or inside functions, relative or absolute,
  ``importlib.import_module("...")`` with a literal) is parsed; imports of our own modules are followed
  transitively, so a rule cannot be dodged through an intermediate module;
* runtime: in a fresh interpreter where Lightning (and our Lightning glue) cannot be imported, every
  Lightning-free module is imported the way a user imports it, through the real package ``__init__`` files
  (the package re-exports its Lightning glue lazily, so a pure submodule must not pull it in).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest

PKG_DIR = Path(__file__).resolve().parents[1] / "lightning_clip"
PKG = "lightning_clip"

LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
GLUE = ("lightning_clip.callbacks", "lightning_clip.distributed.strategy", "lightning_clip.tools")
TORCH_DISTRIBUTED = ("torch.distributed",)

#: (modules the rule applies to, forbidden import prefixes), followed transitively through our modules
RULES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("lightning_clip.core", "lightning_clip.robust", "lightning_clip.sim", "lightning_clip.exceptions",
      "lightning_clip.tags"), LIGHTNING + GLUE),
    (("lightning_clip.core", "lightning_clip.robust"), ("lightning_clip.sim", "lightning_clip.distributed")),
    (("lightning_clip.sim",), ("lightning_clip.distributed",)),
    (("lightning_clip.distributed",), ("lightning_clip.sim", "lightning_clip.callbacks")),
    (("lightning_clip.distributed.hook", "lightning_clip.distributed.exchange"),
     ("lightning_clip.sim",) + LIGHTNING + GLUE),
    (("lightning_clip.flower",), ("lightning_clip.sim", "lightning_clip.callbacks")),
]

#: Modules that may issue collectives themselves: everything in DIRECT_RULES' scope but these must not
#: import ``torch.distributed`` directly (the one batched norm reduction for sharded gradients is in core).
COLLECTIVES_ALLOWED = ("lightning_clip.core.dtensor_norms",)
DIRECT_RULES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("lightning_clip.core", "lightning_clip.robust", "lightning_clip.sim", "lightning_clip.exceptions",
      "lightning_clip.tags"), TORCH_DISTRIBUTED),
]


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(module: str) -> bool:
    return (PKG_DIR.parent / module.replace(".", "/") / "__init__.py").exists()


def _exists(module: str) -> bool:
    base = PKG_DIR.parent / module.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _from_module(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name of the module ``from ... import`` reads in ``module`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = (module if is_package else module.rsplit(".", 1)[0]).split(".")
    return ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every module name ``source`` (the module ``module``) imports, as ``(line, dotted name)``."""
    tree = ast.parse(source)
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_module(node, module, is_package)
            out.append((node.lineno, base))
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one
            out.extend((node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            arg0 = node.args[0] if node.args else None
            if fname in ("import_module", "__import__") and isinstance(arg0, ast.Constant) and isinstance(
                arg0.value, str
            ):
                out.append((node.lineno, arg0.value))
    return out


@cache
def graph() -> dict[str, list[tuple[int, str]]]:
    """Every module of the package -> what it imports."""
    return {
        _module_name(path): imported_names(path.read_text(), _module_name(path), path.name == "__init__.py")
        for path in sorted(PKG_DIR.rglob("*.py"))
    }


def _own(name: str) -> str | None:
    """The module of ours that importing ``name`` runs (``None`` for a foreign module)."""
    if not _matches(name, (PKG,)):
        return None
    while name and not _exists(name):  # `from lightning_clip.x import Name`: the module is lightning_clip.x
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or None


def reach(module: str) -> dict[str, list[str]]:
    """Every name ``module`` imports directly or through our modules -> the import chain that gets there."""
    seen: dict[str, list[str]] = {}
    todo = [(module, [module])]
    visited = {module}
    while todo:
        current, chain = todo.pop()
        for line, name in graph().get(current, []):
            seen.setdefault(name, chain + [f"{name} (line {line} of {current})"])
            own = _own(name)
            if own is None:
                continue
            # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
            parts = own.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step not in visited and step in graph():
                    visited.add(step)
                    todo.append((step, chain + [f"{step} (line {line} of {current})"]))
    return seen


def _modules(prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in graph() if _matches(m, prefixes)]


CASES = [
    pytest.param(module, forbidden, id=f"{module} !-> {forbidden[0]}..")
    for prefixes, forbidden in RULES
    for module in _modules(prefixes)
]


@pytest.mark.parametrize(("module", "forbidden"), CASES)
def test_layer_rules(module, forbidden):
    bad = {name: chain for name, chain in reach(module).items() if _matches(name, forbidden)}
    assert not bad, f"{module} must not import {sorted(bad)}: " + " | ".join(" -> ".join(c) for c in bad.values())


DIRECT_CASES = [
    pytest.param(module, forbidden, id=f"{module} !-> {forbidden[0]} (direct)")
    for prefixes, forbidden in DIRECT_RULES
    for module in _modules(prefixes)
    if module not in COLLECTIVES_ALLOWED
]


@pytest.mark.parametrize(("module", "forbidden"), DIRECT_CASES)
def test_no_collectives_of_their_own(module, forbidden):
    bad = [f"line {line}: {name}" for line, name in graph()[module] if _matches(name, forbidden)]
    assert not bad, f"{module} must not use torch.distributed itself: {bad}"


def test_the_collective_exception_is_real():
    # The allowed module exists and really uses torch.distributed (the exception is not stale).
    for module in COLLECTIVES_ALLOWED:
        assert any(_matches(name, TORCH_DISTRIBUTED) for _, name in graph()[module]), module


def test_nothing_outside_tools_imports_tools():
    for module, names in graph().items():
        if _matches(module, ("lightning_clip.tools",)):
            continue
        bad = [f"line {line}: {name}" for line, name in names if _matches(name, ("lightning_clip.tools",))]
        assert not bad, f"{module} imports the tools: {bad}"


def test_every_layer_has_modules_and_the_rules_cover_them():
    # The rules are not vacuous: each names modules that exist.
    for prefixes, _ in RULES:
        for prefix in prefixes:
            assert _modules((prefix,)), prefix
    assert "lightning_clip.distributed.hook" in graph() and "lightning_clip.sim.byzantine" in graph()


def test_source_check_is_not_vacuous():
    sample = textwrap.dedent("""
        import torch
        import lightning.pytorch as pl
        from lightning_clip.callbacks.step import step_state
        from ..distributed import strategy
        from lightning_clip import GradientClipping
        def later():
            import pytorch_lightning
            importlib.import_module("lightning_fabric")
        if TYPE_CHECKING:
            import lightning_clip.tools.cli
    """)
    names = {n for _, n in imported_names(sample, "lightning_clip.robust.sample")}
    assert {"lightning.pytorch", "lightning_clip.callbacks.step", "lightning_clip.distributed.strategy",
            "lightning_clip.GradientClipping", "pytorch_lightning", "lightning_fabric", "torch"} <= names
    assert "lightning_clip.tools.cli" not in names  # only for type checkers: never imported at run time
    assert _matches("lightning_clip.distributed.strategy", GLUE) and not _matches("lightning_clipper", (PKG,))


def test_transitive_check_follows_our_modules():
    # The strategy reaches Lightning directly and the robust rules through the hook: both are seen.
    reached = reach("lightning_clip.distributed.strategy")
    assert any(_matches(n, LIGHTNING) for n in reached)
    assert any(_matches(n, ("lightning_clip.robust.rules",)) for n in reached)
    # The hook reaches torch.distributed (allowed) and the robust rules through the pipeline.
    hook = reach("lightning_clip.distributed.hook")
    assert "torch.distributed" in hook and any(_matches(n, ("lightning_clip.robust.rules",)) for n in hook)


def private_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Where ``source`` (the module ``module``) reaches a private (``_name``) name of another module of ours:
    ``from lightning_clip.x import _name``, or ``m._name`` through a name bound to one of our modules."""
    tree = ast.parse(source)
    bad: list[str] = []
    aliases: set[str] = set()  # local names bound to one of our modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _from_module(node, module, is_package)
            if not _matches(base, (PKG,)):
                continue
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    bad.append(f"line {node.lineno}: from {base} import {a.name}")
                elif _exists(f"{base}.{a.name}"):
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if _matches(a.name, (PKG,)):
                    aliases.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and ast.unparse(node.value).split(".")[0] in aliases):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    return bad


@pytest.mark.parametrize("path", sorted(PKG_DIR.rglob("*.py")), ids=lambda p: _module_name(p))
def test_no_module_reaches_another_modules_private_names(path):
    bad = private_imports(path.read_text(), _module_name(path), path.name == "__init__.py")
    assert not bad, f"{_module_name(path)} uses another module's private names: {bad}"


def test_private_import_check_is_not_vacuous():
    sample = textwrap.dedent("""
        from lightning_clip.robust.rules import _selected_rows, mean
        from .pipeline import _Prepare
        import lightning_clip.robust.rules as rules
        from lightning_clip.robust import pipeline
        from torch import _foreach_mul_
        rules._identity(1)
        pipeline._columns(2)
        pipeline.run(3)
    """)
    bad = private_imports(sample, "lightning_clip.robust.sample")
    assert [b.split(": ", 1)[1] for b in bad] == [
        "from lightning_clip.robust.rules import _selected_rows", "from lightning_clip.robust.pipeline import _Prepare",
        "rules._identity", "pipeline._columns"]


_PURE = ("lightning_clip.core", "lightning_clip.robust", "lightning_clip.sim", "lightning_clip.exceptions",
         "lightning_clip.tags", "lightning_clip.distributed.hook", "lightning_clip.distributed.exchange")

_RUNTIME_SCRIPT = r"""
import importlib, importlib.abc, json, sys, traceback

MODULES, FORBIDDEN = json.loads(sys.argv[1])

def forbidden(name):
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if forbidden(name):
            raise ImportError(f"import of {name!r} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())

results = {}
for name in ["lightning_clip"] + MODULES:  # the package __init__ files run for real
    try:
        importlib.import_module(name)
        results[name] = "ok"
    except BaseException:
        results[name] = traceback.format_exc()

sanity = {}
for name in ("lightning", "pytorch_lightning", "lightning.pytorch", "lightning_clip.callbacks.clipping"):
    try:
        importlib.import_module(name)
        sanity[name] = "imported"
    except ImportError:
        sanity[name] = "blocked"
leaked = sorted(m for m in sys.modules if forbidden(m))
print(json.dumps({"results": results, "sanity": sanity, "leaked": leaked}))
"""


@pytest.fixture(scope="module")
def runtime_report():
    modules = _modules(_PURE)
    arg = json.dumps([modules, list(LIGHTNING + GLUE)])
    proc = subprocess.run([sys.executable, "-c", _RUNTIME_SCRIPT, arg], capture_output=True, text=True,
                          timeout=120, cwd=str(PKG_DIR.parent))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_blocker_blocks_lightning(runtime_report):
    assert set(runtime_report["sanity"].values()) == {"blocked"}
    assert runtime_report["leaked"] == []


@pytest.mark.parametrize("module", ["lightning_clip", *_modules(_PURE)])
def test_imports_with_lightning_blocked(module, runtime_report):
    outcome = runtime_report["results"][module]
    assert outcome == "ok", f"{module} cannot be imported without Lightning:\n{outcome}"


_GLUE_SCRIPT = r"""
import json, sys
import lightning_clip
before = sorted(m for m in sys.modules if m.split(".")[0] == "lightning")
cls = getattr(lightning_clip, sys.argv[1])
from lightning.pytorch.strategies import StrategyRegistry
print(json.dumps({"before": before, "module": cls.__module__, "registered": "ddp_arc" in StrategyRegistry,
                  "in_dir": sys.argv[1] in dir(lightning_clip)}))
"""


@pytest.mark.parametrize("name,module", [("GradientClipping", "lightning_clip.callbacks.clipping"),
                                         ("ARCDDPStrategy", "lightning_clip.distributed.strategy")])
def test_glue_is_loaded_on_first_use_and_registers_ddp_arc(name, module):
    proc = subprocess.run([sys.executable, "-c", _GLUE_SCRIPT, name], capture_output=True, text=True, timeout=120,
                          cwd=str(PKG_DIR.parent))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"before": [], "module": module, "registered": True, "in_dir": True}


def test_importing_after_lightning_registers_ddp_arc_at_once():
    code = ("import lightning.pytorch, lightning_clip; from lightning.pytorch.strategies import StrategyRegistry; "
            "print('ddp_arc' in StrategyRegistry and 'ddp_arc_spawn' in StrategyRegistry)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(PKG_DIR.parent))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "True"


def test_unknown_attribute_still_raises():
    import lightning_clip

    with pytest.raises(AttributeError, match="no_such_name"):
        lightning_clip.no_such_name  # noqa: B018


FLOWER = ("flwr",)


def test_only_the_flower_package_imports_flower():
    for module in graph():
        if _matches(module, ("lightning_clip.flower",)):
            continue
        bad = [chain for name, chain in reach(module).items() if _matches(name, FLOWER)]
        assert not bad, f"{module} reaches Flower: " + " | ".join(" -> ".join(c) for c in bad)
    assert any(_matches(name, FLOWER) for name in reach("lightning_clip.flower.strategy"))  # the rule is not vacuous


_NO_FLOWER_SCRIPT = r"""
import importlib, importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flwr" or name.startswith("flwr."):
            raise ImportError(f"No module named {name!r} (blocked in this test)")
        return None

sys.meta_path.insert(0, Blocker())
import lightning_clip
out = {"top": lightning_clip.ARCConfig.__name__, "strategy": lightning_clip.ARCDDPStrategy.__name__}
try:
    import lightning_clip.flower
    out["flower"] = "imported"
except ImportError as err:
    out["flower"] = str(err)
print(json.dumps(out))
"""


def test_the_package_imports_without_flower_and_the_flower_package_names_the_extra():
    proc = subprocess.run([sys.executable, "-c", _NO_FLOWER_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=str(PKG_DIR.parent))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["top"] == "ARCConfig" and out["strategy"] == "ARCDDPStrategy"
    assert "pip install 'lightning-clip[flower]'" in out["flower"], out["flower"]


def import_cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (strongly connected, > 1)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in edges.get(v, []):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(edges):
        if v not in order:
            visit(v)
    return cycles


def test_no_two_modules_import_each_other():
    """Not even through a function-level import: a module's dependencies can be read one way (packages'
    ``__init__`` re-exports aside; ``if TYPE_CHECKING:`` imports do not run and do not count)."""
    modules = {m for m in graph() if not _is_package(m)}
    edges = {m: sorted({n for _, n in graph()[m] if n in modules and n != m}) for m in modules}
    assert not import_cycles(edges)
    assert import_cycles({"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": []}) == [["a", "b", "c"]]
    assert import_cycles({"a": ["b"], "b": ["c"], "c": []}) == []
