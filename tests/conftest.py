"""Shared test set-up: CPU only, one intra-op thread per process, and the ``seed`` fixture.

The helpers (tiny models, trainers, recorders, the DDP workers) live in the importable package
``tests.helpers``.
"""

from __future__ import annotations

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
