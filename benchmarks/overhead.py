"""Per-step cost of lightning_clip's clipping stack against torch's and Lightning's own clipping.

What is measured (CPU, fp32; default: 160 gradient tensors of 1.25M entries = 200M parameters):

(a) ``torch.nn.utils.get_total_norm`` + ``torch.nn.utils.clip_grads_with_norm_`` on the gradients.
(b) Lightning's ``Trainer(gradient_clip_val=...)`` path: the precision plugin's ``_clip_gradients`` (which calls
    ``configure_gradient_clipping`` -> ``LightningModule.clip_gradients`` -> ``Precision.clip_gradients`` ->
    ``torch.nn.utils.clip_grad_norm_``), exactly what the fit loop runs after ``on_before_optimizer_step``.
(c) the full stack ``GradientNormMonitor(per_parameter=True)`` + ``GradientClipping(PercentileThreshold(...))`` +
    ``NonFiniteGradientGuard("skip")``, run by a real ``Trainer`` (``log_every_n_steps=50``, a no-op logger so that
    logging steps really log 160+ values through ``LightningModule.log_dict``). A timing callback placed first and one
    placed last in ``callbacks`` bracket the three callbacks' ``on_before_optimizer_step``: the measured window is
    exactly the real callback code (shared ``step_state`` cache, policy, clip, counters, guard, logging on logging
    steps) plus Lightning's hook dispatch between them.

Soundness: the LightningModule's ``training_step`` returns a loss on a scalar dummy parameter (cheap backward) and
``on_after_backward`` assigns pre-allocated random gradients to the 160 parameters; the optimizer's ``step`` only
runs the closure, so a training step costs little beyond what is measured. Within every training step the three
variants run back to back on the same gradients -- (c) inside the hook, then (a) and (b) from the last timing
callback in alternating order -- so machine noise hits them alike (the brief's A B C A B C ... rounds). Clipping an
already clipped set still performs the full norm pass and the full multiply (torch's and ours clamp the
coefficient instead of branching), so the cost per step does not depend on whether clipping changes anything.
Medians are reported (robust to the noisy, shared 2-core machine) together with means: 2 of every 100 steps are
logging steps, and only the mean shows their amortised cost; the logging steps are also listed separately.

(d) ``PercentileThreshold.__call__`` with ~10 norms of history versus 100 000 (host backend: exact chunked sorted
history on the host; device backend run on CPU for information: its per-step work is O(capacity) parallel work that
is meant for accelerators). The policies with long history are filled through ``load_state_dict`` (host) or by
writing the sorted device buffer directly (device; checked against the host percentile); the short ones are
re-created every round so that they stay near step 10 (steps 10-60 for the host, 10-15 for the device batches).
Calls are timed in batches and interleaved the same way.

Finally a breakdown times the pieces of (c) outside Lightning (norm pass, policy, clip, counters, the host copy of
the logged values) on the same gradients, one call at a time right after the memory-bound passes (cold caches, as
in a real step), to show where any overhead comes from. The cost of ``LightningModule.log_dict`` itself shows up
as the difference between logging steps and ordinary steps of (c).

Run (from the repository root): ``python -m benchmarks.overhead`` (a few minutes) or
``python -m benchmarks.overhead --quick`` (< 20 s).
Prints the tables and writes them to ``overhead.txt`` in ``--out`` (default ``benchmarks/results``; with
``--quick`` a new temporary directory).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
import warnings
from collections import defaultdict

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn
from torch.nn.utils import clip_grads_with_norm_ as torch_clip_grads_with_norm_
from torch.nn.utils import get_total_norm
from torch.utils.data import DataLoader

from benchmarks.common import (
    StdoutRecord,
    add_output_arguments,
    clip_grads_with_norm_,
    gradient_stats,
    md_table,
    output_dir,
    summary_stats,
)
from lightning_clip import GradientClipping, GradientNormMonitor, NonFiniteGradientGuard, PercentileThreshold

CLIP_VAL = 1.0
LOG_EVERY = 50


# --------------------------------------------------------------------------------------------------
# helpers


class NullLogger(Logger):
    """A logger that accepts everything: logging steps do all the work up to the logger, nothing is written."""

    @property
    def name(self) -> str:
        return "null"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        return None

    def log_metrics(self, metrics, step=None) -> None:
        return None


class NoOpOptimizer(torch.optim.Optimizer):
    """Runs the closure (training_step, backward, hooks, clipping) and updates nothing."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None


class BenchModule(pl.LightningModule):
    def __init__(self, n_tensors: int, numel: int, seed: int = 0) -> None:
        super().__init__()
        rows = max(1, int(math.sqrt(numel)))
        shape = (rows, numel // rows)
        # parameter storage is never touched (torch.empty): only the gradients occupy memory
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(shape)) for _ in range(n_tensors)])
        self.dummy = nn.Parameter(torch.zeros(()))
        g = torch.Generator().manual_seed(seed)
        self.grad_buffers = [torch.randn(shape, generator=g) for _ in range(n_tensors)]

    def training_step(self, batch, batch_idx):
        return self.dummy * 0.0

    def on_after_backward(self) -> None:
        for p, g in zip(self.weights, self.grad_buffers):
            p.grad = g

    def configure_optimizers(self):
        return NoOpOptimizer(list(self.weights))


class Bench:
    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.t0 = 0.0
        self.times: dict[str, list[float]] = defaultdict(list)
        self.logging_step_times: list[float] = []
        self.step = 0


class StartTimer(Callback):
    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.bench.t0 = time.perf_counter()


class StopTimer(Callback):
    """Stops the clock of (c), then runs (a) and (b) on the same gradients, in alternating order."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        t1 = time.perf_counter()
        b = self.bench
        step = b.step
        b.step += 1
        measured = step >= b.warmup_steps
        logging_step = (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % LOG_EVERY == 0
        if measured:
            b.times["c"].append(t1 - b.t0)
            if logging_step:
                b.logging_step_times.append(t1 - b.t0)
        opt = getattr(optimizer, "_optimizer", optimizer)
        params = [p for group in opt.param_groups for p in group["params"]]

        def run_a() -> None:
            grads = [p.grad for p in params if p.grad is not None]
            total = get_total_norm(grads)
            torch_clip_grads_with_norm_(params, CLIP_VAL, total)

        def run_b() -> None:
            plugin = trainer.precision_plugin
            if hasattr(plugin, "_clip_gradients"):  # the exact gradient_clip_val path of the fit loop
                plugin._clip_gradients(pl_module, opt, CLIP_VAL, GradClipAlgorithmType.NORM)
            else:  # pragma: no cover - other Lightning versions
                plugin.clip_gradients(opt, CLIP_VAL, GradClipAlgorithmType.NORM)

        order = (("a", run_a), ("b", run_b)) if step % 2 == 0 else (("b", run_b), ("a", run_a))
        for name, fn in order:
            s = time.perf_counter()
            fn()
            e = time.perf_counter()
            if measured:
                b.times[name].append(e - s)


def bench_clipping(n_tensors: int, numel: int, warmup: int, reps: int) -> tuple[Bench, BenchModule]:
    model = BenchModule(n_tensors, numel)
    bench = Bench(warmup)
    policy = PercentileThreshold(percentile=90.0, warmup_steps=5, warmup_threshold=CLIP_VAL)
    monitor = GradientNormMonitor(per_parameter=True)
    clipping = GradientClipping(policy, summary=False)
    guard = NonFiniteGradientGuard("skip")
    stack = [monitor, clipping, guard]
    callbacks = [StartTimer(bench), *stack, StopTimer(bench)]
    steps = warmup + reps
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,
        logger=NullLogger(),
        log_every_n_steps=LOG_EVERY,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    order = [type(c) for c in trainer.callbacks]  # type: ignore[attr-defined]  # set at runtime, not declared on Trainer
    first, last = order.index(StartTimer), order.index(StopTimer)
    assert all(first < order.index(type(c)) < last for c in stack), f"callback order changed: {order}"
    gc.collect()
    # a list is a map-style dataset (__getitem__ + __len__); torch annotates the Dataset class
    trainer.fit(model, DataLoader(list(range(steps)), batch_size=1))  # type: ignore[arg-type]
    assert len(bench.times["c"]) == reps, f"expected {reps} measured steps, got {len(bench.times['c'])}"
    assert clipping.steps.get(0) == steps and guard.skipped_steps == 0
    return bench, model


# --------------------------------------------------------------------------------------------------
# (d) PercentileThreshold


def _percentile_policy(backend: str, history: np.ndarray) -> PercentileThreshold:
    p = PercentileThreshold(percentile=90.0, warmup_steps=0, backend=backend)
    # a loaded history is built in one pass (sorted once) on either backend, 100k values included
    p.load_state_dict({"steps": len(history), "history": torch.from_numpy(history)})
    p(torch.tensor(1.0))  # builds the history
    return p


def bench_percentile(big: int, rounds: int, calls: dict[str, int]) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    big_hist = rng.lognormal(0.0, 1.0, big).astype(np.float32)
    small_hist = big_hist[:9]
    norms = [torch.tensor(float(x)) for x in rng.lognormal(0.0, 1.0, 4096).astype(np.float32)]
    policies = {
        "host@big": _percentile_policy("host", big_hist),
        "device@big": _percentile_policy("device", big_hist),
    }
    times: dict[str, list[float]] = defaultdict(list)
    names = ["host@10", "host@big", "device@10", "device@big"]
    k = 0
    for r in range(rounds):
        policies["host@10"] = _percentile_policy("host", small_hist)
        policies["device@10"] = _percentile_policy("device", small_hist)
        rot = names[r % len(names):] + names[: r % len(names)]
        for name in rot:
            pol = policies[name]
            n = calls[name.split("@")[0]]
            batch = [norms[(k + i) % len(norms)] for i in range(n)]
            k += n
            s = time.perf_counter()
            for x in batch:
                pol(x)
            e = time.perf_counter()
            times[name].append((e - s) / n)
    return times


# --------------------------------------------------------------------------------------------------
# breakdown of (c) outside Lightning


def bench_breakdown(model: BenchModule, rounds: int) -> dict[str, list[float]]:
    params = list(model.weights)
    for p, g in zip(params, model.grad_buffers):
        p.grad = g
    grads = [p.grad for p in params]
    policy = PercentileThreshold(percentile=90.0, warmup_steps=0)
    stats = gradient_stats(grads)
    norm = stats.total_norm
    for _ in range(10):
        policy(norm)

    def counters(total: torch.Tensor, coef: torch.Tensor, acc: dict) -> None:
        # what GradientClipping does per step besides norm/policy/clip
        finite = torch.isfinite(total)
        was_clipped = finite & (coef < 1.0)
        acc["c"] = acc.get("c", torch.zeros((), dtype=torch.long)) + was_clipped.long()
        ft = torch.where(finite, total, torch.zeros_like(total))
        acc["s"] = acc.get("s", torch.zeros((), dtype=torch.float64)) + ft.double()
        acc["m"] = torch.maximum(acc.get("m", torch.zeros(())), ft)
        acc["n"] = acc.get("n", torch.zeros((), dtype=torch.long)) + (~finite).long()
        _ = total * coef

    # thresholds above the norm: the coefficient clamps to 1 and the full multiply still runs, while the
    # gradients keep their values (clipping by a stale norm again and again would drift into denormals)
    high = 2.0 * float(norm)
    high_t = torch.tensor(high)
    acc: dict = {}
    pieces = {
        "torch get_total_norm": lambda: get_total_norm(grads),
        "ours gradient_stats": lambda: gradient_stats(grads),
        "torch clip_grads_with_norm_": lambda: torch_clip_grads_with_norm_(params, high, norm),
        "ours clip_grads_with_norm_": lambda: clip_grads_with_norm_(grads, high_t, norm),
        "PercentileThreshold(host) call": lambda: policy(norm),
        "GradientClipping counters": lambda: counters(norm, torch.tensor(0.5), acc),
        "guard bool(finite)": lambda: bool(torch.isfinite(norm)),
        "stack 161 norms + .tolist() (log host copy)": lambda: torch.stack(
            [stats.total_norm, *stats.norms.unbind(0)]).tolist(),
    }
    times: dict[str, list[float]] = defaultdict(list)
    names = list(pieces)
    for r in range(rounds):
        rot = names[r % len(names):] + names[: r % len(names)]
        for name in rot:
            s = time.perf_counter()
            pieces[name]()
            times[name].append(time.perf_counter() - s)
    return times


# --------------------------------------------------------------------------------------------------


def _report_clipping(n_tensors: int, numel: int, warmup: int, reps: int, quick: bool) -> None:
    bench, model = bench_clipping(n_tensors, numel, warmup, reps)
    sa, sb, sc = summary_stats(bench.times["a"]), summary_stats(bench.times["b"]), summary_stats(bench.times["c"])
    ms = 1e3
    rows: list[tuple[str, dict[str, float]]] = [
        ("(a) torch get_total_norm + clip_grads_with_norm_", sa),
        ("(b) Lightning gradient_clip_val (precision plugin)", sb),
        ("(c) monitor(per_parameter) + clipping(percentile) + guard(skip)", sc),
    ]
    print(f"## Clipping cost per optimizer step ({reps} steps after {warmup} warm-up steps, interleaved; "
          f"log_every_n_steps={LOG_EVERY})\n")
    print(md_table(
        ["variant", "median ms", "mean ms", "p10 ms", "p90 ms", "reps"],
        [[name, f"{s['median'] * ms:.2f}", f"{s['mean'] * ms:.2f}", f"{s['p10'] * ms:.2f}", f"{s['p90'] * ms:.2f}",
          str(s["n"])] for name, s in rows], pad=True,
    ))
    if bench.logging_step_times:
        lt = ", ".join(f"{t * ms:.2f}" for t in bench.logging_step_times)
        extra = (statistics.fmean(bench.logging_step_times) - sc["median"]) * ms
        print(f"\n(c) on its {len(bench.logging_step_times)} logging step(s): {lt} ms, i.e. {extra:.1f} ms more than "
              f"a median step (it logs {n_tensors + 5} values; amortised over {LOG_EVERY} steps: "
              f"{extra / LOG_EVERY:.2f} ms/step)")
    r_med = sc["median"] / sa["median"]
    r_mean = sc["mean"] / sa["mean"]
    print(f"\nratio full stack / torch clip: median {r_med:.3f}, mean {r_mean:.3f}  (target <= 1.10: "
          f"{'met' if r_med <= 1.10 else 'MISSED'})")
    print(f"fixed cost of the stack on non-logging steps: median (c) - median (a) = "
          f"{(sc['median'] - sa['median']) * ms:.2f} ms")
    print(f"ratio Lightning gradient_clip_val / torch clip: median {sb['median'] / sa['median']:.3f}")
    print(f"ratio full stack / Lightning gradient_clip_val: median {sc['median'] / sb['median']:.3f}")

    breakdown = bench_breakdown(model, rounds=10 if quick else 20)
    print("\n## Breakdown of (c), pieces timed outside Lightning on the same gradients (interleaved)\n")
    print(md_table(
        ["piece", "median ms", "reps"],
        [[name, f"{statistics.median(v) * ms:.4f}", str(len(v))] for name, v in breakdown.items()], pad=True,
    ))
    del model
    gc.collect()


def _report_percentile(big: int, pct_rounds: int, calls: dict[str, int]) -> None:
    pt = bench_percentile(big, pct_rounds, calls)
    us = 1e6
    label = f"{big // 1000}k"
    print(f"\n## PercentileThreshold.__call__ (percentile=90, all history; {pct_rounds} interleaved rounds; "
          f"batches of {calls['host']} (host) / {calls['device']} (device) calls)\n")
    prow = []
    for name in ["host@10", "host@big", "device@10", "device@big"]:
        s = summary_stats(pt[name])
        prow.append([name.replace("big", label), f"{s['median'] * us:.1f}", f"{s['mean'] * us:.1f}",
                     f"{s['p90'] * us:.1f}", str(s["n"])])
    print(md_table(["backend@history", "median us/call", "mean us/call", "p90 us/call", "batches"], prow, pad=True))
    hr = statistics.median(pt["host@big"]) / statistics.median(pt["host@10"])
    dr = statistics.median(pt["device@big"]) / statistics.median(pt["device@10"])
    print(f"\nratio host percentile@{label} / @10: {hr:.3f}  (target <= 1.05: {'met' if hr <= 1.05 else 'MISSED'})")
    print(f"ratio device-backend-on-CPU percentile@{label} / @10: {dr:.3f}  (information only: O(capacity) "
          f"parallel work per step, meant for accelerators)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_arguments(parser, "small sizes, runs in < 20 s")
    parser.add_argument("--tensors", type=int, default=160)
    parser.add_argument("--numel", type=int, default=None, help="entries per gradient tensor (default 1.25M)")
    parser.add_argument("--reps", type=int, default=None, help="measured training steps (default 100)")
    parser.add_argument("--sections", default="clip,percentile",
                        help="comma-separated subset of: clip (a, b, c and the breakdown), percentile (d)")
    args = parser.parse_args(argv)
    sections = {x.strip() for x in args.sections.split(",")}
    record = StdoutRecord(output_dir(args.out, args.quick, "overhead"), "overhead.txt").start()

    warnings.filterwarnings("ignore")
    numel = args.numel or (10_000 if args.quick else 1_250_000)
    reps = args.reps or (50 if args.quick else 100)
    warmup = 5 if args.quick else 10
    big = 10_000 if args.quick else 100_000
    pct_rounds = 60 if args.quick else 200
    calls = {"host": 50, "device": 5}

    torch.manual_seed(0)
    n_params = args.tensors * numel
    print(f"# lightning_clip overhead benchmark ({'quick' if args.quick else 'full'})")
    print(f"torch {torch.__version__}, lightning {pl.__version__}, CPU threads {torch.get_num_threads()}, "
          f"{args.tensors} fp32 gradient tensors x {numel:,} = {n_params / 1e6:.1f}M parameters "
          f"({n_params * 4 / 2**30:.2f} GiB of gradients)\n")

    t_start = time.perf_counter()
    if "clip" in sections:
        _report_clipping(args.tensors, numel, warmup, reps, args.quick)
    if "percentile" in sections:
        _report_percentile(big, pct_rounds, calls)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s")
    record.close()


if __name__ == "__main__":
    main()
