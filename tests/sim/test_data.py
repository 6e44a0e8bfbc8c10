"""lightning_clip.sim.data: markov_text walks the transition matrix it returns; word_text spells such a walk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_clip.sim.data import ALPHABET, markov_text, word_text


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


def test_word_text_spells_a_markov_walk_over_its_lexicon():
    chars, lexicon = word_text(5000, num_words=16, concentration=0.5, seed=3, source_seed=4)
    assert chars.dtype == torch.long and chars.shape == (5000,)
    assert len(lexicon) == 16 and len(set(lexicon)) == 16
    assert all(2 <= len(w) <= 8 and set(w) <= set(ALPHABET[1:]) for w in lexicon)
    text = "".join(ALPHABET[i] for i in chars.tolist())
    words = text.split(" ")
    assert all(w in lexicon for w in words[:-1]) and any(w.startswith(words[-1]) for w in lexicon)  # last one cut
    # the word sequence is markov_text's walk over the same source, mapped through the lexicon
    walk, _ = markov_text(5000 // 3 + 1, vocab_size=16, concentration=0.5, seed=3, source_seed=4)
    assert words[:-1] == [lexicon[i] for i in walk.tolist()[: len(words) - 1]]


def test_word_text_is_reproducible_and_seeds_differ():
    a, la = word_text(500, seed=1, source_seed=0)
    b, lb = word_text(500, seed=1, source_seed=0)
    c, lc = word_text(500, seed=2, source_seed=0)
    _, ld = word_text(10, source_seed=1)
    assert torch.equal(a, b) and la == lb and la == lc
    assert not torch.equal(a, c) and la != ld


@pytest.mark.parametrize(("kwargs", "name"), [({"num_chars": 0}, "num_chars"), ({"num_words": 1}, "num_words"),
                                              ({"concentration": -1.0}, "concentration")])
def test_word_text_rejects_bad_arguments(kwargs, name):
    args = {"num_chars": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        word_text(**args)
