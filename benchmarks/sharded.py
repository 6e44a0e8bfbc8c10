"""Cost of clipping sharded (FSDP2 DTensor) gradients: ours against torch's ``clip_grad_norm_`` on the same gradients.

2 gloo ranks on CPU, an MLP of ``--layers`` Linear layers (2 gradient tensors each) sharded with
``fully_shard``; after one backward, each rank times, interleaved in the same rounds:

* torch: ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` on the DTensor gradients;
* ours: the library's ``gradient_stats`` (local sums of squares, one all-reduce per mesh dimension) then
  its ``clip_grads_with_norm_`` with the same ``max_norm``.

``max_norm`` is huge, so neither changes the gradients and every round measures the same work. Printed:
the median per round on rank 0 and the ratio ours / torch, with the collectives each issued per call
(gloo all-reduces seen by the profiler).

Usage (from the repository root)::

    python -m benchmarks.sharded               # 150 layers = 300 gradient tensors, ~12M parameters
    python -m benchmarks.sharded --quick       # 30 layers, a few seconds, into a temporary directory
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.common import (
    StdoutRecord,
    add_output_arguments,
    clip_grads_with_norm_,
    gradient_stats,
    machine,
    output_dir,
    run_ranks,
)

MAX_NORM = 1e30


def _ours(grads: list[Any]) -> None:
    stats = gradient_stats(grads)
    clip_grads_with_norm_(grads, MAX_NORM, stats.total_norm)


def _gloo_all_reduces(fn: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "gloo:all_reduce")


def _worker(rank: int, world: int, args: argparse.Namespace) -> tuple[int, int, dict[str, float], dict[str, int]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    for m in net:
        fully_shard(m, mesh=mesh)
    fully_shard(net, mesh=mesh)
    x = torch.randn(4, args.width, generator=torch.Generator().manual_seed(rank))
    net(x).square().mean().backward()
    params = list(net.parameters())
    grads = [p.grad for p in params]

    def torch_clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)

    def ours() -> None:
        _ours(grads)

    runs = {"torch clip_grad_norm_": torch_clip, "ours (gradient_stats + clip_grads_with_norm_)": ours}
    collectives = {label: _gloo_all_reduces(fn) for label, fn in runs.items()}
    times: dict[str, list[float]] = {label: [] for label in runs}
    for r in range(args.warmup + args.rounds):
        order = list(runs.items()) if r % 2 == 0 else list(reversed(runs.items()))
        for label, fn in order:
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            if r >= args.warmup:
                times[label].append(elapsed)
    medians = {label: statistics.median(t) * 1e3 for label, t in times.items()}
    return len(grads), sum(p.numel() for p in params), medians, collectives


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=150, help="Linear layers (2 gradient tensors each; 150)")
    parser.add_argument("--width", type=int, default=280, help="layer width (default 280: ~12M parameters)")
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds (default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds (default 5)")
    add_output_arguments(parser, "30 layers, 20 rounds")
    args = parser.parse_args(argv)
    record = StdoutRecord(output_dir(args.out, args.quick, "sharded"), "sharded.txt")
    if args.quick:
        args.layers, args.rounds, args.warmup = 30, 20, 2
    world = 2
    num_tensors, num_params, medians, collectives = run_ranks(_worker, world, (args,))[0]
    record.start()
    print(f"Clipping FSDP2 gradients: {world} gloo ranks on CPU, {num_tensors} gradient tensors, "
          f"{num_params / 1e6:.1f}M parameters, median of {args.rounds} interleaved rounds on rank 0")
    print(f"machine: {machine()}")
    header = f"{'':<48} {'median ms':>10} {'all-reduces/call':>17}"
    print(header)
    print("-" * len(header))
    for label, ms in medians.items():
        print(f"{label:<48} {ms:>10.3f} {collectives[label]:>17}")
    labels = list(medians)
    print(f"ratio ours / torch: {medians[labels[1]] / medians[labels[0]]:.3f}  (target <= 1.10)")
    record.close()


if __name__ == "__main__":
    main()
