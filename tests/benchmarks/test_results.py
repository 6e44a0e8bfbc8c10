"""benchmarks/common.py: --quick never writes into benchmarks/results/, hand-written notes survive a rewrite; the
scripts share that code through its public names, and reach the library's inner modules only through it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from benchmarks import common as results

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("__init__", "common"))


def test_quick_without_out_writes_to_a_fresh_temporary_directory(capsys):
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


def test_out_is_used_as_given_and_a_full_run_writes_the_committed_results(tmp_path):
    for quick in (True, False):
        out = tmp_path / f"nested{quick}" / "dir"
        assert results.output_dir(out, quick, "overhead") == str(out) and out.is_dir()
    assert results.output_dir(None, False, "overhead") == str(BENCHMARKS / "results")


def test_rewriting_keeps_the_hand_written_notes(tmp_path):
    path = tmp_path / "report.md"
    results.write_results(path, "# first run\n")
    assert path.read_text() == "# first run\n"
    notes = f"{results.NOTES_MARKER}\n## Reading\n\nwritten by hand\n"
    path.write_text(path.read_text() + "\n" + notes)
    results.write_results(path, "# second run")
    assert path.read_text() == "# second run\n\n" + notes
    results.write_results(path, "# third run\n")
    assert path.read_text() == "# third run\n\n" + notes  # kept again, not doubled


def test_stdout_record_writes_what_was_printed(tmp_path, capsys):
    record = results.StdoutRecord(tmp_path, "table.txt").start()
    print("| a | b |")
    print("| 1 | 2 |")
    record.close()
    print("after")
    assert (tmp_path / "table.txt").read_text() == "| a | b |\n| 1 | 2 |\n"
    assert capsys.readouterr().out.startswith("| a | b |\n| 1 | 2 |\n")
    assert sys.stdout is not None and "after" not in (tmp_path / "table.txt").read_text()


def test_tables_and_the_command_line():
    assert results.md_table(["a", "bb"], [["1", "2"]]) == "| a | bb |\n|---|---|\n| 1 | 2 |"
    assert results.md_table(["a", "bb"], [["100", "2"]], pad=True) == "| a   | bb |\n|-----|----|\n| 100 | 2  |"
    assert results.command_line("dp", ["--quick", "--out", "a b"]) == "python -m benchmarks.dp --quick --out 'a b'"


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_process_map_keeps_the_job_order(workers):
    assert list(results.process_map(abs, [-3, 1, -2, 5], workers)) == [3, 1, 2, 5]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_writes_through_the_shared_helpers(name):
    source = (BENCHMARKS / f"{name}.py").read_text()
    assert "add_output_arguments(" in source and "output_dir(args.out, " in source
    # one implementation of the notes marker, of the results directory and of the machine line, in common.py
    assert "NOTES_MARKER =" not in source and "RESULTS_DIR" not in source and "/proc/cpuinfo" not in source
    assert "sys.path" not in source and not re.search(r"[\"']results[\"']", source)


@pytest.mark.parametrize("name", [*SCRIPTS, "common"])
def test_imports_are_public_and_the_library_is_reached_through_common(name):
    tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [a.name for a in node.names]
            if node.module.startswith("benchmarks"):
                assert not any(n.startswith("_") for n in names), (node.module, names)
            if node.module.startswith("lightning_clip.") and name != "common":
                pytest.fail(f"{name}.py imports {node.module}: the library's inner modules are imported in common.py")
        if isinstance(node, ast.Import):
            inner = [a.name for a in node.names if a.name.startswith("lightning_clip.")]
            assert not inner or name == "common", inner
