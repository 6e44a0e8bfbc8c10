"""lightning_clip.sim.data.markov_text: the tokens walk the transition matrix it returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_clip.sim.data import markov_text


def test_markov_text_follows_its_transition_matrix():
    tokens, transitions = markov_text(200_000, vocab_size=8, concentration=0.5, seed=3, source_seed=4)
    assert tokens.dtype == torch.long and tokens.shape == (200_000,) and int(tokens[0]) == 0
    assert transitions.shape == (8, 8) and torch.allclose(transitions.sum(dim=1), torch.ones(8, dtype=torch.float64))
    t = tokens.numpy()
    counts = np.zeros((8, 8))
    np.add.at(counts, (t[:-1], t[1:]), 1.0)
    visits = counts.sum(axis=1, keepdims=True)
    empirical = counts / visits
    # each row's frequencies are within 5 binomial standard errors of the matrix
    se = np.sqrt(transitions.numpy() * (1 - transitions.numpy()) / visits)
    assert np.all(np.abs(empirical - transitions.numpy()) <= 5 * se + 1e-12)


def test_markov_text_is_reproducible_and_seeds_differ():
    a, pa = markov_text(1000, seed=1, source_seed=0)
    b, pb = markov_text(1000, seed=1, source_seed=0)
    c, _ = markov_text(1000, seed=2, source_seed=0)
    _, pd = markov_text(10, source_seed=1)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    assert not torch.equal(a, c) and not torch.equal(pa, pd)


@pytest.mark.parametrize(("kwargs", "name"), [({"num_tokens": 0}, "num_tokens"), ({"vocab_size": 1}, "vocab_size"),
                                              ({"concentration": 0.0}, "concentration"),
                                              ({"concentration": float("nan")}, "concentration")])
def test_markov_text_rejects_bad_arguments(kwargs, name):
    args = {"num_tokens": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        markov_text(**args)
