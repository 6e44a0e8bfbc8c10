"""benchmarks/_results.py: --quick never writes into benchmarks/results/, hand-written notes survive a rewrite."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = ["exploding", "robustness", "arc_ddp", "overhead"]


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("benchmark_results", BENCHMARKS / "_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_without_out_writes_to_a_fresh_temporary_directory(results, capsys):
    a, b = results.output_dir(None, True, "exploding"), results.output_dir(None, True, "exploding")
    try:
        assert a != b
        for d in (Path(a), Path(b)):
            assert d.is_dir() and not any(d.iterdir())
            assert results.RESULTS_DIR not in d.resolve().parents and d.resolve() != results.RESULTS_DIR
        assert f"results of this run go to {a}" in capsys.readouterr().out
    finally:
        Path(a).rmdir()
        Path(b).rmdir()


def test_out_is_used_as_given_and_a_full_run_writes_the_committed_results(results, tmp_path):
    for quick in (True, False):
        out = tmp_path / f"nested{quick}" / "dir"
        assert results.output_dir(out, quick, "overhead") == str(out) and out.is_dir()
    assert results.output_dir(None, False, "overhead") == str(BENCHMARKS / "results")


def test_rewriting_keeps_the_hand_written_notes(results, tmp_path):
    path = tmp_path / "report.md"
    results.write_results(path, "# first run\n")
    assert path.read_text() == "# first run\n"
    notes = f"{results.NOTES_MARKER}\n## Reading\n\nwritten by hand\n"
    path.write_text(path.read_text() + "\n" + notes)
    results.write_results(path, "# second run")
    assert path.read_text() == "# second run\n\n" + notes
    results.write_results(path, "# third run\n")
    assert path.read_text() == "# third run\n\n" + notes  # kept again, not doubled


def test_stdout_record_writes_what_was_printed(results, tmp_path, capsys):
    record = results.StdoutRecord(tmp_path, "table.txt").start()
    print("| a | b |")
    print("| 1 | 2 |")
    record.close()
    print("after")
    assert (tmp_path / "table.txt").read_text() == "| a | b |\n| 1 | 2 |\n"
    assert capsys.readouterr().out.startswith("| a | b |\n| 1 | 2 |\n")
    assert sys.stdout is not None and "after" not in (tmp_path / "table.txt").read_text()


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_writes_through_the_shared_helpers(name):
    source = (BENCHMARKS / f"{name}.py").read_text()
    assert "add_output_arguments(" in source and "output_dir(args.out, " in source
    # one implementation of the notes marker and of the results directory, in _results.py
    assert "NOTES_MARKER =" not in source and "_kept_notes" not in source
    assert not re.search(r"[\"']results[\"']", source)
