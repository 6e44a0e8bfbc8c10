"""Per-step cost of per-group thresholds (``GradientClipping(groups=...)``) against one threshold and torch's clip.

Real ``Trainer`` runs on the gradients of ``benchmarks.overhead`` (its bench module, no-op optimizer and timing
callbacks: a timer placed first and one placed last bracket ``GradientClipping.on_before_optimizer_step``, and the
last one then runs torch's ``get_total_norm`` + ``clip_grads_with_norm_`` on the same gradients in the same step):

- ``one threshold``: ``GradientClipping(PercentileThreshold(...))``, the single-group path;
- ``K groups``: the optimizer's tensors split into ``K + 1`` param groups; ``groups={0: ..., ..., K-1: ...}`` gives
  the first ``K`` their own ``PercentileThreshold``, the last is clipped by the main one; each by its own norm.

Reported: median and mean ms per step and the ratio to torch's clip measured in the same steps (the shared
machine's noise hits both alike). The single-group ratio is the one to compare with ``overhead.txt``'s (c)/(a).

Run (from the repository root): ``python -m benchmarks.group_overhead`` (a few minutes) or ``--quick`` (seconds).
Prints the table and writes ``group_overhead.txt`` into ``--out`` (default ``benchmarks/results``; with ``--quick``
a temporary directory).
"""

from __future__ import annotations

import argparse
import gc
import os

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from benchmarks.common import (
    add_output_arguments,
    command_line,
    machine,
    md_table,
    output_dir,
    summary_stats,
    write_results,
)
from benchmarks.overhead import LOG_EVERY, Bench, BenchModule, NoOpOptimizer, NullLogger, StartTimer, StopTimer
from lightning_clip import GradientClipping, PercentileThreshold


class _GroupedModule(BenchModule):
    """The bench module with its tensors split into ``num_groups`` contiguous optimizer param groups."""

    def __init__(self, n_tensors: int, numel: int, num_groups: int) -> None:
        super().__init__(n_tensors, numel)
        self.num_groups = num_groups

    def configure_optimizers(self):
        params = list(self.weights)
        per = -(-len(params) // self.num_groups)
        return NoOpOptimizer([{"params": params[i:i + per]} for i in range(0, len(params), per)])


def _policy() -> PercentileThreshold:
    return PercentileThreshold(percentile=90.0, warmup_steps=5, warmup_threshold=1.0)


def run(n_tensors: int, numel: int, groups: int, warmup: int, reps: int) -> Bench:
    """One Trainer run with ``groups`` own-policy param groups (0: the single-group path)."""
    model = _GroupedModule(n_tensors, numel, groups + 1)
    bench = Bench(warmup)
    clip = GradientClipping(_policy(), summary=False, groups={i: _policy() for i in range(groups)} or None)
    steps = warmup + reps
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=NullLogger(),
                         log_every_n_steps=LOG_EVERY, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[StartTimer(bench), clip, StopTimer(bench)])
    gc.collect()
    # a list is a map-style dataset (__getitem__ + __len__); torch annotates the Dataset class
    trainer.fit(model, DataLoader(list(range(steps)), batch_size=1))  # type: ignore[arg-type]
    assert len(bench.times["c"]) == reps, f"expected {reps} measured steps, got {len(bench.times['c'])}"
    assert clip.steps.get(0) == steps
    del model
    gc.collect()
    return bench


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_arguments(parser, "a few small steps, into a temporary directory")
    parser.add_argument("--tensors", type=int, default=160)
    parser.add_argument("--numel", type=int, default=None, help="entries per gradient tensor (default 1.25M)")
    parser.add_argument("--reps", type=int, default=None, help="measured steps per run (default 60)")
    parser.add_argument("--groups", default="0,1,4,16", help="comma-separated numbers of own-policy groups")
    args = parser.parse_args(argv)
    numel = args.numel or (20_000 if args.quick else 1_250_000)
    reps = args.reps or (10 if args.quick else 60)
    warmup = 3 if args.quick else 10
    out = output_dir(args.out, args.quick, "group_overhead")
    ms = 1e3
    rows = []
    for k in (int(v) for v in args.groups.split(",") if v.strip()):
        bench = run(args.tensors, numel, k, warmup, reps)
        sa, sc = summary_stats(bench.times["a"]), summary_stats(bench.times["c"])
        name = "one threshold (single-group path)" if k == 0 else f"{k} groups + the ungrouped rest"
        rows.append([name, f"{sc['median'] * ms:.2f}", f"{sc['mean'] * ms:.2f}", f"{sa['median'] * ms:.2f}",
                     f"{sc['median'] / sa['median']:.3f}", f"{(sc['median'] - sa['median']) * ms:.2f}", str(sc["n"])])
        print(rows[-1], flush=True)
    text = "\n".join([
        "# GradientClipping(groups=...) cost per optimizer step",
        "",
        f"Command: `{command_line('group_overhead', argv)}`",
        f"Machine: {machine()}. {args.tensors} fp32 gradient tensors x {numel:,} entries; PercentileThreshold in "
        f"every group; {reps} measured steps after {warmup}; log_every_n_steps={LOG_EVERY}.",
        "",
        md_table(["GradientClipping", "median ms", "mean ms", "torch clip median ms (same steps)",
                "ratio to torch (median)", "median - torch ms", "reps"], rows, pad=True),
        "",
    ])
    print(text)
    write_results(os.path.join(out, "group_overhead.txt"), text)
    return text


if __name__ == "__main__":
    main()
