"""Does clipping help? The adding problem with a vanilla tanh RNN, trained by a real Lightning Trainer.

Every method trains the library's demo :class:`~lightning_clip.tools.demo.AddingRNN` on
:class:`~lightning_clip.tools.demo.AddingProblemDataModule` with ``lightning.pytorch.Trainer`` on CPU, for
several seeds. Methods (rows of the table):

- ``none``: no clipping.
- ``lightning clip_val=v``: Lightning's own ``Trainer(gradient_clip_val=v)`` (norm), a 3-value sweep;
  the value with the lowest mean final validation loss is the "tuned fixed threshold".
- ``GradientClipping(fixed=v*)``: our callback with the tuned value (must match Lightning's row).
- ``PercentileThreshold`` (AutoClip) with all history and no warmup (pure AutoClip, p90), the library
  default (p90, 100 warmup steps at 1.0), a sliding ``window``, and the AutoClip paper's p10.
- ``WarmupThreshold``: 100 steps at 1.0, then a windowed p90 percentile.
- ``ZScoreThreshold`` (ZClip) with the library defaults (capped at ``max_norm=1.0``) and uncapped.
- ``zclip.ZClipLightningCallback`` (PyPI package ``zclip``, defaults), if it is installed.

Reported per method: diverged runs (a training loss that is NaN/Inf or above ``--diverge-bound``)
out of seeds, final validation MSE (mean over non-diverged seeds), steps until the validation MSE
first drops below ``--target`` (the trivial predictor, always 1, has MSE 1/6), clip rate, the
median threshold in force over the second half of training, and wall time.

Usage::

    python benchmarks/exploding.py                  # full setting (~15 min on 2 cores)
    python benchmarks/exploding.py --quick          # tiny smoke setting (< 40 s), into a temporary directory

Writes ``exploding.md`` (table + command + machine) and ``exploding.png`` (median training loss
curves, log scale) into ``--out``; by default ``benchmarks/results`` for a full run and a new
temporary directory with ``--quick``. Hand-written notes after the marker line of an existing
``exploding.md`` are kept.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine  # noqa: E402
from _results import add_output_arguments, output_dir, write_results  # noqa: E402

TRIVIAL_MSE = 1.0 / 6.0


# --------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One row of the table: how to clip (built inside the worker process)."""

    name: str
    kind: str  # "none" | "lightning" | "ours" | "zclip"
    spec: tuple = ()  # ("fixed", v) | ("percentile", kwargs) | ("warmup", kwargs, inner) | ("zscore", kwargs)
    clip_val: float | None = None
    note: str = ""


def _policy(spec: tuple) -> Any:
    from lightning_clip import FixedThreshold, PercentileThreshold, WarmupThreshold, ZScoreThreshold

    kind = spec[0]
    if kind == "fixed":
        return FixedThreshold(spec[1])
    if kind == "percentile":
        return PercentileThreshold(**dict(spec[1]))
    if kind == "zscore":
        return ZScoreThreshold(**dict(spec[1]))
    if kind == "warmup":
        return WarmupThreshold(**dict(spec[1]), then=_policy(spec[2]))
    raise ValueError(f"unknown policy spec {spec!r}")


def zclip_available() -> bool:
    try:
        from zclip import ZClipLightningCallback  # noqa: F401
    except Exception:  # ImportError, or anything the package raises at import
        return False
    return True


def sweep_methods(sweep: list[float]) -> list[Method]:
    rows = [Method("none", "none", note="no clipping")]
    for v in sweep:
        rows.append(Method(f"lightning clip_val={v:g}", "lightning", clip_val=v,
                           note="Trainer(gradient_clip_val=v), norm"))
    return rows


def adaptive_methods(tuned: float, window: int, with_zclip: bool) -> list[Method]:
    kv = lambda **kw: tuple(sorted(kw.items()))  # noqa: E731 - hashable kwargs
    rows = [
        Method(f"GradientClipping(fixed={tuned:g})", "ours", ("fixed", tuned), note="tuned value from the sweep"),
        Method("Percentile p90, all history, no warmup", "ours",
               ("percentile", kv(percentile=90.0, warmup_steps=0)), note="pure AutoClip"),
        Method("Percentile() defaults", "ours", ("percentile", kv()),
               note="p90, all history, 100 warmup steps at 1.0"),
        Method(f"Percentile p90, window={window}", "ours",
               ("percentile", kv(percentile=90.0, warmup_steps=0, window=window)), note="no warmup"),
        Method("Percentile p10, all history", "ours", ("percentile", kv(percentile=10.0, warmup_steps=0)),
               note="AutoClip paper's setting"),
        Method(f"Warmup(100 @ 1.0) -> p90 window={window}", "ours",
               ("warmup", kv(warmup_steps=100, warmup_threshold=1.0),
                ("percentile", kv(percentile=90.0, warmup_steps=0, window=window))), note="warmup + window"),
        Method(f"Percentile() p90, warmup 100 @ {tuned:g}", "ours",
               ("percentile", kv(warmup_steps=100, warmup_threshold=tuned)),
               note="defaults but warm up at the tuned value"),
        Method("ZScore() defaults", "ours", ("zscore", kv()), note="ZClip, alpha .97, z 2.5, max_norm=1.0 cap"),
        Method("ZScore(max_norm=None)", "ours", ("zscore", kv(max_norm=None)), note="uncapped: no clip in warmup"),
    ]
    if with_zclip:
        rows.append(Method("zclip.ZClipLightningCallback()", "zclip", note="PyPI zclip 1.x, defaults"))
    return rows


# ------------------------------------------------------------------------------------------ one run


@dataclass
class RunResult:
    method: str
    seed: int
    diverged: bool = False
    diverged_at: int | None = None
    steps: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    final_val: float = float("nan")
    steps_to_target: int | None = None
    clip_rate: float = 0.0
    threshold_median: float | None = None  # median threshold in force over the second half
    threshold_last: float | None = None  # diverged runs: the last clipped-to norm before divergence
    wall_s: float = 0.0


def _run(args: tuple[Method, int, dict[str, Any]]) -> RunResult:
    method, seed, cfg = args
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from lightning_clip import GradientClipping
    from lightning_clip.tools.demo import AddingProblemDataModule, AddingRNN

    torch.set_num_threads(cfg["threads"])
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    class MemoryLogger(pl.loggers.Logger):
        def __init__(self) -> None:
            super().__init__()
            self.metrics: dict[str, list[tuple[int, float]]] = {}

        name = "memory"  # type: ignore[assignment]
        version = 0  # type: ignore[assignment]

        def log_hyperparams(self, params: Any, *a: Any, **k: Any) -> None:
            return None

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            for k, v in metrics.items():
                self.metrics.setdefault(k, []).append((int(step or 0), float(v)))

    res = RunResult(method=method.name, seed=seed)
    bound = cfg["diverge_bound"]

    class PreNorm(pl.Callback):
        """First in the list: sees the gradient norm before any callback clips."""

        def __init__(self) -> None:
            self.pre: list[float] = []

        @torch.no_grad()
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.pre.append(float(torch.nn.utils.get_total_norm(grads)))

    class PostNorm(pl.Callback):
        """Last in the list: sees the norm after callback-based clipping (zclip's clip rate)."""

        def __init__(self) -> None:
            self.post: list[float] = []

        @torch.no_grad()
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.post.append(float(torch.nn.utils.get_total_norm(grads)))

    class Recorder(pl.Callback):
        """Training loss per step, validation MSE every ``val_every`` steps, divergence stop."""

        def __init__(self, dm: AddingProblemDataModule) -> None:
            self.dm = dm

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            res.train_loss.append(loss)
            step = trainer.global_step
            if not math.isfinite(loss) or loss > bound:
                res.diverged, res.diverged_at = True, step
                trainer.should_stop = True
                return
            if step % cfg["val_every"] == 0 or step >= cfg["steps"]:
                x, y = self.dm.val_set.tensors
                with torch.no_grad():
                    v = float(nn.functional.mse_loss(pl_module(x), y))
                res.val_steps.append(step)
                res.val_loss.append(v)
                if not math.isfinite(v) or v > bound:
                    res.diverged, res.diverged_at = True, step
                    trainer.should_stop = True
                elif v < cfg["target"] and res.steps_to_target is None:
                    res.steps_to_target = step

    pl.seed_everything(seed, verbose=False)
    dm = AddingProblemDataModule(seq_len=cfg["seq_len"], num_train=cfg["num_train"], num_val=cfg["num_val"],
                                 batch_size=cfg["batch_size"], seed=seed)
    model = AddingRNN(hidden_size=cfg["hidden"], cell=cfg["cell"], lr=cfg["lr"], momentum=cfg["momentum"],
                      init_scale=cfg["init_scale"])
    pre, post = PreNorm(), PostNorm()
    callbacks: list[Any] = [pre]
    clipper: Any = None
    if method.kind == "ours":
        clipper = GradientClipping(_policy(method.spec), summary=False, log_every_n_steps=cfg["log_every"])
        callbacks.append(clipper)
    elif method.kind == "zclip":
        from zclip import ZClipLightningCallback

        clipper = ZClipLightningCallback()
        callbacks.append(clipper)
    callbacks += [post, Recorder(dm)]
    logger = MemoryLogger()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=cfg["steps"], limit_val_batches=0, num_sanity_val_steps=0,
            logger=logger, log_every_n_steps=cfg["log_every"], enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
            gradient_clip_val=method.clip_val, gradient_clip_algorithm="norm" if method.clip_val else None,
            callbacks=callbacks,
        )
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        res.wall_s = time.perf_counter() - t0
    res.steps = len(res.train_loss)
    if not res.diverged and res.val_loss:
        res.final_val = res.val_loss[-1]

    # clip rate and the threshold in force
    pre_n = np.asarray(pre.pre, dtype=float)
    post_n = np.asarray(post.post, dtype=float)
    half = len(pre_n) // 2
    if method.kind == "ours":
        res.clip_rate = clipper.clip_rate()
        thr = [v for s, v in logger.metrics.get("grad_clip/threshold", []) if s >= half]
        res.threshold_median = float(np.median(thr)) if thr else None
    elif method.kind == "lightning":
        fin = np.isfinite(pre_n)
        res.clip_rate = float(np.mean(fin & (pre_n > method.clip_val))) if len(pre_n) else 0.0
        res.threshold_median = float(method.clip_val)
    elif method.kind == "zclip":
        fin = np.isfinite(pre_n) & np.isfinite(post_n)
        clipped = fin & (post_n < pre_n * (1 - 1e-4))
        res.clip_rate = float(np.mean(clipped)) if len(pre_n) else 0.0
        # the threshold in force is only observable on clipped steps: the post-clip norm
        late = clipped[half:]
        res.threshold_median = float(np.median(post_n[half:][late])) if late.any() else None
    if res.diverged:
        res.threshold_median = None
        if method.kind == "lightning":
            res.threshold_last = float(method.clip_val)
        elif method.kind in ("ours", "zclip"):
            n = min(len(pre_n), len(post_n))
            ok = np.isfinite(pre_n[:n]) & np.isfinite(post_n[:n]) & (post_n[:n] < pre_n[:n] * (1 - 1e-4))
            res.threshold_last = float(post_n[:n][ok][-1]) if ok.any() else None
    return res


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_all(methods: list[Method], seeds: list[int], cfg: dict[str, Any], workers: int) -> list[RunResult]:
    jobs = [(m, s, cfg) for m in methods for s in seeds]
    if workers <= 1:
        return [_run(j) for j in jobs]
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(cfg["threads"],)) as ex:
        return list(ex.map(_run, jobs))


# ------------------------------------------------------------------------------------------ report


@dataclass
class Row:
    method: Method
    runs: list[RunResult]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def diverged(self) -> int:
        return sum(r.diverged for r in self.runs)

    @property
    def final_vals(self) -> list[float]:
        return [r.final_val for r in self.runs if not r.diverged and math.isfinite(r.final_val)]

    @property
    def mean_final(self) -> float:
        v = self.final_vals
        return float(np.mean(v)) if v else float("nan")

    @property
    def score(self) -> float:
        """Lower is better; diverged seeds count as +inf (for picking the tuned fixed value)."""
        vals = [r.final_val if not r.diverged and math.isfinite(r.final_val) else math.inf for r in self.runs]
        return float(np.mean(vals))


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def table(rows: list[Row], cfg: dict[str, Any]) -> str:
    head = ("| method | diverged / seeds | diverged at step (median) | final val MSE (mean ± sd, non-diverged) "
            "| best / worst seed "
            f"| steps to val MSE < {cfg['target']:g} (median, reached) | clip rate (mean) "
            "| threshold in force: median 2nd half; last before divergence | wall s / run | ms / step | notes |")
    lines = [head, "|" + "---|" * 11]
    for row in rows:
        vals = row.final_vals
        if vals:
            final = f"{np.mean(vals):.4f} ± {np.std(vals):.4f}"
            spread = f"{min(vals):.4f} / {max(vals):.4f}"
        else:
            final, spread = "diverged", "—"
        hits = [r.steps_to_target for r in row.runs if r.steps_to_target is not None and not r.diverged]
        steps = f"{int(np.median(hits))} ({len(hits)}/{row.n})" if hits else f"— (0/{row.n})"
        rates = [r.clip_rate for r in row.runs]
        thr = [r.threshold_median for r in row.runs if r.threshold_median is not None and not r.diverged]
        last = [r.threshold_last for r in row.runs if r.threshold_last is not None and r.diverged]
        if row.method.kind == "none":
            thr_s = "∞"
        else:
            parts = [_fmt(float(np.median(thr)))] if thr else []
            if last:
                parts.append(f"last: {_fmt(float(np.median(last)))}")
            thr_s = "; ".join(parts) if parts else "—"
        div_at = [r.diverged_at for r in row.runs if r.diverged and r.diverged_at is not None]
        div_s = str(int(np.median(div_at))) if div_at else "—"
        wall = float(np.mean([r.wall_s for r in row.runs]))
        ms = float(np.mean([1000 * r.wall_s / max(r.steps, 1) for r in row.runs]))
        lines.append(
            f"| {row.method.name} | {row.diverged}/{row.n} | {div_s} | {final} | {spread} | {steps} | "
            f"{np.mean(rates):.3f} | {thr_s} | {wall:.1f} | {ms:.1f} | {row.method.note} |"
        )
    return "\n".join(lines)


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(x) < k:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    out[k - 1:] = (c[k:] - c[:-k]) / k
    out[: k - 1] = c[1:k] / np.arange(1, k)
    return out


def median_curve(runs: list[RunResult], steps: int, smooth: int) -> np.ndarray:
    """Median over seeds of the smoothed training loss; a diverged seed counts as +inf from then on."""
    mat = np.full((len(runs), steps), np.inf)
    for i, r in enumerate(runs):
        x = np.asarray(r.train_loss, dtype=float)
        if r.diverged:
            x = x[: max(len(x) - 1, 0)]  # the last recorded loss is the diverged one
        x = np.where(np.isfinite(x), x, np.inf)
        if len(x):
            mat[i, : len(x)] = _smooth(x, smooth)[:steps]
    return np.median(mat, axis=0)


def plot(rows: list[Row], cfg: dict[str, Any], path: str, tuned_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = cfg["steps"]
    smooth = max(1, min(25, steps // 20))
    fig, axes = plt.subplots(1, 2, figsize=(15, 7), sharey=True)
    groups = [
        ("no clipping and fixed thresholds", [r for r in rows if r.method.kind in ("none", "lightning")
                                               or r.method.name == tuned_name]),
        ("adaptive thresholds (tuned fixed for reference)", [r for r in rows if r.method.kind in ("ours", "zclip")]),
    ]
    cmap = plt.get_cmap("tab10")
    xs = np.arange(1, steps + 1)
    for ax, (title, group) in zip(axes, groups):
        for i, row in enumerate(group):
            y = median_curve(row.runs, steps, smooth)
            label = f"{row.method.name} ({row.diverged}/{row.n} diverged)"
            tuned = row.method.name == tuned_name
            ax.plot(xs, np.where(np.isfinite(y), y, np.nan), "--" if tuned else "-",
                    color="black" if tuned else cmap(i % 10), lw=1.6 if tuned else 1.2, label=label)
        ax.axhline(TRIVIAL_MSE, color="grey", lw=0.8, ls=":", label="trivial predictor (1/6)")
        ax.axhline(cfg["target"], color="black", lw=0.8, ls="-.", label=f"target {cfg['target']:g}")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"training MSE (moving avg {smooth}, median over seeds)")
    fig.suptitle(
        f"Adding problem, vanilla {cfg['cell'].upper()}: seq_len={cfg['seq_len']}, hidden={cfg['hidden']}, "
        f"SGD lr={cfg['lr']:g} momentum={cfg['momentum']:g}, init_scale={cfg['init_scale']:g}, "
        f"{len(rows[0].runs)} seeds (curve ends where most seeds diverged)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_output_arguments(p, "tiny smoke setting (< 40 s)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 2000; quick: 30)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default 30; quick: 10)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--cell", choices=("rnn", "lstm"), default="rnn")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--init-scale", type=float, default=1.2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sweep", default="0.1,0.3,1.0", help="fixed thresholds tried with Lightning's gradient_clip_val")
    p.add_argument("--window", type=int, default=100, help="window of the windowed percentile policies")
    p.add_argument("--target", type=float, default=0.1, help="validation MSE target (trivial predictor: 1/6)")
    p.add_argument("--diverge-bound", type=float, default=1e3, help="a training loss above this counts as diverged")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default 50; quick: 10)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default 2; quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no-zclip", action="store_true", help="leave out the zclip comparison")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    q = args.quick
    cfg: dict[str, Any] = {
        "seq_len": args.seq_len or (10 if q else 30),
        "steps": args.steps or (30 if q else 2000),
        "hidden": args.hidden if not q else min(args.hidden, 16),
        "cell": args.cell,
        "lr": args.lr,
        "momentum": args.momentum,
        "init_scale": args.init_scale,
        "batch_size": args.batch_size,
        "num_train": 512 if q else 4096,
        "num_val": 128 if q else 512,
        "target": args.target,
        "diverge_bound": args.diverge_bound,
        "val_every": args.val_every or (10 if q else 50),
        "log_every": 1 if q else 10,
        "threads": args.threads,
    }
    n_seeds = args.seeds or (1 if q else 5)
    workers = args.workers if args.workers is not None else (1 if q else 2)
    seeds = list(range(n_seeds))
    sweep = [float(v) for v in args.sweep.split(",") if v.strip()]
    has_zclip = not args.no_zclip and zclip_available()
    args.out = output_dir(args.out, q, "exploding")
    print(f"machine: {machine()}", flush=True)
    print(f"setting: {cfg}, seeds={seeds}, workers={workers}", flush=True)

    t0 = time.perf_counter()
    phase1 = sweep_methods(sweep)
    results = run_all(phase1, seeds, cfg, workers)
    rows = [Row(m, [r for r in results if r.method == m.name]) for m in phase1]
    fixed_rows = [r for r in rows if r.method.kind == "lightning"]
    best = min(fixed_rows, key=lambda r: (r.score, r.mean_final)) if fixed_rows else None
    tuned = best.method.clip_val if best is not None else 1.0
    print(f"tuned fixed threshold: {tuned:g} (lowest mean final val MSE, diverged seeds = inf)", flush=True)
    phase2 = adaptive_methods(tuned, args.window, has_zclip)
    results = run_all(phase2, seeds, cfg, workers)
    rows += [Row(m, [r for r in results if r.method == m.name]) for m in phase2]
    total = time.perf_counter() - t0

    tab = table(rows, cfg)
    tuned_name = phase2[0].name
    png = os.path.join(args.out, "exploding.png")
    plot(rows, cfg, png, tuned_name)
    command = " ".join(["python benchmarks/exploding.py"] + [shlex.quote(a) for a in
                                                             (sys.argv[1:] if argv is None else argv)])
    zclip_line = ("`zclip` (PyPI) is installed: its `ZClipLightningCallback()` is the last row."
                  if has_zclip else
                  "`zclip` (PyPI) is not installed (or `--no-zclip`): no zclip row. `pip install zclip` adds it.")
    md = "\n".join([
        "# Does clipping help? Adding problem, vanilla RNN, real Lightning Trainer",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}.",
        f"Total wall time: {total:.0f} s ({workers} worker process(es), {cfg['threads']} torch thread(s) each). "
        "Wall times are noisy: other jobs shared the machine; a diverged run stops early (compare ms/step).",
        "",
        f"Setting: `AddingRNN(hidden_size={cfg['hidden']}, cell={cfg['cell']!r}, lr={cfg['lr']:g}, "
        f"momentum={cfg['momentum']:g}, init_scale={cfg['init_scale']:g})`, "
        f"`AddingProblemDataModule(seq_len={cfg['seq_len']}, num_train={cfg['num_train']}, "
        f"num_val={cfg['num_val']}, batch_size={cfg['batch_size']}, seed=seed)`, `max_steps={cfg['steps']}`, "
        f"seeds {seeds}. Validation MSE on the {cfg['num_val']} held-out samples every {cfg['val_every']} steps; "
        f"the trivial predictor has MSE 1/6 ≈ 0.167. Diverged = training loss NaN/Inf or > "
        f"{cfg['diverge_bound']:g} (the run is stopped there). Tuned fixed threshold: the sweep value "
        f"{{{', '.join(f'{v:g}' for v in sweep)}}} with the lowest mean final val MSE (diverged = inf) "
        f"on these seeds → **{tuned:g}**. Clip rate: `GradientClipping.clip_rate()` for our callback; "
        "pre-clip norm > clip_val for Lightning's; post-clip norm < pre-clip norm for zclip. "
        "Threshold in force: for runs that did not diverge, `grad_clip/threshold` (logged every "
        f"{cfg['log_every']} steps) over the second half of the run, median over seeds (zclip: the post-clip "
        "norm of its clipped steps); for diverged runs (`last:`), the norm the last clipped step before the "
        "divergence was clipped to, median over the diverged seeds.",
        "",
        zclip_line,
        "",
        tab,
        "",
        "![training loss](exploding.png)",
        "",
    ])
    md_path = os.path.join(args.out, "exploding.md")
    write_results(md_path, md)
    print()
    print(tab)
    print(f"\ntotal wall time: {total:.1f} s; wrote {os.path.join(args.out, 'exploding.md')} and {png}")
    return rows


if __name__ == "__main__":
    main()
