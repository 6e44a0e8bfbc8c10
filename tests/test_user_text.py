"""User-facing text says the thing itself: no message or docstring of the package names a source document."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_clip"

# "seed 002", "Seed 001's", "seed ``004``", "seed `004_arc.txt`", "seeds/004_...": the names of the
# project's internal source documents, which a user cannot look up.
SOURCE_DOCUMENT = re.compile(r"\bseeds?\s*(?:`{1,2}|/)?\s*0\d\d", re.IGNORECASE)


def test_the_pattern_finds_what_it_should():
    for hit in ("seed 002", "Seed 001's table", "seed ``004``", "(seed `004_arc.txt`)", "seeds/003_x.txt"):
        assert SOURCE_DOCUMENT.search(hit), hit
    for fine in ("seed=0", "seed: int = 0", "random seed (default: 0)", "seed_everything(0)", "seeds 0..4"):
        assert not SOURCE_DOCUMENT.search(fine), fine


def test_no_package_source_names_a_source_document():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SOURCE_DOCUMENT.search(line):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{lineno}: {line.strip()}")
    assert not hits, "say the thing itself instead of naming a source document:\n" + "\n".join(hits)
