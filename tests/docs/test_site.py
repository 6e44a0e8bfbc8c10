"""The built site: every public name has its entry in the API reference, every committed plot is shown."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import warnings

import pytest

import lightning_clip
from tests.docs.conftest import require
from tests.helpers import docs

pytestmark = pytest.mark.docs
require("mkdocs")
from docs import hooks  # noqa: E402


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(lightning_clip.__path__, "lightning_clip.")]
    return ["lightning_clip", *sorted(names)]


def _anchors(site) -> set[str]:
    ids = set()
    for page in (site / "reference").rglob("*.html"):
        ids |= set(re.findall(r'\bid="(lightning_clip[\w.]*)"', page.read_text(encoding="utf-8")))
    return ids


def _import(module: str):
    """``module``, or ``None`` outside CI when it needs an optional extra that is not installed (a warning says
    which); in CI every extra is installed, so the module must import."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        absent = docs.missing_extra(err)
        if os.environ.get("CI") or not absent:
            raise
        warnings.warn(f"{module} not checked: it needs {absent}, which is not installed ({err})", stacklevel=2)
        return None


def test_every_public_name_has_an_entry_in_the_api_reference(site):
    anchors = _anchors(site)
    missing = []
    for module in _modules():
        mod = _import(module)
        if mod is None:
            continue
        for name in getattr(mod, "__all__", ()):
            entry = hooks.canonical_path(module, name)
            if entry not in anchors:
                missing.append(f"{module}.{name} (expected at #{entry})")
            if entry == f"{module}.{name}" and module not in anchors:
                missing.append(f"{module} (the module's own section)")
    assert not missing, "not in the API reference:\n" + "\n".join(missing)


def test_the_top_level_names_are_listed_on_the_reference_home(site):
    page = (site / "reference" / "index.html").read_text(encoding="utf-8")
    for name in lightning_clip.__all__:
        assert f"#{hooks.canonical_path('lightning_clip', name)}" in page, name


def test_every_committed_plot_is_shown_on_a_page(site):
    shown = set()
    for page in site.rglob("*.html"):
        for src in re.findall(r'<img[^>]+src="([^"]+)"', page.read_text(encoding="utf-8")):
            target = (page.parent / src).resolve()
            if target.parent == (site / "benchmarks" / "results").resolve():
                shown.add(target.name)
    committed = {p.name for p in (docs.ROOT / "benchmarks" / "results").glob("*.png")}
    assert committed <= shown, f"not shown: {sorted(committed - shown)}"
    for name in committed:
        assert (site / "benchmarks" / "results" / name).is_file()
