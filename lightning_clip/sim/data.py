"""Data for experiments that ship with the package or are generated (no downloads; pure torch).

- :func:`adding_problem`: the adding problem of Pascanu et al. (2013), generated from a seed.
- :func:`load_digits_tensors`: scikit-learn's bundled 8x8 digits.
- :func:`markov_text`: token streams from a random first-order Markov source (a generated "language").
- :func:`word_text`: characters of generated text: a Markov source over spelled words separated by spaces.
- :class:`ShardSampler`: a fixed number of draws per epoch from a rank's own (heterogeneous) shard.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from lightning_clip.exceptions import check_positive_int

__all__ = ["ALPHABET", "ShardSampler", "adding_problem", "load_digits_tensors", "markov_text", "word_text"]

#: The characters of :func:`word_text`, in the order of their ids (id 0 is the space).
ALPHABET = " abcdefghijklmnopqrstuvwxyz"


def adding_problem(num_samples: int, seq_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Generate the adding problem: inputs ``[num_samples, seq_len, 2]`` and targets ``[num_samples, 1]``.

    One marked position is drawn from the first half and one from the second half of the sequence,
    as in Pascanu et al. (2013); the target is the sum of the two marked values (values ~ U[0, 1]).
    """
    check_positive_int("num_samples", num_samples)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"Expected argument `seq_len` to be an integer >= 2 but got {seq_len!r}")
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(num_samples, seq_len, generator=g)
    half = seq_len // 2
    first = torch.randint(0, half, (num_samples,), generator=g)
    second = torch.randint(half, seq_len, (num_samples,), generator=g)
    markers = torch.zeros(num_samples, seq_len)
    rows = torch.arange(num_samples)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = (values * markers).sum(dim=1, keepdim=True)
    return x, y


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits as ``(x [1797, 64] in [0, 1], y [1797])``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The digits demo needs scikit-learn: pip install 'lightning-clip[cli]'") from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


def markov_text(
    num_tokens: int, vocab_size: int = 32, concentration: float = 0.1, seed: int = 0, source_seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Generate ``num_tokens`` tokens from a random first-order Markov source, and its transition matrix.

    Each row of the ``[vocab_size, vocab_size]`` transition matrix is drawn from a symmetric Dirichlet
    with ``concentration`` (small: few likely successors, a low entropy rate) from ``source_seed``; the
    chain starts at token 0 and walks with draws from ``seed``. A next-token model cannot do better than
    the source's entropy rate, ``-sum_i pi_i sum_j P_ij log P_ij`` nats per token.

    Returns:
        ``(tokens [num_tokens] int64, transitions [vocab_size, vocab_size] float64)``.
    """
    check_positive_int("num_tokens", num_tokens)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"Expected argument `vocab_size` to be an integer >= 2 but got {vocab_size!r}")
    if not (isinstance(concentration, (int, float)) and concentration > 0 and math.isfinite(concentration)):
        raise ValueError(f"Expected argument `concentration` to be a finite number > 0 but got {concentration!r}")
    gen = torch.Generator().manual_seed(source_seed)
    gammas = torch._standard_gamma(torch.full((vocab_size, vocab_size), float(concentration), dtype=torch.float64),
                                   generator=gen)
    transitions = gammas / gammas.sum(dim=1, keepdim=True)
    cdf = transitions.cumsum(dim=1).tolist()
    draws = torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    tokens = [0] * num_tokens
    state = 0
    last = vocab_size - 1
    for i in range(num_tokens):
        tokens[i] = state
        state = min(bisect.bisect_right(cdf[state], draws[i]), last)
    return torch.tensor(tokens, dtype=torch.long), transitions


def word_text(num_chars: int, num_words: int = 64, concentration: float = 0.1, seed: int = 0,
              source_seed: int = 0) -> tuple[Tensor, list[str]]:
    """Generate ``num_chars`` characters of text: words from a random first-order Markov source, spelled out.

    ``source_seed`` draws the lexicon (``num_words`` distinct words of 2 to 8 letters, each letter uniform
    over a-z) and the word transition matrix (:func:`markov_text` with ``vocab_size=num_words`` and
    ``concentration``); ``seed`` draws the walk over the words. The text is the words joined by single
    spaces, cut to ``num_chars`` characters; character ids index :data:`ALPHABET` (0 is the space). A
    character-level model must learn the spelling of every word and which words follow which.

    Returns:
        ``(characters [num_chars] int64, lexicon)``: the text's ids and the words, by word index.
    """
    check_positive_int("num_chars", num_chars)
    if not isinstance(num_words, int) or num_words < 2:
        raise ValueError(f"Expected argument `num_words` to be an integer >= 2 but got {num_words!r}")
    gen = torch.Generator().manual_seed(source_seed)
    lexicon: list[str] = []
    seen: set[str] = set()
    while len(lexicon) < num_words:
        length = int(torch.randint(2, 9, (), generator=gen))
        word = "".join(ALPHABET[1 + int(i)] for i in torch.randint(0, 26, (length,), generator=gen))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    # at least 3 characters per word with its space, so this many words always cover num_chars
    words, _ = markov_text(num_chars // 3 + 1, num_words, concentration, seed=seed, source_seed=source_seed)
    text = " ".join(lexicon[i] for i in words.tolist())[:num_chars]
    ids = [ALPHABET.index(ch) for ch in text]
    return torch.tensor(ids, dtype=torch.long), lexicon


class ShardSampler(DistributedSampler):
    """Draws ``num_samples`` indices per epoch, with replacement, from a dataset that is already this rank's shard.

    Every rank gets the same number of batches whatever its shard's size (ranks with unequal batch
    counts deadlock DDP at the epoch end). It is a :class:`~torch.utils.data.distributed.DistributedSampler`
    only so that Lightning's ``use_distributed_sampler`` leaves it alone: Lightning replaces a plain
    sampler by one that splits the dataset across the ranks again. Lightning calls :meth:`set_epoch`,
    so every epoch draws afresh (deterministic in ``seed`` and the epoch).

    Args:
        dataset: This rank's shard.
        num_samples: Indices per epoch (the same on every rank).
        seed: Seed of the draws (make it differ across ranks).
    """

    def __init__(self, dataset: Dataset, num_samples: int, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.shard_size = len(dataset)  # type: ignore[arg-type]
        check_positive_int("shard size", self.shard_size)
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.total_size = self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randint(self.shard_size, (self.num_samples,), generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples
