"""Shared test set-up: CPU only, one intra-op thread per process, and the ``seed`` fixture.

The helpers (tiny models, trainers, recorders, the DDP workers) live in the importable package
``tests.helpers``.
"""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
import pytest
import torch

os.environ.setdefault("PL_DISABLE_FORK", "1")
# 2 cores and multi-process tests: one intra-op thread per process avoids oversubscription
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def seed():
    pl.seed_everything(0, workers=True, verbose=False)
    return 0


@pytest.fixture(autouse=True)
def _restore_logger_levels():
    """Each test starts with the logger levels the previous one found: a study run in process quiets Lightning's
    loggers (``setLevel(ERROR)``), which would hide the INFO lines later tests read with ``caplog``."""
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root = logging.root.level
    yield
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            lg.setLevel(levels.get(name, logging.NOTSET))
    logging.root.setLevel(root)
