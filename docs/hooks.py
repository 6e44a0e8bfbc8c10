"""mkdocs hooks: pages that show the committed benchmark results, figures checked against them, generated tables.

Three directives, written as HTML comments on a line of their own (invisible wherever the Markdown is shown raw):

- ``<!-- results: NAME -->`` includes ``benchmarks/results/NAME`` (a ``.md`` file with its headings moved one
  level down, any other file as a text block). ``<!-- results: NAME pending="COMMAND" -->`` says the results
  are pending, with the command that writes them, for as long as the file does not exist. The PNGs of
  ``benchmarks/results/`` are copied into the site at build time, as ``benchmarks/results/NAME.png``.
- ``<!-- api-summary: MODULE -->`` writes the table of ``MODULE.__all__``: each name, linked to its reference,
  and the first line of its docstring.
- A figure quoted in prose is a link with the ``results:`` scheme, ``[0.78x](results:sharded.txt)``, optionally
  with a title naming the row it comes from, ``[0.755](results:robustness.md "ARC > NNM > cwtm")``. The build
  checks that each number of the figure is in that file (on a line containing the title, when there is one),
  and the figure becomes a link to the benchmark page that shows the file.

A directive that cannot be carried out (a missing file, a figure not in its file) stops the build.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DOCS_DIR = ROOT / "docs"
RESULTS_URI = "benchmarks/results"

INCLUDE = re.compile(r'^<!-- results: (?P<name>[\w.-]+)(?: pending="(?P<pending>[^"]+)")? -->[ \t]*$', re.M)
API_SUMMARY = re.compile(r"^<!-- api-summary: (?P<module>[\w.]+) -->[ \t]*$", re.M)
FIGURE = re.compile(r'\[(?P<figure>[^\]\n]+)\]\(results:(?P<name>[\w.-]+)(?: "(?P<row>[^"\n]+)")?\)')
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?", re.I)
LOCAL_LINK = re.compile(r"\]\((?![a-z]+:|/|#)([\w.-]+)\)")
ROLE = re.compile(r":(?:py:)?\w+:`~?([^`]+)`")


# ---------------------------------------------------------------------------------------------------
# Figures: the numbers of a quoted figure are in its results file


def numbers(text: str) -> list[str]:
    """The numbers written in ``text``, thousands separators removed (``"2,799 s"`` -> ``["2799"]``)."""
    return [m.group(0).replace(",", "") for m in NUMBER.finditer(text)]


def _same(quoted: str, written: str) -> bool:
    """``quoted`` is ``written``, or ``written`` rounded to ``quoted``'s decimals (``0.78`` quotes ``0.783``)."""
    if quoted == written:
        return True
    try:
        q, w = float(quoted), float(written)
    except ValueError:
        return False
    decimals = len(quoted.split(".")[1]) if "." in quoted and "e" not in quoted.lower() else 0
    if "e" in quoted.lower():
        return abs(q - w) <= abs(q) * 0.05
    return len(written.split(".")[-1]) > decimals and round(w, decimals) == q


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []


def rows_matching(text: str, row: str) -> list[str]:
    """The lines of ``text`` a figure's ``row`` names: the table rows with a cell equal to ``row``, or, when there
    are none, every line that contains ``row``."""
    lines = text.splitlines()
    exact = [line for line in lines if row in _cells(line)]
    return exact or [line for line in lines if row in line]


def figure_problem(figure: str, text: str, row: str | None = None) -> str | None:
    """Why ``figure`` is not a figure of the results ``text`` (``None`` when it is).

    Every number of ``figure`` must be in ``text`` as written, or rounded from a number with more decimals;
    with ``row``, on a line :func:`rows_matching` gives.
    """
    quoted = numbers(figure)
    if not quoted:
        return f"{figure!r} has no number"
    lines = text.splitlines() if row is None else rows_matching(text, row)
    if not lines:
        return f"no line contains {row!r}"
    written = [n for line in lines for n in numbers(line)]
    missing = [q for q in quoted if not any(_same(q, w) for w in written)]
    if missing:
        where = f"on the rows {row!r} names" if row else "anywhere"
        return f"{', '.join(missing)} of {figure!r} is not in the file ({where})"
    return None


# ---------------------------------------------------------------------------------------------------
# Including a results file


def results_markdown(name: str, pending: str | None = None, page_uri: str = "index.md") -> str:
    """The Markdown that shows ``benchmarks/results/NAME`` on the page ``page_uri`` (or says it is pending).

    Links of the file to its neighbours (``![plot](exploding.png)``) are rewritten to where the site has them.
    """
    path = RESULTS_DIR / name
    if not path.is_file():
        if pending is None:
            raise PluginError(f"benchmarks/results/{name} does not exist (say pending=\"COMMAND\" while it is run)")
        return (f'!!! note "Results pending"\n\n    `benchmarks/results/{name}` is not committed yet: '
                f"`{pending}` writes it, and this page shows it once it is.\n")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".md":
        return f"```text\n{text.rstrip()}\n```\n"
    out = []
    fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        if not fence and re.match(r"#{1,5} ", line):
            line = "#" + line
        if not fence:
            line = LOCAL_LINK.sub(lambda m: f"]({_site_path(m.group(1), page_uri)})", line)
        out.append(line)
    return "\n".join(out) + "\n"


def _site_path(name: str, page_uri: str) -> str:
    """Where the site has ``benchmarks/results/NAME``: a plot is copied next to the pages; a results file is shown
    by the page that includes it."""
    if not (RESULTS_DIR / name).is_file():
        raise PluginError(f"benchmarks/results links to {name}, which does not exist")
    target = f"{RESULTS_URI}/{name}"
    if not name.endswith(".png"):
        pages = [page for page in sorted(DOCS_DIR.rglob("*.md")) if name in included_results(page.read_text("utf-8"))]
        if not pages:
            raise PluginError(f"benchmarks/results links to {name}, which no page of the site shows")
        target = pages[0].relative_to(DOCS_DIR).as_posix()
    return posixpath.relpath(target, posixpath.dirname(page_uri) or ".")


def included_results(markdown: str) -> list[str]:
    """The results files a page includes."""
    return [m.group("name") for m in INCLUDE.finditer(markdown)]


# ---------------------------------------------------------------------------------------------------
# The summary table of a module's public names


def canonical_path(module: str, name: str) -> str:
    """Where ``module.name`` is documented: in the module that defines it, when ``module`` re-exports it (a class or
    function names its module; other objects are found in the ``__all__`` of ``module``'s submodules)."""
    mod = importlib.import_module(module)
    obj = getattr(mod, name)
    home = getattr(obj, "__module__", None)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and home and home.startswith("lightning_clip"):
        return f"{home}.{name}"
    for sub in pkgutil.iter_modules(getattr(mod, "__path__", []), module + "."):
        inner = importlib.import_module(sub.name)
        if name in getattr(inner, "__all__", ()) and getattr(inner, name) is obj:
            return f"{sub.name}.{name}"
    return f"{module}.{name}"


def summary_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return ROLE.sub(r"`\1`", first).replace("|", "\\|")


def api_summary(module: str) -> str:
    mod = importlib.import_module(module)
    rows = ["| name | what it is |", "|---|---|"]
    for name in mod.__all__:
        obj = getattr(mod, name)
        what = summary_line(obj) if inspect.isclass(obj) or inspect.isfunction(obj) else f"`{type(obj).__name__}`"
        rows.append(f"| [`{name}`][{canonical_path(module, name)}] | {what} |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------------
# mkdocs events

_pages_showing: dict[str, str] = {}


def on_files(files: Files, config: Any) -> Files:
    """Copy the committed PNGs into the site; note which page shows which results file."""
    for png in sorted(RESULTS_DIR.glob("*.png")):
        files.append(File.generated(config, f"{RESULTS_URI}/{png.name}", abs_src_path=str(png)))
    _pages_showing.clear()
    for file in files.documentation_pages():
        for name in included_results(Path(file.abs_src_path).read_text(encoding="utf-8")):
            _pages_showing[name] = file.src_uri
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    markdown = INCLUDE.sub(
        lambda m: results_markdown(m.group("name"), m.group("pending"), page.file.src_uri), markdown)
    markdown = API_SUMMARY.sub(lambda m: api_summary(m.group("module")), markdown)

    def figure(m: re.Match[str]) -> str:
        name, row = m.group("name"), m.group("row")
        path = RESULTS_DIR / name
        if not path.is_file():
            raise PluginError(f"{page.file.src_uri}: the figure {m.group(0)} quotes a missing file")
        problem = figure_problem(m.group("figure"), path.read_text(encoding="utf-8"), row)
        if problem:
            raise PluginError(f"{page.file.src_uri}: {problem} (benchmarks/results/{name})")
        shown_on = _pages_showing.get(name)
        if shown_on is None:
            raise PluginError(f"{page.file.src_uri}: no page includes benchmarks/results/{name}")
        target = posixpath.relpath(shown_on, posixpath.dirname(page.file.src_uri) or ".")
        title = f"benchmarks/results/{name}" + (f", row {row}" if row else "")
        return f'[{m.group("figure")}]({target} "{title}"){{ .results-figure }}'

    return FIGURE.sub(figure, markdown)
