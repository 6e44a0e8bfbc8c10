"""Spawn target of the sharded-exchange tests: many scenarios in one gloo process group, results saved per rank.

The parent rebuilds every rank's vector from :func:`vectors` and computes the reference with
:func:`~lightning_clip.robust.pipeline.aggregate` in one process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_clip.distributed.exchange import Transport
from lightning_clip.distributed.hook import ARCHookState, reduce_robust
from lightning_clip.robust import pipeline
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.transforms import SendBuffers
from tests.helpers.gloo import close_group

#: Uneven bucket sizes: the flat vector is split like DDP's buckets (d = 2 + 5 + ... not divisible by n).
BUCKETS = (29, 3, 45)
D = sum(BUCKETS)  # 77
NAN_RANK = 1


def cases(n: int) -> list[dict[str, Any]]:
    """The scenarios for ``n`` ranks: ``exact`` ones must match the one-process reference bit for bit."""
    out: list[dict[str, Any]] = []
    for rule in ("mean", "cwtm", "median", "meamed"):
        out.append({"rule": rule, "exact": True})
    out += [
        {"rule": "cwtm", "dtype": "bfloat16", "exact": True},
        {"rule": "meamed", "dtype": "bfloat16", "nan": True, "exact": True},
        {"rule": "cwtm", "nan": True, "exact": True},
        {"rule": "median", "arc": False, "static_clip": 1.5, "exact": True},
        {"rule": "cwtm", "nnm": True},
        {"rule": "mean", "nnm": True, "nan": True},
        {"rule": "krum"},
        {"rule": "multikrum", "dtype": "bfloat16"},
        {"rule": "geomed"},
        {"rule": "geomed", "nnm": True, "nan": True},
        {"rule": "cclip", "cclip_tau": 0.5, "cclip_iters": 2, "steps": 3},
        # one bucket of n * 20 elements: sent and received in place, no flatten copy
        {"rule": "cwtm", "one_bucket": True, "exact": True},
        {"rule": "cclip", "one_bucket": True, "steps": 2},
    ]
    if n != 4:  # with 4 ranks NNM (3 nearest) leaves two pairs of equal rows here: Krum ties, no defined selection
        out.append({"rule": "multikrum", "nnm": True})
    if n >= 5:
        out.append({"rule": "meamed", "bucket_size": 2, "bucket_seed": 3, "steps": 3, "exact": True})
        out.append({"rule": "krum", "bucket_size": 2, "nnm": True, "steps": 2})
    return out


def length(n: int, case: dict[str, Any]) -> int:
    """``n * 20`` for a one-bucket case, else ``D``."""
    return n * 20 if case.get("one_bucket") else D


def vectors(n: int, case: int, step: int, dtype: torch.dtype, nan: bool, d: int = D) -> Tensor:
    """Every rank's flat vector ``[n, d]``: tie-free, rank ``n - 1`` much larger, rank 1 NaN where asked."""
    g = torch.Generator().manual_seed(10_000 * n + 100 * case + step)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 1.5, n, dtype=torch.float64)[:, None]
    x[n - 1] *= 20
    x = x.to(dtype)
    if nan:
        x[NAN_RANK, ::7] = float("nan")
    return x


def config(case: dict[str, Any], comm: str = "sharded") -> ARCConfig:
    keys = ("nnm", "arc", "static_clip", "bucket_size", "bucket_seed", "cclip_tau", "cclip_iters")
    return ARCConfig(num_byzantine=1, aggregator=case["rule"], robust_comm=comm,
                     **{k: case[k] for k in keys if k in case})


def _sent(flat: Tensor, params: list[list[Tensor]]) -> SendBuffers:
    if flat.numel() != D:
        return SendBuffers([flat.clone()], params)
    buffers, offset = [], 0
    for size in BUCKETS:
        buffers.append(flat[offset : offset + size].clone())
        offset += size
    return SendBuffers(buffers, params)


#: Rules of the raw-DDP run with tiny buckets (the hook sends each bucket in its own call).
OVERLAP_RULES = ("cwtm", "geomed")
OVERLAP_STEPS = 3


def overlap_run(rank: int, rule: str) -> dict[str, Any]:
    """Raw DDP over the default group, tiny buckets, ``rule`` with ARC (f = 1) and SGD for a few steps.

    Records, per step, the gradient DDP handed back (parameter order), the weights after the step, the
    hook's flat layout (parameter indices in bucket order) and, at every bucket's call, how many buckets
    the step had already started sending.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lightning_clip.distributed.hook import arc_hook
    from tests.helpers import ddp as h  # loads Lightning: only here

    net = h.make_net()
    index = {id(p): i for i, p in enumerate(net.parameters())}
    state = ARCHookState(ARCConfig(num_byzantine=1, aggregator=rule))
    calls: list[tuple[int, list[int], int]] = []

    def hook(st: ARCHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        fut = arc_hook(st, bucket)
        started = -1 if st.exchange is None else len(st.exchange.exchange.buckets)
        calls.append((bucket.index(), [index[id(p)] for p in bucket.parameters()], started))
        return fut

    # DDP checks the real annotation objects (this module's are strings)
    hook.__annotations__ = {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
    model = DDP(net, bucket_cap_mb=h.TINY_BUCKET_MB)
    model.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=h.LR)
    steps = []
    for step in range(OVERLAP_STEPS):
        calls.clear()
        opt.zero_grad()
        x, y = h.rank_batch(rank, step)
        (torch.nn.functional.mse_loss(model(x), y) * (1.0 + rank)).backward()
        opt.step()
        steps.append({"params": h.param_vector(net).clone(), "calls": list(calls),
                      "grad": torch.cat([p.grad.reshape(-1) for p in net.parameters()]),
                      "workspace": None if state.workspace is None else state.workspace.numel()})
    return {"steps": steps}


def worker(rank: int, world_sizes: tuple[int, ...], port: int, out_dir: str, trainer: bool = False) -> None:
    """Run every case for every world size ``n`` (a group of the first ``n`` ranks) in one process group."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=max(world_sizes))
    pipeline.CHUNK = 4  # several column chunks per block even at this size
    try:
        res: dict[str, Any] = {}
        for n in world_sizes:
            group = dist.new_group(list(range(n)))  # every rank takes part in creating it
            if rank >= n:
                continue
            for i, case in enumerate(cases(n)):
                dtype = getattr(torch, case.get("dtype", "float32"))
                sizes = [length(n, case)] if case.get("one_bucket") else BUCKETS
                params = [[torch.zeros(size)] for size in sizes]  # stand-ins: the centre is kept per parameter
                for comm_kind in ("sharded", "gather"):
                    state = ARCHookState(config(case, comm_kind), process_group=group)  # keeps the cclip centre
                    steps = []
                    for step in range(case.get("steps", 1)):
                        x = vectors(n, i, step, dtype, case.get("nan", False), length(n, case))
                        sent = _sent(x[rank], params)
                        comm = Transport(group, step)
                        stats = reduce_robust(state, sent, comm)
                        steps.append({"agg": torch.cat(sent.buffers), "norms": stats.norms.clone(),
                                      "scales": stats.scales.clone(), "comm": dict(comm.bytes)})
                    res[f"{n}/{comm_kind}{i}"] = steps
        res["overlap"] = {rule: overlap_run(rank, rule) for rule in OVERLAP_RULES}
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        if trainer:  # Lightning on every rank: checkpoint every 2 steps, then resume from step 2
            os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(max(world_sizes)),
                               "NODE_RANK": "0"})  # an external launcher's environment: Lightning starts nothing
            from tests.helpers import exchange_trainer as st  # loads Lightning

            root = Path(out_dir)
            st.fit(root, "full", max(world_sizes), ckpt_dir=root / "ckpt")
            st.fit(root, "resumed", max(world_sizes), ckpt_path=root / "ckpt" / "step=2.ckpt")
    except BaseException:
        dist.destroy_process_group()
        raise
    else:
        close_group()
