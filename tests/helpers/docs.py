"""The documentation as data: the Markdown files, their fenced blocks and checked tables, and how a block runs.

Conventions (documented for writers on the site's page "How these docs are built and tested"):

- ``<!-- no-run: REASON -->`` on the line before a ``python`` block: the block is not run, for that reason.
- ``<!-- checked: KIND [ARGUMENT] -->`` on the line before a table: a test holds the table to the code.
- The ``python`` blocks of one file run in order in one namespace, in a temporary directory, with ``model`` and
  ``dm`` (a small LightningModule and its datamodule) defined; a ``Trainer`` made in a block runs at most
  :data:`MAX_STEPS` steps.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
NO_RUN = re.compile(r"^<!-- no-run: (?P<reason>.*\S.*) -->\s*$")
CHECKED = re.compile(r"^<!-- checked: (?P<kind>[\w-]+)(?: (?P<arg>\S+))? -->\s*$")
#: The most optimizer steps a Trainer made in a documentation block runs.
MAX_STEPS = 3
BLOCK_FILENAME = "<docs:"


def markdown_files() -> list[Path]:
    """Every page of the site, and the README."""
    return [*sorted(DOCS.rglob("*.md")), README]


def label(path: Path) -> str:
    """``path`` relative to the repository (as it is, when outside it)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@dataclass
class Block:
    """A fenced code block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    no_run: str | None  # the reason given by ``<!-- no-run: ... -->``, else None

    @property
    def where(self) -> str:
        return f"{label(self.path)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` in order (nested fences inside a block are its text)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        language = (m.group("info").strip().split() or [""])[0].strip("{}.")
        j = i + 1
        while j < len(lines) and not re.match(rf"^ {{0,{indent + 3}}}{re.escape(fence[0])}{{{len(fence)},}}\s*$",
                                              lines[j]):
            j += 1
        body = "\n".join(line[indent:] for line in lines[i + 1:j])
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        reason = NO_RUN.match(previous.strip())
        out.append(Block(path, i + 1, language, body + "\n", reason.group("reason") if reason else None))
        i = j + 1
    return out


PENDING_NOTE = re.compile(r'^!!! \w+ "(?:Results pending|Pending\b)[^"]*"\n(?:\n|    .*\n)*', re.M)


def prose(path: Path, pending: bool = True) -> str:
    """``path`` without its fenced blocks and HTML comments (what a reader reads as text); with
    ``pending=False`` also without the notes titled "Pending: ..." (they may name what is not there yet)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced = {n for b in blocks(path) for n in range(b.line - 1, b.line + b.code.count("\n") + 1)}
    text = "\n".join(line for n, line in enumerate(lines) if n not in fenced) + "\n"
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return text if pending else PENDING_NOTE.sub("", text)


@dataclass
class CheckedTable:
    """A Markdown table announced by ``<!-- checked: KIND ARG -->``."""

    path: Path
    line: int
    kind: str
    arg: str | None
    header: list[str]
    rows: list[list[str]]

    @property
    def where(self) -> str:
        return f"{label(self.path)}:{self.line}"


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row (``\\|`` and pipes inside code spans do not split)."""
    cells, cell, code = [], "", False
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            cell += "|"
            i += 2
            continue
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
        i += 1
    cells.append(cell.strip())
    return cells


def checked_tables(path: Path) -> list[CheckedTable]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        m = CHECKED.match(line.strip())
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        table = []
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            table.append(split_row(lines[j]))
            j += 1
        if len(table) < 2:
            raise AssertionError(f"{label(path)}:{i + 1}: `checked: {m.group('kind')}` is not followed by a table")
        out.append(CheckedTable(path, i + 1, m.group("kind"), m.group("arg"), table[0], table[2:]))
    return out


CODE_SPAN = re.compile(r"`([^`]+)`")


def code_spans(cell: str) -> list[str]:
    return CODE_SPAN.findall(cell)


# ---------------------------------------------------------------------------------------------------
# Running the Python blocks


def block_namespace() -> dict[str, Any]:
    """The names a documentation block may use without defining them: ``model`` and ``dm``."""
    from lightning_clip.tools.demo import AddingProblemDataModule, AddingRNN

    return {
        "__name__": "__docs__",
        "model": AddingRNN(hidden_size=8),
        "dm": AddingProblemDataModule(seq_len=8, num_train=512, num_val=32, batch_size=32),
    }


def _from_a_block() -> bool:
    frame = sys._getframe(2)
    return frame.f_code.co_filename.startswith(BLOCK_FILENAME)


@contextlib.contextmanager
def short_trainers() -> Iterator[None]:
    """While active, a ``Trainer`` made by a documentation block runs at most :data:`MAX_STEPS` steps, without a
    progress bar or model summary; Trainers made elsewhere (inside the library) are untouched."""
    import lightning
    import lightning.pytorch as pl

    original = pl.Trainer

    class DocsTrainer(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if _from_a_block():
                steps = kwargs.get("max_steps", -1)
                kwargs["max_steps"] = MAX_STEPS if steps is None or steps < 0 else min(steps, MAX_STEPS)
                kwargs.setdefault("enable_progress_bar", False)
                kwargs.setdefault("enable_model_summary", False)
                kwargs.setdefault("limit_val_batches", 1)
                kwargs.setdefault("log_every_n_steps", 1)
            super().__init__(*args, **kwargs)

    DocsTrainer.__name__ = DocsTrainer.__qualname__ = "Trainer"
    pl.Trainer = DocsTrainer  # type: ignore[misc]
    lightning.Trainer = DocsTrainer  # type: ignore[attr-defined,misc]
    try:
        yield
    finally:
        pl.Trainer = original  # type: ignore[misc]
        lightning.Trainer = original  # type: ignore[attr-defined,misc]


def run_blocks(runnable: list[Block]) -> None:
    """Run ``runnable`` (the blocks of one file) in order in one namespace; raise naming the failing block."""
    namespace = block_namespace()
    with short_trainers():
        for block in runnable:
            code = compile(block.code, f"{BLOCK_FILENAME}{block.where}>", "exec")
            try:
                exec(code, namespace)
            except Exception as err:
                raise AssertionError(f"the python block at {block.where} failed: {type(err).__name__}: {err}") from err


def import_path(path: str) -> Any:
    """The object a ``class_path`` names."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def missing_extra(err: BaseException) -> str | None:
    """The module an optional extra would bring, when ``err`` (or what caused it) is that module's absence; ``None``
    for any other error, the package's own modules included."""
    cause: BaseException | None = err
    while cause is not None:
        name = cause.name if isinstance(cause, ModuleNotFoundError) else None
        if name and name != "lightning_clip" and not name.startswith("lightning_clip."):
            return name
        cause = cause.__cause__
    return None
