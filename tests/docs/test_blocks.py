"""Every python block of the site and of the README runs (or says, on the line before it, why it cannot)."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.helpers import docs

FILES = docs.markdown_files()


def test_the_block_parser_reads_fences_languages_and_reasons(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- no-run: needs four processes -->\n```python\n"
                    "y = 2\n```\n\n````markdown\n```python\nnot a block\n```\n````\n\n```bash\nls\n```\n")
    found = docs.blocks(page)
    assert [(b.language, b.code, b.no_run) for b in found] == [
        ("python", "x = 1\n", None), ("python", "y = 2\n", "needs four processes"),
        ("markdown", "```python\nnot a block\n```\n", None), ("bash", "ls\n", None)]
    assert [b.line for b in found] == [3, 8, 12, 18]


def test_a_failing_block_is_reported_with_its_place(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\n```python\nassert x == 2, 'x is 1'\n```\n")
    with pytest.raises(AssertionError, match=r"page.md:5 failed: AssertionError: x is 1"):
        docs.run_blocks(docs.blocks(page))


def test_a_trainer_made_in_a_block_is_short_and_the_librarys_are_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "page.md"
    page.write_text("```python\nimport lightning.pytorch as pl\ntrainer = pl.Trainer(max_steps=1000, logger=False)\n"
                    "trainer.fit(model, datamodule=dm)\n```\n")
    docs.run_blocks(docs.blocks(page))
    import lightning.pytorch as pl

    with docs.short_trainers():
        assert pl.Trainer(max_steps=1000, logger=False).max_steps == 1000  # not made by a block


def test_a_block_that_needs_an_absent_extra_is_told_from_a_broken_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nimport an_extra_that_is_not_installed\n```\n")
    with pytest.raises(AssertionError) as absent:
        docs.run_blocks(docs.blocks(page))
    assert docs.missing_extra(absent.value) == "an_extra_that_is_not_installed"
    page.write_text("```python\nimport lightning_clip.no_such_module\n```\n")
    with pytest.raises(AssertionError) as broken:
        docs.run_blocks(docs.blocks(page))
    assert docs.missing_extra(broken.value) is None
    page.write_text("```python\nraise ImportError('from the block')\n```\n")
    with pytest.raises(AssertionError) as other:
        docs.run_blocks(docs.blocks(page))
    assert docs.missing_extra(other.value) is None


@pytest.mark.parametrize("path", FILES, ids=docs.label)
def test_every_python_block_runs(path, tmp_path, monkeypatch):
    found = [b for b in docs.blocks(path) if b.language == "python"]
    runnable = [b for b in found if b.no_run is None]
    if not runnable:
        pytest.skip(f"{docs.label(path)} has no runnable python block")
    monkeypatch.chdir(tmp_path)
    try:
        docs.run_blocks(runnable)
    except AssertionError as err:
        absent = docs.missing_extra(err)
        if absent and not os.environ.get("CI"):
            pytest.skip(f"needs {absent}, an optional extra not installed here (CI installs every extra)")
        raise


@pytest.mark.parametrize("path", FILES, ids=docs.label)
def test_every_yaml_block_parses_and_its_class_paths_import(path):
    for block in docs.blocks(path):
        if block.language != "yaml":
            continue
        text = block.code
        if text.startswith("    "):  # an excerpt of a list, indented as in its file
            text = "\n".join(line[4:] for line in text.splitlines())
        data = yaml.safe_load(text)
        for class_path in _class_paths(data):
            assert isinstance(docs.import_path(class_path), type), f"{block.where}: {class_path} is not a class"


def _class_paths(data):
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "class_path":
                yield value
            else:
                yield from _class_paths(value)
    elif isinstance(data, list):
        for item in data:
            yield from _class_paths(item)
