"""Where a benchmark script writes its results, and the hand-written notes kept when it rewrites them.

Every script takes ``--quick`` and ``--out DIR``. A full run writes into ``benchmarks/results/`` (the
committed results); ``--quick`` without ``--out`` writes into a fresh temporary directory, so a smoke
run never overwrites them; ``--out DIR`` writes into ``DIR``. Text after :data:`NOTES_MARKER` in an
existing results file is hand-written and kept when the script rewrites the file.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

__all__ = ["NOTES_MARKER", "RESULTS_DIR", "StdoutRecord", "add_output_arguments", "kept_notes", "output_dir",
           "write_results"]

#: The committed results of the full runs.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: The line after which a results file is hand-written (kept when the script rewrites the file).
NOTES_MARKER = "<!-- hand-written notes below: kept when the script rewrites this file -->"


def add_output_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """Add ``--quick`` (with ``quick_help``) and ``--out`` to ``parser``."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=None,
                        help=f"output directory (default: {RESULTS_DIR.relative_to(RESULTS_DIR.parents[1])}; "
                        "with --quick a new temporary directory, so the committed results stay as they are)")


def output_dir(out: str | os.PathLike[str] | None, quick: bool, name: str) -> str:
    """The directory to write ``name``'s results into, created: ``out``, else a temporary one for ``quick``.

    Prints where the results go when that is not ``benchmarks/results``.
    """
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
    elif quick:
        path = Path(tempfile.mkdtemp(prefix=f"lightning_clip_{name}_quick_"))
    else:
        path = RESULTS_DIR
        path.mkdir(parents=True, exist_ok=True)
    if path.resolve() != RESULTS_DIR:
        print(f"results of this run go to {path}", flush=True)
    return str(path)


def kept_notes(path: str | os.PathLike[str]) -> str:
    """The hand-written part of an existing results file (from :data:`NOTES_MARKER` on), or ``""``."""
    try:
        old = Path(path).read_text()
    except OSError:
        return ""
    i = old.find(NOTES_MARKER)
    return "\n" + old[i:] if i >= 0 else ""


def write_results(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path``, followed by the hand-written notes of the file it replaces."""
    content = (text if text.endswith("\n") else text + "\n") + kept_notes(path)
    Path(path).write_text(content if content.endswith("\n") else content + "\n")


class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


class StdoutRecord:
    """Copy what the script prints into ``<out>/<filename>`` (for scripts whose results are their output).

    ``start()`` tees ``sys.stdout``; ``close()`` restores it and writes the file (with kept notes).
    Nothing is written if the script fails before ``close()``.
    """

    def __init__(self, out: str | os.PathLike[str], filename: str) -> None:
        self.path = Path(out) / filename
        self._buffer = io.StringIO()
        self._stdout: TextIO | None = None

    def start(self) -> StdoutRecord:
        self._stdout = sys.stdout
        sys.stdout = _Tee(self._stdout, self._buffer)  # type: ignore[assignment]
        return self

    def close(self) -> None:
        if self._stdout is not None:
            sys.stdout = self._stdout
            self._stdout = None
        write_results(self.path, self._buffer.getvalue())
        print(f"wrote {self.path}", flush=True)
