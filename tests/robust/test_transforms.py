"""Send transforms and their state, in one process: SendBuffers layouts, WorkerMomentum against the recursion
written out, CenterState, and the state protocol's round trips."""

from __future__ import annotations

import pickle

import pytest
import torch

from lightning_clip.robust.transforms import CenterState, SendBuffers, WorkerMomentum
from tests.helpers.sends import context


def test_send_buffers_flatten_and_write_round_trip_across_buckets_and_dtypes():
    a, b = torch.arange(4.0), torch.arange(4.0, 7.0, dtype=torch.float64)
    sent = SendBuffers([a.clone(), b.clone()], [[], []])
    flat = sent.flatten()
    assert flat.dtype == torch.float32 and torch.equal(flat, torch.arange(7.0))  # mixed dtypes: float32
    sent.write_(-flat)
    assert torch.equal(sent.buffers[0], -a) and torch.equal(sent.buffers[1], -b)
    single = SendBuffers([a], [[]])
    assert single.flatten() is not a and torch.equal(single.flatten(), a)  # a copy, never a view


def test_worker_momentum_follows_the_recursion_per_parameter_across_bucket_layouts():
    p1, p2 = torch.zeros(3), torch.zeros(2)
    momentum = WorkerMomentum(0.75)
    grads = [torch.randn(5, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    m = torch.zeros(5)
    for step, g in enumerate(grads):
        m = 0.75 * m + 0.25 * g  # m_0 = 0, no bias correction
        # Step 0: one bucket (p1, p2); later: reversed, one bucket each (DDP's rebuild).
        if step == 0:
            sent = SendBuffers([g.clone()], [[p1, p2]])
        else:
            sent = SendBuffers([g[3:].clone(), g[:3].clone()], [[p2], [p1]])
        momentum(sent, context())
        got = torch.cat([sent.buffers[0], sent.buffers[1]]) if step else sent.buffers[0]
        expected = m if step == 0 else torch.cat([m[3:], m[:3]])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(momentum.vector([p1, p2]), m, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="dense, unpadded buckets"):
        momentum(SendBuffers([torch.zeros(6)], [[p1, p2]]), context())


def test_center_state_round_trips_through_a_vector_and_its_state_dict():
    params = [torch.zeros(2, 3), torch.zeros(4)]
    state = CenterState()
    assert state.vector(params) is None and state.state_dict(params) == {}
    vec = torch.arange(10.0)
    state.load_vector(vec, params)
    assert torch.equal(state.vector(params), vec)
    with pytest.raises(ValueError, match=r"`vector` to be a 1-D tensor of 10 elements"):
        state.load_vector(torch.zeros(9), params)
    other = CenterState()
    other.load_state_dict(state.state_dict(params), params)
    assert torch.equal(other.vector(params), vec) and not CenterState.per_rank
    # The centre follows the flat layout of whatever buckets it is asked for.
    sent = SendBuffers([torch.zeros(4), torch.zeros(6)], [[params[1]], [params[0]]])
    assert torch.equal(state.flat(sent), torch.cat([vec[6:], vec[:6]]))
    assert torch.equal(state.ranges(sent, [(2, 3), (9, 1)], torch.float32), torch.tensor([8.0, 9.0, 0.0, 5.0]))
    state.store(SendBuffers([torch.full((4,), 7.0), torch.ones(6)], [[params[1]], [params[0]]]))
    assert torch.equal(state.vector(params), torch.tensor([1.0] * 6 + [7.0] * 4))


def test_worker_momentum_state_is_per_rank_and_round_trips():
    params = [torch.zeros(3), torch.zeros(2, dtype=torch.float64)]
    momentum = WorkerMomentum(0.5)
    assert WorkerMomentum.per_rank
    state = momentum.state_dict(params)
    assert state["beta"] == 0.5 and torch.equal(state["vector"], torch.zeros(5, dtype=torch.float64))  # m_0 = 0
    momentum.load_vector(torch.arange(5.0, dtype=torch.float64), params)
    other = WorkerMomentum(0.5)
    other.load_state_dict(pickle.loads(pickle.dumps(momentum.state_dict(params))), params)
    assert torch.equal(other.vector(params), torch.arange(5.0, dtype=torch.float64))
    assert other.buffers[id(params[0])].dtype == torch.float32  # kept in the compute dtype of each parameter
