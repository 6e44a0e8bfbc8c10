"""The built site, shared by the tests that read it (built once per session, strict)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import docs

#: Set by ``.ci/run`` to the site it built with ``mkdocs build --strict``, so the tests do not build it again.
SITE_ENV = "LIGHTNING_CLIP_DOCS_SITE"


def require(module: str) -> None:
    """Skip when the ``docs`` extra is not installed, except in CI, where it always is."""
    if os.environ.get("CI"):
        __import__(module)
    else:
        pytest.importorskip(module, reason="pip install -e '.[docs]'")


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    require("mkdocs")
    given = os.environ.get(SITE_ENV)
    if given:
        path = Path(given)
        assert (path / "index.html").is_file(), f"{SITE_ENV}={given} holds no built site"
        return path
    path = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(path)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(command, cwd=docs.ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return path
