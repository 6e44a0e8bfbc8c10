"""The house rule: the pure core imports torch (and numpy/stdlib), never Lightning.

Two independent checks:

* source level: every ``import`` in a pure module (top level or inside functions, relative or absolute,
  ``importlib.import_module("...")`` with a literal) is parsed and checked against the forbidden names;
* runtime: in a fresh interpreter where ``lightning``, ``pytorch_lightning`` and ``lightning_fabric`` (and our
  Lightning glue) cannot be imported, each pure module is imported the way a user imports it, through the real
  ``lightning_clip/__init__.py`` and ``lightning_clip/robust/__init__.py`` (the package re-exports its Lightning
  glue lazily, so a pure submodule must not pull it in).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PKG_DIR = Path(__file__).resolve().parents[1] / "lightning_clip"

#: modules that must stay usable from a plain PyTorch loop (path relative to the package, without ".py")
PURE_MODULES = [
    "core/grads",
    "core/thresholds",
    "core/functional",
    "exceptions",
    "tags",
    "robust/arc",
    "robust/aggregators",
    "sim/attacks",
    # pure torch by the same rule (only callbacks/, distributed/strategy.py and tools/ are Lightning glue)
    "distributed/hook",
    "sim/partition",
]

FORBIDDEN_ROOTS = ("lightning", "pytorch_lightning", "lightning_fabric")
FORBIDDEN_OWN = ("lightning_clip.callbacks", "lightning_clip.tools", "lightning_clip.distributed.strategy")


def _dotted(rel: str) -> str:
    return "lightning_clip." + rel.replace("/", ".")


def _file(rel: str) -> Path:
    return PKG_DIR / f"{rel}.py"


def _present(rel: str):
    return pytest.param(rel, id=rel, marks=pytest.mark.skipif(not _file(rel).exists(), reason=f"{rel}.py not written"))


PARAMS = [_present(rel) for rel in PURE_MODULES]


def _is_forbidden(name: str) -> bool:
    root = name.split(".")[0]
    if root in FORBIDDEN_ROOTS:
        return True
    return any(name == own or name.startswith(own + ".") for own in FORBIDDEN_OWN)


def _imported_names(path: Path, module: str) -> list[tuple[int, str]]:
    """Every module name ``path`` imports, as (line, dotted name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.rsplit(".", 1)[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.append((node.lineno, base))
            out.extend((node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*")
            if base == "lightning_clip":
                # `from lightning_clip import X` runs the package __init__ and, unless X is a submodule,
                # takes a re-exported name (the callbacks live there): only submodules are fine
                for a in node.names:
                    sub = PKG_DIR / a.name
                    if not (sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()):
                        out.append((node.lineno, f"lightning_clip.__init__:{a.name}"))
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            arg0 = node.args[0] if node.args else None
            if fname in ("import_module", "__import__") and isinstance(arg0, ast.Constant) and isinstance(
                arg0.value, str
            ):
                out.append((node.lineno, arg0.value))
    return out


@pytest.mark.parametrize("rel", PARAMS)
def test_source_imports_no_lightning(rel):
    module = _dotted(rel)
    bad = [
        f"line {line}: {name}"
        for line, name in _imported_names(_file(rel), module)
        if _is_forbidden(name) or name.startswith("lightning_clip.__init__:")
    ]
    assert not bad, f"{module} must import torch only, never Lightning or our Lightning glue; found {bad}"


def test_source_check_is_not_vacuous(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(textwrap.dedent("""
        import torch
        import lightning.pytorch as pl
        from lightning_clip.callbacks.step import step_state
        from ..distributed import strategy
        from lightning_clip import GradientClipping
        def later():
            import pytorch_lightning
            importlib.import_module("lightning_fabric")
    """))
    names = [n for _, n in _imported_names(sample, "lightning_clip.robust.sample")]
    bad = [n for n in names if _is_forbidden(n) or n.startswith("lightning_clip.__init__:")]
    assert set(bad) == {
        "lightning.pytorch",
        "lightning_clip.callbacks.step",
        "lightning_clip.callbacks.step.step_state",
        "lightning_clip.distributed.strategy",
        "lightning_clip.__init__:GradientClipping",
        "pytorch_lightning",
        "lightning_fabric",
    }
    assert "torch" in names and not _is_forbidden("torch") and not _is_forbidden("lightning_clip.core.grads")
    assert not _is_forbidden("lightning_clipper")


_RUNTIME_SCRIPT = r"""
import importlib, importlib.abc, json, sys, traceback

PKG_DIR, MODULES, FORBIDDEN_ROOTS, FORBIDDEN_OWN = json.loads(sys.argv[1])

def forbidden(name):
    return name.split(".")[0] in FORBIDDEN_ROOTS or any(name == o or name.startswith(o + ".") for o in FORBIDDEN_OWN)

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if forbidden(name):
            raise ImportError(f"import of {name!r} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())

results = {}
for name in ["lightning_clip", "lightning_clip.robust"] + MODULES:  # the package __init__ files run for real
    try:
        importlib.import_module(name)
        results[name] = "ok"
    except BaseException:
        results[name] = traceback.format_exc()

# sanity: the blocker works, and Lightning glue really fails to import here
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
    modules = [_dotted(rel) for rel in PURE_MODULES if _file(rel).exists()]
    arg = json.dumps([str(PKG_DIR), modules, list(FORBIDDEN_ROOTS), list(FORBIDDEN_OWN)])
    proc = subprocess.run([sys.executable, "-c", _RUNTIME_SCRIPT, arg], capture_output=True, text=True,
                          timeout=120, cwd=str(PKG_DIR.parent))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_blocker_blocks_lightning(runtime_report):
    assert runtime_report["sanity"] == {
        "lightning": "blocked",
        "pytorch_lightning": "blocked",
        "lightning.pytorch": "blocked",
        "lightning_clip.callbacks.clipping": "blocked",
    }
    assert runtime_report["leaked"] == []


def test_package_imports_with_lightning_blocked(runtime_report):
    for name in ("lightning_clip", "lightning_clip.robust"):
        assert runtime_report["results"][name] == "ok", runtime_report["results"][name]


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


@pytest.mark.parametrize("rel", PARAMS)
def test_imports_with_lightning_blocked(rel, runtime_report):
    module = _dotted(rel)
    outcome = runtime_report["results"][module]
    assert outcome == "ok", f"{module} cannot be imported without Lightning:\n{outcome}"
