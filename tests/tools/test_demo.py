"""Demo data (the adding problem, heterogeneous digit splits) and the demo models' logged metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_clip.sim.data import adding_problem, load_digits_tensors
from lightning_clip.sim.partition import dirichlet_split, extreme_split
from lightning_clip.tools.demo import AddingRNN


def test_adding_problem_targets_are_sums_of_marked_values():
    x, y = adding_problem(50, 20, seed=3)
    assert x.shape == (50, 20, 2) and y.shape == (50, 1)
    for i in range(50):
        marked = torch.nonzero(x[i, :, 1]).flatten()
        assert len(marked) == 2 and marked[0] < 10 <= marked[1]
        assert torch.isclose(y[i, 0], x[i, marked, 0].sum())
    x2, _ = adding_problem(50, 20, seed=3)
    assert torch.equal(x, x2)


def test_adding_problem_bad_args():
    with pytest.raises(ValueError, match="seq_len"):
        adding_problem(10, 1)
    with pytest.raises(ValueError, match="num_samples"):
        adding_problem(0, 10)


def test_rnn_bad_args():
    with pytest.raises(ValueError, match="cell"):
        AddingRNN(cell="gru")
    with pytest.raises(ValueError, match="lr"):
        AddingRNN(lr=-1.0)


def test_splits_partition_the_indices():
    _, y = load_digits_tensors()
    for shards in (dirichlet_split(y, 7, 0.5, seed=1), extreme_split(y, 10)):
        allidx = torch.cat(shards).sort().values
        assert torch.equal(allidx, torch.arange(len(y)))
        assert all(len(s) > 0 for s in shards)
    # extreme split: each shard sees at most two classes
    assert max(len(torch.unique(y[s])) for s in extreme_split(y, 10)) <= 3
    # smaller alpha -> more skew (fewer classes per shard on average)
    def classes(alpha):
        return sum(len(torch.unique(y[s])) for s in dirichlet_split(y, 10, alpha, seed=0)) / 10
    assert classes(0.05) < classes(100.0)
    assert dirichlet_split(y, 5, 0.5, seed=2)[0].tolist() == dirichlet_split(y, 5, 0.5, seed=2)[0].tolist()


class _FakeTrainer:
    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world


def test_dirichlet_shards_give_every_rank_the_same_number_of_batches_from_its_own_shard():
    """Unequal batch counts deadlock DDP at the epoch end; Lightning must not re-shard the shards either."""
    from torch.utils.data.distributed import DistributedSampler

    from lightning_clip.sim.data import ShardSampler
    from lightning_clip.tools.demo import DigitsDataModule

    world, lengths, firsts = 5, set(), []
    for rank in range(world):
        dm = DigitsDataModule(batch_size=25, dirichlet_alpha=0.5, seed=0)
        dm.trainer = _FakeTrainer(rank, world)
        dm.setup("fit")
        shard_y = dm.train_set.tensors[1]
        loader = dm.train_dataloader()
        # Lightning leaves a DistributedSampler in place (it would re-split a plain sampler across ranks).
        assert isinstance(loader.sampler, DistributedSampler) and isinstance(loader.sampler, ShardSampler)
        batches = list(loader)
        lengths.add(len(batches))
        assert sum(len(b[1]) for b in batches) == len(dm.train_y) // world
        # Every label drawn is one this rank's shard holds.
        drawn = torch.cat([b[1] for b in batches])
        assert set(drawn.tolist()) <= set(shard_y.tolist())
        firsts.append(drawn[:25])
        # A new epoch draws afresh, deterministically.
        first_epoch = list(loader.sampler)
        loader.sampler.set_epoch(1)
        assert list(loader.sampler) != first_epoch
        loader.sampler.set_epoch(0)
        assert list(loader.sampler) == first_epoch
    assert len(lengths) == 1  # the same number of batches on every rank, although the shards differ in size
    assert not all(torch.equal(firsts[0], f) for f in firsts[1:])  # the ranks draw different samples


def test_shard_sampler_validation():
    from lightning_clip.sim.data import ShardSampler

    with pytest.raises(ValueError, match="num_samples"):
        ShardSampler(torch.utils.data.TensorDataset(torch.zeros(3)), 0)
    with pytest.raises(ValueError, match="shard size"):
        ShardSampler(torch.utils.data.TensorDataset(torch.zeros(0)), 4)


# ---------------------------------------------------------------------------------------------------
# The demo models' logged metrics (torchmetrics objects) against a hand computation over every sample.


def _validate(model, datamodule, tmp_path) -> dict[str, float]:
    from tests.helpers.models import make_trainer

    (metrics,) = make_trainer(tmp_path).validate(model, datamodule=datamodule, verbose=False)
    return metrics


def test_digits_validation_metrics_are_over_every_sample(tmp_path):
    from lightning_clip.tools.demo import DigitsClassifier, DigitsDataModule

    torch.manual_seed(0)
    model, dm = DigitsClassifier(hidden=16), DigitsDataModule(test_fraction=0.2)
    metrics = _validate(model, dm, tmp_path)
    x, y = dm.test_set.tensors
    assert len(y) == 359  # two batches of 256 and 103: a mean of batch means would be wrong
    with torch.no_grad():
        logits = model(x).double()
    correct = (logits.argmax(-1) == y).double()
    assert metrics["val/acc"] == pytest.approx(float(correct.mean()), abs=1e-7)
    losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert metrics["val/loss"] == pytest.approx(float(losses.mean()), rel=1e-6)
    # non-vacuous: the unweighted mean of the two batch means differs from the value over every sample
    batch_means = [float(losses[:256].mean()), float(losses[256:].mean())]
    assert abs(sum(batch_means) / 2 - float(losses.mean())) > 1e-4
    assert 0.0 < metrics["val/acc"] < 1.0


def test_digits_validation_loss_keeps_a_nan(tmp_path):
    # One NaN sample: the loss over the validation set is NaN (it is not silently left out).
    from lightning_clip.tools.demo import DigitsClassifier, DigitsDataModule

    torch.manual_seed(0)
    model, dm = DigitsClassifier(hidden=16), DigitsDataModule(test_fraction=0.2)
    dm.setup("validate")
    dm.setup = lambda stage=None: None  # keep the poisoned set
    dm.test_set.tensors[0][5, 0] = float("nan")
    assert math.isnan(_validate(model, dm, tmp_path)["val/loss"])


def test_adding_rnn_validation_mse_is_over_every_sample(tmp_path):
    from lightning_clip.tools.demo import AddingProblemDataModule, AddingRNN

    torch.manual_seed(0)
    model = AddingRNN(hidden_size=8)
    dm = AddingProblemDataModule(seq_len=12, num_train=64, num_val=70, batch_size=32)  # batches of 32, 32, 6
    metrics = _validate(model, dm, tmp_path)
    x, y = dm.val_set.tensors
    with torch.no_grad():
        errors = (model(x).double() - y.double()) ** 2
    assert metrics["val/loss"] == pytest.approx(float(errors.mean()), rel=1e-6)
    assert abs(float(errors[:64].mean() + errors[64:].mean()) / 2 - float(errors.mean())) > 1e-6  # non-vacuous


@pytest.mark.parametrize("which", ["digits", "adding"])
def test_train_loss_is_the_first_batch_loss_at_the_first_step(which, tmp_path):
    from lightning_clip.tools.demo import AddingProblemDataModule, AddingRNN, DigitsClassifier, DigitsDataModule
    from tests.helpers.models import RecordingLogger, make_trainer

    torch.manual_seed(0)
    if which == "digits":
        model, dm, loss_fn = DigitsClassifier(hidden=16), DigitsDataModule(batch_size=16), nn.functional.cross_entropy
    else:
        model, loss_fn = AddingRNN(hidden_size=8), nn.functional.mse_loss
        dm = AddingProblemDataModule(seq_len=12, num_train=64, num_val=16, batch_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))  # the loader's generator is seeded: fit draws the same first batch
    with torch.no_grad():
        expected = float(loss_fn(model(x), y))
    logger = RecordingLogger()
    make_trainer(tmp_path, max_steps=1, logger=logger, limit_val_batches=0).fit(model, datamodule=dm)
    assert logger.series("train/loss") == [pytest.approx(expected, rel=1e-6)]


# ---------------------------------------------------------------------------------------------------
# The `lightning-clip demo` command: without clipping the RNN diverges, with it the RNN learns.


def test_demo_shows_clipping_make_the_rnn_learn(tmp_path, capsys, caplog):
    """A shortened demo (seq_len 10, 400 steps): the threshold found at fit start, both validation MSEs printed
    side by side."""
    import re

    from lightning_clip.tools.cli import main
    from lightning_clip.tools.report import read_scalars

    assert main(["demo", "--max-steps", "400", "--seq-len", "10", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Validation MSE after 400 steps"):]
    plain = re.search(r"without clipping\s+(diverged at step (\d+)|[\d.]+)", table)
    clipped = re.search(r"with clipping at ([\d.]+) \(found\)\s+([\d.]+)", table)
    assert plain and clipped, table
    # Without clipping the loss diverged (the run stopped there) and the report says so too.
    assert plain.group(2) is not None, table
    loss = read_scalars(tmp_path / "demo" / "no_clipping")["train/loss"]
    bad = ~np.isfinite(loss.values) | (loss.values > 1e3 * loss.values[0])
    assert int(loss.steps[np.argmax(bad)]) == int(plain.group(2)) and bad.any()
    assert f"DIVERGED: diverged at step {plain.group(2)}" in out
    # With clipping the RNN learns: clearly below the 1/6 of always predicting 1.0.
    mse = float(clipped.group(2))
    assert mse < 0.6 * (1 / 6), table
    assert (tmp_path / "demo" / "clipping" / "gradient_norms.png").exists()
    # the found threshold is the one the clipped run logged at every step (and the search's table was printed)
    assert "Clip-threshold search: 11 thresholds, 50 optimizer steps each" in caplog.text
    scalars = read_scalars(tmp_path / "demo" / "clipping")
    (found,) = scalars["grad_clip/finder_threshold"].values
    assert float(clipped.group(1)) == pytest.approx(found, rel=5e-3)
    np.testing.assert_allclose(scalars["grad_clip/threshold"].values, found, rtol=1e-6)


def test_demo_with_a_fixed_threshold_skips_the_search(tmp_path, capsys):
    from lightning_clip.tools.cli import main

    assert main(["demo", "--max-steps", "30", "--seq-len", "10", "--threshold", "0.3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "with FixedThreshold(max_norm=0.3)" in out and "Clip-threshold search" not in out
