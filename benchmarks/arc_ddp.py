"""Cost of ARC and robust aggregation across DDP ranks: plain DDP vs ``arc_hook`` with the mean and robust rules.

Runs ``--world`` gloo ranks on CPU (``torch.multiprocessing``, raw ``DistributedDataParallel`` with the
hook registered directly; no Lightning) on an MLP of about ``--params`` parameters. Each mode is timed
side by side with plain DDP (their steps interleaved round by round, so the load of a shared machine
hits both alike; ``vs plain`` is the ratio of the two medians of that window) and reports per rank:

* the median wall time of one training step (forward, backward with the gradient reduction, SGD
  step), measured on rank 0 between barriers;
* the bytes this rank sends per step with ring algorithms, from the payloads the hook counts
  (``ARCHookState.last_comm_bytes``): ``2 (n-1)/n`` of the all-reduced bytes, ``(n-1)/n`` of the
  all-to-all input and ``(n-1)/n`` of the all-gathered output; plain DDP all-reduces the gradients;
* the peak extra memory of a step over plain DDP's (the process's peak resident set during the step
  minus the resident set before it, ``/proc/self/status`` ``VmHWM`` after resetting it), plus what the
  hook keeps between steps (the sharded path's workspace: a copy of the local vector), in MiB and in
  gradients.

Robust modes use the library's sharded pipeline unless labelled
``gather`` (``robust_comm="gather"``: every rank all-gathers every gradient).

Usage (from the repository root)::

    python -m benchmarks.arc_ddp            # 4 ranks, ~25M parameters
    python -m benchmarks.arc_ddp --quick    # ~1M parameters, a few seconds

Prints the table and writes it to ``arc_ddp.txt`` in ``--out`` (default ``benchmarks/results``; with
``--quick`` a new temporary directory).

Timings on a shared CPU machine are noisy: compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.common import (
    ARCConfig,
    ARCHookState,
    StdoutRecord,
    add_output_arguments,
    arc_hook,
    output_dir,
    run_ranks,
)

#: (label, ARCConfig keywords or None for plain DDP).
MODES: tuple[tuple[str, dict[str, Any] | None], ...] = (
    ("plain DDP", None),
    ("ddp_arc mean", {"aggregator": "mean"}),
    ("sharded cwtm", {"aggregator": "cwtm"}),
    ("sharded nnm+cwtm", {"aggregator": "cwtm", "nnm": True}),
    ("sharded multikrum", {"aggregator": "multikrum"}),
    ("sharded geomed", {"aggregator": "geomed"}),
    ("sharded cclip", {"aggregator": "cclip", "cclip_tau": 1.0}),
    ("gather cwtm", {"aggregator": "cwtm", "robust_comm": "gather"}),
)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _build(kwargs: dict[str, Any] | None, args: argparse.Namespace) -> tuple[DDP, ARCHookState | None, Any]:
    model = DDP(_make_model(args.width, args.depth))
    state = None
    if kwargs is not None:
        state = ARCHookState(ARCConfig(num_byzantine=args.num_byzantine, **kwargs))
        model.register_comm_hook(state, arc_hook)
    return model, state, torch.optim.SGD(model.parameters(), lr=1e-3)


def _step(model: DDP, opt: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One timed step: seconds and the peak resident growth during it (KiB)."""
    dist.barrier()
    before = _status_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=False)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    dist.barrier()
    return time.perf_counter() - t0, _status_kib("VmHWM") - before


def _time_pair(kwargs: dict[str, Any] | None, warmup: int, steps: int, x, y, args: argparse.Namespace) -> dict:
    """Plain DDP and one mode, steps interleaved; medians of time and of peak growth for both."""
    runs = [_build(None, args), _build(kwargs, args)]
    times: list[list[float]] = [[], []]
    peaks: list[list[int]] = [[], []]
    for step in range(warmup + steps):
        for i, (model, _, opt) in enumerate(runs):
            t, peak = _step(model, opt, x, y)
            if step >= warmup:
                times[i].append(t)
                peaks[i].append(peak)
    model, state, _ = runs[1]
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    comm = {"all_reduce": grad_bytes} if state is None else dict(state.last_comm_bytes)
    # Memory the hook keeps from step to step (the sharded path's workspace) is allocated before the timed
    # steps' peaks are taken, so it is added here.
    kept = 0 if state is None or state.workspace is None else state.workspace.numel() * state.workspace.element_size()
    return {"plain": statistics.median(times[0]), "time": statistics.median(times[1]), "comm": comm,
            "extra_kib": statistics.median(peaks[1]) - statistics.median(peaks[0]) + kept / 1024,
            "grad_bytes": grad_bytes}


def _worker(rank: int, world: int, args: argparse.Namespace) -> list[tuple[str, dict, int]]:
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randn(args.batch, args.width, generator=gen)
    rows = []
    for label, kwargs in MODES:
        if args.skip_gather and kwargs is not None and kwargs.get("robust_comm") == "gather":
            continue
        if args.modes and label != "plain DDP" and not any(m in label for m in args.modes):
            continue
        slow = kwargs is not None and kwargs.get("robust_comm") == "gather"
        steps = min(args.steps, args.gather_steps) if slow else args.steps
        rows.append((label, _time_pair(kwargs, min(args.warmup, 1) if slow else args.warmup, steps, x, y, args),
                     steps))
    return rows


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def sent_bytes(comm: dict[str, int], n: int) -> float:
    """Bytes one rank sends with ring algorithms for the payloads ``comm`` the hook counted."""
    return (n - 1) / n * (2 * comm.get("all_reduce", 0) + comm.get("all_to_all", 0) + comm.get("all_gather", 0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4, help="number of gloo ranks (default 4)")
    parser.add_argument("--params", type=float, default=25e6, help="approximate parameter count (default 25e6)")
    parser.add_argument("--depth", type=int, default=6, help="number of Linear layers (default 6)")
    parser.add_argument("--batch", type=int, default=8, help="per-rank batch size (default 8)")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per mode (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (default 2)")
    parser.add_argument("--gather-steps", type=int, default=3, help="timed steps of the gather mode (default 3)")
    parser.add_argument("--num-byzantine", type=int, default=1, help="ARC's f (default 1)")
    parser.add_argument("--skip-gather", action="store_true", help="skip the gather mode (n x d memory per rank)")
    parser.add_argument("--modes", nargs="+", default=[], metavar="TEXT",
                        help="only the rows whose label contains one of these (and plain DDP), e.g. cwtm geomed")
    add_output_arguments(parser, "~1M parameters, 3 timed steps")
    args = parser.parse_args(argv)
    record = StdoutRecord(output_dir(args.out, args.quick, "arc_ddp"), "arc_ddp.txt")
    if args.quick:
        args.params, args.steps, args.warmup = 1e6, 3, 1
    args.width = max(8, int((args.params / args.depth) ** 0.5))
    num_params = args.depth * (args.width * args.width + args.width)

    wall = time.perf_counter()
    rows = run_ranks(_worker, args.world, (args,), threads=max(1, (os.cpu_count() or 1) // args.world))[0]
    wall = time.perf_counter() - wall
    record.start()

    n = args.world
    print(f"ARC across DDP ranks: {n} gloo ranks on CPU ({os.cpu_count()} cores), MLP {args.depth}x{args.width} "
          f"= {num_params / 1e6:.1f}M parameters, batch {args.batch}/rank, f = {args.num_byzantine}, "
          f"median of {args.steps} steps per mode ({args.gather_steps} for gather), each interleaved with "
          f"plain DDP; {wall:.0f} s in all")
    header = (f"{'mode':<18} {'step [ms]':>10} {'vs plain':>9} {'sent/rank*':>11} {'extra mem/rank**':>17} "
              f"{'all-reduce':>11} {'all-to-all':>11} {'all-gather':>11}")
    print(header)
    print("-" * len(header))
    for label, r, _ in rows:
        if label == "plain DDP":
            t, ratio, extra = r["plain"], 1.0, 0.0
        else:
            t, ratio, extra = r["time"], r["time"] / r["plain"], r["extra_kib"] * 1024.0
        comm = r["comm"]
        mem = f"{_fmt_bytes(max(extra, 0.0))} ({max(extra, 0.0) / r['grad_bytes']:.2f} g)"
        print(f"{label:<18} {t * 1e3:>10.1f} {ratio:>8.2f}x {_fmt_bytes(sent_bytes(comm, n)):>11} {mem:>17} "
              f"{_fmt_bytes(comm.get('all_reduce', 0)):>11} {_fmt_bytes(comm.get('all_to_all', 0)):>11} "
              f"{_fmt_bytes(comm.get('all_gather', 0)):>11}")
    print("* ring algorithms: (n-1)/n x (2 x all-reduced + all-to-all input + all-gathered output) bytes")
    print("** peak resident growth during a step minus plain DDP's, plus the buffers the hook keeps between steps, "
          "in MiB and in gradients (g); the 'plain DDP' row is the first window (plain DDP against itself)")
    record.close()


if __name__ == "__main__":
    main()
