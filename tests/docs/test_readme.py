"""The README as the front door: its links and its picture point at files of the repository, and the extras its
set-up commands install exist (the site's own links are checked by ``mkdocs build --strict``)."""

from __future__ import annotations

import re

from tests.helpers import docs

LINK = re.compile(r"!?\[[^\]\n]*\]\((?P<target>[^)\s]+)(?: \"[^\"\n]*\")?\)")


def _local_targets(text: str) -> list[str]:
    targets = [m["target"] for m in LINK.finditer(text)]
    return [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_the_link_reader_finds_files_and_images_and_leaves_urls_and_anchors():
    text = ('![plot](docs/assets/a.png) [guide](docs/guides/x.md#part) [f](benchmarks/results/r.md "row") '
            "[site](https://example.org/x) [up](#top)")
    assert _local_targets(text) == ["docs/assets/a.png", "docs/guides/x.md", "benchmarks/results/r.md"]


def test_every_link_and_image_of_the_readme_is_a_file_of_the_repository():
    targets = _local_targets(docs.prose(docs.README))
    assert targets, "the README links to nothing"
    missing = [t for t in targets if not (docs.ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_readme_shows_a_committed_picture():
    images = [t for t in _local_targets(docs.prose(docs.README)) if t.endswith((".png", ".svg", ".jpg"))]
    assert images and all((docs.ROOT / image).is_file() for image in images), images


def test_the_extras_the_readmes_commands_install_exist():
    pyproject = (docs.ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+) = \[", section, re.M))
    commands = "\n".join(b.code for b in docs.blocks(docs.README) if b.language == "bash")
    named = {name for group in re.findall(r'-e "\.\[([\w,]+)\]"', commands) for name in group.split(",")}
    assert named, "the README installs nothing with an extra"
    assert named <= extras, f"the README installs extras pyproject.toml does not define: {sorted(named - extras)}"
