"""gradient_stats / collect_grads against torch.nn.utils.get_total_norm and fp64 references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import get_total_norm

from lightning_clip.core.grads import GradientStats, collect_grads, gradient_stats

SHAPES = [(3,), (5, 4), (7, 2, 3), (1,), (100,), (33, 17), (300, 500), (2, 1, 1, 9)]


def _randn(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _ref_norm(t: torch.Tensor) -> torch.Tensor:
    """fp32 norm of one tensor, computed independently in fp64."""
    return torch.linalg.vector_norm(t.double()).float()


def _ref_total64(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in ts]))


# --------------------------------------------------------------------------------------------------
# fp32 / fp64: bit-identical to torch


@pytest.mark.parametrize("seed", range(8))
def test_fp32_mixed_shapes_bit_identical_to_get_total_norm(seed):
    scale = 10.0 ** (seed - 4)  # 1e-4 .. 1e3
    grads = [_randn(s, seed * 100 + i, scale=scale) for i, s in enumerate(SHAPES)]
    stats = gradient_stats(grads)
    assert isinstance(stats, GradientStats)
    assert stats.num_tensors == len(grads)
    assert stats.total_norm.dtype == torch.float32 and stats.total_norm.shape == ()
    assert torch.equal(stats.total_norm, get_total_norm(grads))
    assert stats.norms.dtype == torch.float32 and stats.norms.shape == (len(grads),)
    for g, n in zip(grads, stats.norms):
        assert torch.equal(n, torch.linalg.vector_norm(g))
    # and both are right (fp64 reference; fp32 summation over 150k entries loses a few ulp)
    torch.testing.assert_close(stats.total_norm.double(), _ref_total64(grads), rtol=1e-5, atol=0)
    assert bool(stats.finite)


def _mixed_fp32_fp64(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 20, (1,), generator=g))
    out = []
    for _ in range(n):
        ndim = int(torch.randint(1, 4, (1,), generator=g))
        shape = tuple(int(x) for x in torch.randint(1, 30, (ndim,), generator=g))
        dtype = (torch.float32, torch.float64)[int(torch.randint(0, 2, (1,), generator=g))]
        scale = float(torch.rand(1, generator=g)) * 10
        out.append((torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_mixed_fp32_fp64_norms_exact_and_total_within_rounding(seed):
    grads = _mixed_fp32_fp64(seed)
    stats = gradient_stats(grads)
    # per-tensor norms: each tensor's own norm (fp64 ones rounded to fp32), in input order
    for g, n in zip(grads, stats.norms):
        assert torch.equal(n, torch.linalg.vector_norm(g).float())
    # total: promoted to fp64 like torch's, and bit-identical to it
    ref = get_total_norm(grads)
    assert stats.total_norm.dtype == ref.dtype
    assert torch.equal(stats.total_norm, ref)


def test_mixed_fp32_fp64_total_bit_identical_to_torch():
    mismatches = [s for s in range(100) if not torch.equal(
        gradient_stats(_mixed_fp32_fp64(s)).total_norm, get_total_norm(_mixed_fp32_fp64(s)))]
    assert mismatches == []


def test_input_order_preserved_when_dtypes_interleave():
    dtypes = [torch.float32, torch.float64, torch.float16, torch.float32, torch.bfloat16, torch.float64,
              torch.float16, torch.float32, torch.bfloat16]
    # distinct magnitudes so that a permutation cannot go unnoticed
    grads = [_randn((4 + i, 3), seed=i, dtype=dt, scale=float(2**i)) for i, dt in enumerate(dtypes)]
    stats = gradient_stats(grads)
    assert stats.norms.shape == (len(grads),)
    for i, (g, n) in enumerate(zip(grads, stats.norms)):
        ref = _ref_norm(g)
        torch.testing.assert_close(n, ref, rtol=1e-6, atol=0, msg=f"tensor {i} ({g.dtype})")
        if g.dtype in (torch.float32, torch.float64):
            assert torch.equal(n, torch.linalg.vector_norm(g).float())
    torch.testing.assert_close(stats.total_norm.double(), _ref_total64(grads), rtol=1e-6, atol=0)
    # the total is the norm of the per-tensor norms
    torch.testing.assert_close(stats.total_norm.float(), torch.linalg.vector_norm(stats.norms), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------
# low precision: accumulated in fp32


def test_fp16_squares_overflow_but_total_is_right():
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # 60000**2 overflows fp16 (max 65504)
    assert torch.isinf(big[:1] * big[:1]).all()
    mid = torch.full((50, 20), 300.0, dtype=torch.float16)  # 300**2 = 9e4 overflows fp16 too
    small = _randn((64,), 3, dtype=torch.float16)
    grads = [big, small, mid]
    stats = gradient_stats(grads)
    assert stats.total_norm.dtype == torch.float32
    assert bool(stats.finite)
    torch.testing.assert_close(stats.total_norm.double(), _ref_total64(grads), rtol=1e-6, atol=0)
    for g, n in zip(grads, stats.norms):
        torch.testing.assert_close(n.double(), torch.linalg.vector_norm(g.double()), rtol=1e-6, atol=0)
    # the total 1.9e6 is not even representable in fp16
    assert stats.total_norm.item() > torch.finfo(torch.float16).max


def test_bf16_accumulates_in_fp32():
    # 100 000 ones: sqrt = 316.2278; a bf16 result could only be 316.0
    ones = torch.ones(100_000, dtype=torch.bfloat16)
    large = torch.full((10,), 1e18, dtype=torch.bfloat16)  # squares 1e36: fine in fp32
    grads = [ones, large]
    stats = gradient_stats(grads)
    torch.testing.assert_close(stats.norms[0].double(), torch.tensor(math.sqrt(100_000), dtype=torch.float64),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.total_norm.double(), _ref_total64(grads), rtol=1e-6, atol=0)
    assert bool(stats.finite)


def test_bf16_range_limit_matches_torch_fp32_behaviour():
    """Documented limit: bf16 has fp32's exponent range, so entries above ~1.8e19 overflow the fp32
    accumulation -- exactly what torch's own norm does for fp32 gradients of that size."""
    bf16 = [torch.full((10,), 1e20, dtype=torch.bfloat16)]
    fp32 = [t.float() for t in bf16]
    assert not bool(gradient_stats(bf16).finite)
    assert not torch.isfinite(get_total_norm(fp32))
    ok = [torch.full((10,), 1e18, dtype=torch.bfloat16)]
    torch.testing.assert_close(gradient_stats(ok).total_norm.double(), _ref_total64(ok), rtol=1e-2, atol=0)


# --------------------------------------------------------------------------------------------------
# non-finite, empty, collect_grads


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_entries_clear_the_finite_flag(bad, dtype):
    grads = [_randn((5, 5), 0, dtype=dtype), _randn((7,), 1, dtype=dtype), _randn((3, 2), 2, dtype=dtype)]
    grads[1][4] = bad
    stats = gradient_stats(grads)
    assert stats.finite.dtype == torch.bool and stats.finite.shape == ()
    assert not bool(stats.finite)
    assert not math.isfinite(stats.total_norm.item())
    finite = torch.isfinite(stats.norms).tolist()
    assert finite == [True, False, True]  # the culprit is identifiable by position
    if math.isnan(bad):
        assert math.isnan(stats.norms[1].item())
    else:
        assert stats.norms[1].item() == float("inf")


def test_finite_flag_true_for_finite_grads():
    assert bool(gradient_stats([_randn((10,), 0)]).finite)
    assert bool(gradient_stats([torch.zeros(3), torch.zeros(2, 2)]).finite)
    assert gradient_stats([torch.zeros(3)]).total_norm.item() == 0.0


def test_empty_list():
    stats = gradient_stats([])
    assert stats.num_tensors == 0
    assert stats.norms.shape == (0,) and stats.norms.dtype == torch.float32
    assert stats.total_norm.shape == () and stats.total_norm.dtype == torch.float32
    assert stats.total_norm.item() == 0.0
    assert torch.equal(stats.total_norm, get_total_norm([]))
    assert bool(stats.finite)


def test_collect_grads_skips_params_without_grad():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(2,), (3, 3), (4,), (1,), (5,)]]
    for i in (0, 2, 4):
        params[i].grad = torch.full_like(params[i], float(i + 1))
    grads, index = collect_grads(iter(params))  # any iterable, e.g. a generator
    assert index == [0, 2, 4]
    assert len(grads) == 3
    for g, i in zip(grads, index):
        assert g is params[i].grad  # the tensors themselves, not copies
    stats = gradient_stats(grads)
    torch.testing.assert_close(stats.total_norm, get_total_norm([p.grad for p in params if p.grad is not None]),
                               rtol=0, atol=0)
    assert collect_grads([torch.nn.Parameter(torch.zeros(2))]) == ([], [])


def test_stats_is_frozen():
    stats = gradient_stats([torch.ones(2)])
    with pytest.raises(AttributeError):
        stats.num_tensors = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# DTensor: 2 gloo processes, each rank holds a shard


def _dtensor_available() -> bool:
    try:
        import torch.distributed as dist
        from torch.distributed.tensor import Shard, distribute_tensor  # noqa: F401

        return dist.is_available() and dist.is_gloo_available()
    except Exception:  # pragma: no cover - depends on the torch build
        return False


# Run as a script: rank 0 is the script's process, rank 1 a spawned child. Both load lightning_clip/grads.py
# through a stub ``lightning_clip`` package (no package __init__, so no Lightning import: fast start).
_DTENSOR_SCRIPT = r"""
import os, socket, sys, types
from datetime import timedelta

PKG_DIR = sys.argv[1] if __name__ == "__main__" else None
if "lightning_clip" not in sys.modules:
    import os
    PKG_DIR = os.environ["LC_PKG_DIR"]
    stub = types.ModuleType("lightning_clip")
    stub.__path__ = [PKG_DIR]
    sys.modules["lightning_clip"] = stub

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from lightning_clip.core.grads import gradient_stats


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def worker(rank, world_size, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        full = [randn((10, 3), 0), randn((7,), 1), randn((4, 6), 2),
                torch.full((8, 2), 300.0, dtype=torch.float16),  # squares overflow fp16
                randn((5,), 3)]
        grads = [
            distribute_tensor(full[0], mesh, [Shard(0)]),
            full[1],  # a plain tensor between DTensors: the order must be kept
            distribute_tensor(full[2], mesh, [Shard(1)]),
            distribute_tensor(full[3], mesh, [Shard(0)]),
            distribute_tensor(full[4], mesh, [Replicate()]),
        ]
        # not vacuous: each rank really holds only a part of the sharded tensors
        assert grads[0].to_local().shape == (10 // world_size, 3)
        assert not torch.allclose(torch.linalg.vector_norm(grads[0].to_local()), torch.linalg.vector_norm(full[0]))

        stats = gradient_stats(grads)
        assert type(stats.total_norm) is torch.Tensor and type(stats.norms) is torch.Tensor
        assert stats.norms.shape == (5,), stats.norms.shape
        for i, f in enumerate(full):
            torch.testing.assert_close(stats.norms[i].double(), torch.linalg.vector_norm(f.double()),
                                       rtol=1e-6, atol=0, msg=f"tensor {i}")
        total = torch.linalg.vector_norm(torch.cat([f.double().flatten() for f in full]))
        torch.testing.assert_close(stats.total_norm.double(), total, rtol=1e-6, atol=0)
        assert bool(stats.finite)
    except BaseException:
        dist.destroy_process_group()
        raise
    else:
        dist.barrier()  # every rank done before any tears down its gloo pairs
        dist.destroy_process_group()
        if rank != 0:  # the child: leave before the interpreter's finalization, where gloo's and DTensor's
            sys.stdout.flush()  # threads still alive can abort a process that has done its work
            sys.stderr.flush()
            os._exit(0)


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=worker, args=(1, 2, port))
    child.start()
    try:
        worker(0, 2, port)
    finally:
        child.join(timeout=90)
        if child.is_alive():
            child.terminate()
    assert child.exitcode == 0, f"rank 1 failed with exit code {child.exitcode}"
    print("DTENSOR-OK")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # rank 0 likewise
"""


@pytest.mark.distributed
@pytest.mark.skipif(not _dtensor_available(), reason="torch.distributed.tensor (DTensor) or gloo unavailable")
def test_dtensor_sharded_norm_equals_unsharded_norm(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    pkg_dir = str(Path(__file__).resolve().parents[2] / "lightning_clip")
    script = tmp_path / "dtensor_norm.py"
    script.write_text(_DTENSOR_SCRIPT)
    env = dict(os.environ, LC_PKG_DIR=pkg_dir)
    proc = subprocess.run([sys.executable, str(script), pkg_dir], capture_output=True, text=True, timeout=180,
                          env=env, cwd=str(tmp_path))
    assert proc.returncode == 0 and "DTENSOR-OK" in proc.stdout, proc.stdout + proc.stderr
