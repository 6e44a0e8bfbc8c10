"""Cost of ARC across DDP ranks: plain DDP vs ``arc_hook`` with the mean vs ``arc_hook`` with CWTM.

Runs ``--world`` gloo ranks on CPU (``torch.multiprocessing``, raw ``DistributedDataParallel`` with the
hook registered directly; no Lightning) on an MLP of about ``--params`` parameters, and prints per mode:

* the median wall time of one training step (forward, backward with the gradient reduction, SGD
  step), measured on rank 0 between barriers;
* the collectives' payload per step and rank: all-reduced bytes and all-gathered (output) bytes. For
  the ARC modes they are counted by the hook itself (``ARCHookState.last_comm_bytes``, summed over the
  collectives it issues); for plain DDP they are the gradient bytes, which is what DDP all-reduces;
* an estimate of the bytes each rank sends with ring algorithms: ``2 (n-1)/n`` times the all-reduced
  bytes plus ``(n-1)/n`` times the gathered bytes.

Usage::

    python benchmarks/arc_ddp.py            # 4 ranks, ~25M parameters
    python benchmarks/arc_ddp.py --quick    # ~1M parameters, a few seconds

Prints the table and writes it to ``arc_ddp.txt`` in ``--out`` (default ``benchmarks/results``; with
``--quick`` a new temporary directory).

Timings on a shared CPU machine are noisy: compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import free_port  # noqa: E402
from _results import StdoutRecord, add_output_arguments, output_dir  # noqa: E402

from lightning_clip.distributed.config import ARCConfig  # noqa: E402
from lightning_clip.distributed.hook import ARCHookState, arc_hook  # noqa: E402

MODES = (
    ("plain DDP", None),
    ("ddp_arc mean", "mean"),
    ("ddp_arc cwtm", "cwtm"),
)


def _make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _time_modes(modes, warmup: int, steps: int, x, y, args: argparse.Namespace) -> list:
    """Median step time and per-step payload of each mode, their steps interleaved round by round."""
    runs = []
    for label, aggregator in modes:
        net = _make_model(args.width, args.depth)
        model = DDP(net)
        state = None
        if aggregator is not None:
            state = ARCHookState(ARCConfig(num_byzantine=args.num_byzantine, aggregator=aggregator))
            model.register_comm_hook(state, arc_hook)
        runs.append((label, model, state, torch.optim.SGD(model.parameters(), lr=1e-3), []))
    for step in range(warmup + steps):
        for _, model, _, opt, times in runs:
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            dist.barrier()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
    rows = []
    for label, model, state, _, times in runs:
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # Plain DDP all-reduces exactly the gradients; the hook counts its own collectives.
        comm = {"all_reduce": grad_bytes, "all_gather": 0} if state is None else dict(state.last_comm_bytes)
        rows.append((label, statistics.median(times), comm))
    return rows


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, args.width, generator=gen)
        y = torch.randn(args.batch, args.width, generator=gen)
        # Plain DDP and ARC-mean steps are interleaved (one of each per round) so that the load of a
        # shared machine hits both alike; the slow robust mode runs afterwards, on its own.
        fast = [(label, agg) for label, agg in MODES if agg in (None, "mean")]
        slow = [] if args.skip_robust else [(label, agg) for label, agg in MODES if agg not in (None, "mean")]
        rows = _time_modes(fast, args.warmup, args.steps, x, y, args)
        rows += _time_modes(slow, min(args.warmup, 1), min(args.steps, args.robust_steps), x, y, args)
        if rank == 0:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4, help="number of gloo ranks (default 4)")
    parser.add_argument("--params", type=float, default=25e6, help="approximate parameter count (default 25e6)")
    parser.add_argument("--depth", type=int, default=6, help="number of Linear layers (default 6)")
    parser.add_argument("--batch", type=int, default=8, help="per-rank batch size (default 8)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (default 2)")
    parser.add_argument("--robust-steps", type=int, default=3, help="timed steps of the CWTM mode (default 3)")
    parser.add_argument("--num-byzantine", type=int, default=1, help="ARC's f (default 1)")
    parser.add_argument("--skip-robust", action="store_true", help="skip the CWTM mode (n x d memory per rank)")
    add_output_arguments(parser, "~1M parameters, 3 timed steps")
    args = parser.parse_args(argv)
    record = StdoutRecord(output_dir(args.out, args.quick, "arc_ddp"), "arc_ddp.txt")
    if args.quick:
        args.params, args.steps, args.warmup = 1e6, 3, 1
    args.width = max(8, int((args.params / args.depth) ** 0.5))
    num_params = args.depth * (args.width * args.width + args.width)

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args.world, free_port(), args, queue), nprocs=args.world,
                       start_method="spawn", join=True)
    rows = queue.get()
    record.start()

    n = args.world
    base = rows[0][1]
    print(f"ARC across DDP ranks: {n} gloo ranks on CPU ({os.cpu_count()} cores), MLP {args.depth}x{args.width} "
          f"= {num_params / 1e6:.1f}M parameters, batch {args.batch}/rank, f = {args.num_byzantine}, "
          f"median of {args.steps} steps ({min(args.steps, args.robust_steps)} for cwtm)")
    header = f"{'mode':<14} {'step [ms]':>10} {'vs plain':>9} {'all-reduce':>12} {'all-gather':>12} {'sent/rank*':>12}"
    print(header)
    print("-" * len(header))
    for label, t, comm in rows:
        sent = 2 * (n - 1) / n * comm["all_reduce"] + (n - 1) / n * comm["all_gather"]
        print(f"{label:<14} {t * 1e3:>10.1f} {t / base:>8.2f}x {_fmt_bytes(comm['all_reduce']):>12} "
              f"{_fmt_bytes(comm['all_gather']):>12} {_fmt_bytes(sent):>12}")
    print("* ring-algorithm estimate: 2(n-1)/n x all-reduced + (n-1)/n x gathered bytes")
    record.close()


if __name__ == "__main__":
    main()
