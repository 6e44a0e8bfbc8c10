"""Simulated Byzantine ranks as send transforms: ByzantineTransform (from Python and from YAML keywords) and
simulate_sends' gather semantics, in one process."""

from __future__ import annotations

import pytest
import torch

from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.transforms import SendBuffers
from lightning_clip.sim import ByzantineSpec, ByzantineTransform, simulate_sends
from tests.helpers.sends import context


def test_byzantine_transform_changes_only_byzantine_ranks_and_seeds_gaussian_per_rank_and_step():
    t = ByzantineTransform(ranks=[1], attack="gaussian", params={"std": 1.0}, seed=5)
    assert t.spec == ByzantineSpec(ranks=[1], attack="gaussian", std=1.0)
    honest = SendBuffers([torch.ones(4)], [[]])
    t(honest, context(rank=0, n=3))
    assert torch.equal(honest.buffers[0], torch.ones(4))
    draws = []
    for step in (0, 0, 1):
        sent = SendBuffers([torch.ones(4)], [[]])
        t(sent, context(rank=1, n=3, step=step))
        draws.append(sent.buffers[0].clone())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])  # replayable, fresh per step
    assert not torch.equal(draws[0], torch.ones(4))
    with pytest.raises(TypeError, match="ByzantineSpec"):
        ByzantineTransform.from_spec({"ranks": [1], "attack": "nan"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`attack` to be one of"):
        ByzantineTransform(ranks=[1], attack="boom")
    with pytest.raises(ValueError, match=r"unexpected parameter `factr`"):
        ByzantineTransform(ranks=[1], attack="scale", params={"factr": 2.0})
    with pytest.raises(TypeError, match=r"`params` to be a mapping"):
        ByzantineTransform(ranks=[1], attack="scale", params=[2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`seed`"):
        ByzantineTransform(ranks=[1], attack="nan", seed=-1)


def test_simulate_sends_gathers_what_every_rank_held_before_the_stage():
    # Stage 1: worker momentum (beta 0.5) on every rank; stage 2: rank 2 mimics honest row 0 of the momenta.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    spec = ByzantineSpec(ranks=[2], attack="mimic")
    chains = [ARCConfig(num_byzantine=1, worker_momentum=0.5).send_chain([ByzantineTransform.from_spec(spec)])
              for _ in range(3)]
    params = [torch.zeros(2)]
    sends = [SendBuffers([x[r].clone()], [params]) for r in range(3)]
    out = simulate_sends(chains, sends, 0, lambda v: v.mean(0))
    m = 0.5 * x
    assert torch.equal(out[:2], m[:2]) and torch.equal(out[2], m[0])
    # Rank 2's own buffer keeps its untransformed momentum.
    assert torch.equal(chains[2][0].vector(params), m[2])
    with pytest.raises(ValueError, match="one chain per rank"):
        simulate_sends(chains[:2], sends, 0, lambda v: v.mean(0))




def test_the_transform_is_built_from_yaml_keywords_as_lightningcli_does():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--t", type=ByzantineTransform)
    cfg = parser.parse_args(["--t", '{"class_path": "lightning_clip.sim.ByzantineTransform", '
                                    '"init_args": {"ranks": [2], "attack": "scale", "params": {"factor": -100.0}}}'])
    t = parser.instantiate_classes(cfg).t
    assert t.spec == ByzantineSpec(ranks=[2], attack="scale", factor=-100.0) and t.seed == 0


def test_world_size_check_refuses_missing_ranks_and_warns_beyond_num_byzantine():
    t = ByzantineTransform(ranks=[1, 2], attack="sign_flip")
    with pytest.raises(ValueError, match=r"\[0, world_size\) = \[0, 2\)"):
        t.check_world_size(2, 1)
    with pytest.warns(UserWarning, match=r"makes 2 ranks misbehave but `num_byzantine=1`"):
        t.check_world_size(5, 1)
    t.check_world_size(5, 2)
