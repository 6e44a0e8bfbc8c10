"""Does clipping help, and does an adaptive policy need tuning? Two tasks, every policy, a real Lightning Trainer.

Two tasks whose best fixed thresholds differ by more than 10x, so that no single constant wins both:

- ``adding``: the adding problem (Pascanu et al. 2013) with the library's demo vanilla tanh RNN
  (``AddingRNN`` on ``AddingProblemDataModule``), SGD with momentum at a learning rate where an unclipped run
  explodes. Metric: validation MSE.
- ``digits``: an MLP (64-h-h-10, ReLU) on scikit-learn's bundled 8x8 digits with the cross-entropy
  *summed* over the batch (as token-summed language-model losses are), so gradient norms are ~batch
  size times a mean loss's; SGD with momentum at a high learning rate. Metric: validation cross-entropy
  (mean per sample).

Methods (rows, per task):

- ``none``: no clipping.
- ``lightning clip_val=v``: Lightning's own ``Trainer(gradient_clip_val=v)`` (norm), a per-task sweep;
  the value with the lowest mean final validation metric is the task's "tuned fixed threshold".
- ``GradientClipping(fixed=v*)``: our callback with the tuned value (must match Lightning's row).
- ``PercentileThreshold`` (AutoClip) at the library defaults and pure (p90, no warmup), each with the raw
  and the clipped history (``history="clipped"`` records ``min(norm, threshold)``).
- ``ZScoreThreshold`` (ZClip) at the defaults (capped at ``max_norm=1.0``) and uncapped, each with the
  ZClip and the clipped history.
- ``QuantileThreshold`` (the geometric quantile tracker) at its defaults and at the 0.9 quantile.
- ``AdaptiveGradientClipping`` (NFNets unit-wise clipping) at its defaults.
- ``zclip.ZClipLightningCallback`` (PyPI package ``zclip``, defaults), if it is installed.

Reported per method: diverged runs (a training loss that is NaN/Inf or above the task's divergence bound)
out of seeds, the final validation metric (mean over non-diverged seeds), steps until it first drops
below the task's target, clip rate, the median threshold in force over the second half of training, and
wall time; then one table over both tasks: each method's final metric relative to the tuned fixed
threshold, and whether it meets the target (0 divergences on both tasks and within 1.5x of the tuned
fixed threshold on each).

Usage (from the repository root)::

    python -m benchmarks.exploding                  # full setting (~35 min on 2 shared cores)
    python -m benchmarks.exploding --quick          # tiny smoke setting, into a temporary directory
    python -m benchmarks.exploding --tasks digits   # one task only
    python -m benchmarks.exploding --core --seeds 2 # defaults and history variants only (a busy machine)

Writes ``exploding.md`` (tables + command + machine) and ``exploding.png`` (median training loss
curves, log scale, one row per task) into ``--out``; by default ``benchmarks/results`` for a full run
and a new temporary directory with ``--quick``. Hand-written notes after the marker line of an existing
``exploding.md`` are kept.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.common import (
    add_output_arguments,
    adding_task,
    command_line,
    load_digits_tensors,
    machine,
    output_dir,
    process_map,
    write_results,
)

TARGET_RATIO = 1.5  # an adaptive policy meets the target within this factor of the tuned fixed threshold's metric


@dataclass(frozen=True)
class Task:
    """One task of the study: what trains, what is measured, which fixed thresholds are swept."""

    key: str
    title: str
    metric: str  # the column name of the final validation metric
    sweep: tuple[float, ...]
    quick_sweep: tuple[float, ...]
    target: float  # "steps to <metric> < target"
    trivial: float  # the metric of a trivial predictor
    trivial_name: str
    diverge_bound: float  # a training loss above this counts as diverged


TASKS: dict[str, Task] = {
    "adding": Task("adding", "adding problem, vanilla RNN", "val MSE", (0.1, 0.3, 1.0), (0.1, 0.3, 1.0), 0.1,
                   1.0 / 6.0, "the trivial predictor (always 1)", 1e3),
    "digits": Task("digits", "digits MLP, summed cross-entropy", "val CE", (3.0, 10.0, 30.0, 100.0, 300.0),
                   (3.0, 30.0), 0.3, math.log(10.0), "chance (uniform over 10 classes)", 1e4),
}


# --------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One row of the table: how to clip (built inside the worker process)."""

    name: str
    kind: str  # "none" | "lightning" | "ours" | "agc" | "adagc" | "zclip"
    # ours: ("fixed", v) | ("percentile", kw) | ("warmup", kw, inner) | ("zscore", kw) | ("quantile", kw);
    # adagc: the keyword arguments of AdaGCClipping as sorted (name, value) pairs
    spec: tuple = ()
    clip_val: float | None = None
    note: str = ""


def _policy(spec: tuple) -> Any:
    from lightning_clip import FixedThreshold, PercentileThreshold, QuantileThreshold, WarmupThreshold, ZScoreThreshold

    kind = spec[0]
    if kind == "fixed":
        return FixedThreshold(spec[1])
    if kind == "percentile":
        return PercentileThreshold(**dict(spec[1]))
    if kind == "zscore":
        return ZScoreThreshold(**dict(spec[1]))
    if kind == "quantile":
        return QuantileThreshold(**dict(spec[1]))
    if kind == "warmup":
        return WarmupThreshold(**dict(spec[1]), then=_policy(spec[2]))
    raise ValueError(f"unknown policy spec {spec!r}")


def zclip_available() -> bool:
    try:
        from zclip import ZClipLightningCallback  # noqa: F401
    except Exception:  # ImportError, or anything the package raises at import
        return False
    return True


def sweep_methods(sweep: tuple[float, ...] | list[float]) -> list[Method]:
    rows = [Method("none", "none", note="no clipping")]
    for v in sweep:
        rows.append(Method(f"lightning clip_val={v:g}", "lightning", clip_val=v,
                           note="Trainer(gradient_clip_val=v), norm"))
    return rows


TUNED_PREFIX = "GradientClipping(fixed="


def adaptive_methods(tuned: float, with_zclip: bool) -> list[Method]:
    kv = lambda **kw: tuple(sorted(kw.items()))  # noqa: E731 - hashable kwargs
    rows = [
        Method(f"{TUNED_PREFIX}{tuned:g})", "ours", ("fixed", tuned), note="tuned value from the sweep"),
        Method("Percentile() defaults", "ours", ("percentile", kv()),
               note="p90, all history, 100 warmup steps at 1.0, raw history"),
        Method("Percentile(history='clipped')", "ours", ("percentile", kv(history="clipped")),
               note="defaults, history records min(norm, threshold)"),
        Method("Percentile p90, no warmup", "ours", ("percentile", kv(percentile=90.0, warmup_steps=0)),
               note="pure AutoClip, raw history"),
        Method("Percentile p90, no warmup, history='clipped'", "ours",
               ("percentile", kv(percentile=90.0, warmup_steps=0, history="clipped")), note="first step at 1.0"),
        Method("Percentile p10, no warmup", "ours", ("percentile", kv(percentile=10.0, warmup_steps=0)),
               note="all-history 10th percentile from the first step, raw history"),
        Method("ZScore() defaults", "ours", ("zscore", kv()), note="ZClip, alpha .97, z 2.5, max_norm=1.0 cap"),
        Method("ZScore(history='clipped')", "ours", ("zscore", kv(history="clipped")),
               note="defaults, buffer and EMA record min(norm, threshold)"),
        Method("ZScore(max_norm=None)", "ours", ("zscore", kv(max_norm=None)), note="uncapped: no clip in warmup"),
        Method("ZScore(max_norm=None, history='clipped')", "ours", ("zscore", kv(max_norm=None, history="clipped")),
               note="uncapped, clipped history"),
        Method("Quantile() defaults", "ours", ("quantile", kv()),
               note="geometric tracker: median, initial 1.0, learning_rate 0.2"),
        Method("Quantile(quantile=0.9)", "ours", ("quantile", kv(quantile=0.9)), note="tracks the 90th percentile"),
        Method("Quantile(quantile=0.1, learning_rate=0.05)", "ours", ("quantile", kv(quantile=0.1, learning_rate=0.05)),
               note="growth-bounded low tracker: rises <= 0.5%/step, falls <= 4.6%/step"),
        Method("AdaptiveGradientClipping() defaults", "agc", note="unit-wise, clip_factor 0.01, eps 1e-3"),
        Method("AdaGCClipping() defaults", "adagc", kv(),
               note="per tensor: 100 warmup steps at 1.0, then 1.05 x EMA(0.98) of own clipped norms"),
    ]
    if with_zclip:
        rows.append(Method("zclip.ZClipLightningCallback()", "zclip", note="PyPI zclip 1.x, defaults"))
    return rows


#: The rows of ``--core``.
CORE_ROWS = ("Percentile() defaults", "Percentile(history='clipped')", "ZScore() defaults", "ZScore(history='clipped')",
             "Quantile() defaults", "AdaptiveGradientClipping() defaults", "AdaGCClipping() defaults",
             "zclip.ZClipLightningCallback()", "Percentile p90, no warmup, history='clipped'",
             "Quantile(quantile=0.1, learning_rate=0.05)", "Percentile p10, no warmup")


# ------------------------------------------------------------------------------------------ the digits task


def digits_parts(cfg: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """The digits task: ``(datamodule, model)``; the datamodule's ``val_set`` holds the held-out tensors."""
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class DigitsData(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            x, y = load_digits_tensors()
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
            n_val = cfg["num_val"]
            self.val_set = TensorDataset(x[perm[:n_val]], y[perm[:n_val]])
            self.train_set = TensorDataset(x[perm[n_val:]], y[perm[n_val:]])

        def train_dataloader(self) -> Any:
            return DataLoader(self.train_set, batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(seed))

    class SummedDigitsMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            h = cfg["hidden"]
            self.net = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))

        def forward(self, x: Any) -> Any:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y, reduction="sum")

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])

    return DigitsData(), SummedDigitsMLP()


# ------------------------------------------------------------------------------------------ one run


@dataclass
class RunResult:
    method: str
    seed: int
    task: str = "adding"
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

    from lightning_clip import AdaGCClipping, AdaptiveGradientClipping, GradientClipping

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

    res = RunResult(method=method.name, seed=seed, task=cfg["task"])
    bound = cfg["diverge_bound"]

    class Norms(pl.Callback):
        """The gradient norm at every step, where the callback stands in the list: first, before any callback
        clips; last, after callback-based clipping (zclip's clip rate)."""

        def __init__(self) -> None:
            self.norms: list[float] = []

        @torch.no_grad()
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

    class Recorder(pl.Callback):
        """Training loss per step, validation MSE every ``val_every`` steps, divergence stop."""

        def __init__(self, dm: Any) -> None:
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
                    out = pl_module(x)
                    v = float(nn.functional.mse_loss(out, y) if cfg["task"] == "adding"
                              else nn.functional.cross_entropy(out, y))
                res.val_steps.append(step)
                res.val_loss.append(v)
                if not math.isfinite(v) or v > bound:
                    res.diverged, res.diverged_at = True, step
                    trainer.should_stop = True
                elif v < cfg["target"] and res.steps_to_target is None:
                    res.steps_to_target = step

    pl.seed_everything(seed, verbose=False)
    dm: Any
    model: Any
    if cfg["task"] == "adding":
        data_cls, rnn_cls = adding_task()
        dm = data_cls(seq_len=cfg["seq_len"], num_train=cfg["num_train"], num_val=cfg["num_val"],
                      batch_size=cfg["batch_size"], seed=seed)
        model = rnn_cls(hidden_size=cfg["hidden"], cell=cfg["cell"], lr=cfg["lr"], momentum=cfg["momentum"],
                        init_scale=cfg["init_scale"])
    else:
        dm, model = digits_parts(cfg, seed)
    pre, post = Norms(), Norms()
    callbacks: list[Any] = [pre]
    clipper: Any = None
    if method.kind == "ours":
        clipper = GradientClipping(_policy(method.spec), summary=False, log_every_n_steps=cfg["log_every"])
        callbacks.append(clipper)
    elif method.kind == "zclip":
        from zclip import ZClipLightningCallback

        clipper = ZClipLightningCallback()
        callbacks.append(clipper)
    elif method.kind == "agc":
        clipper = AdaptiveGradientClipping(log=False)
        callbacks.append(clipper)
    elif method.kind == "adagc":
        clipper = AdaGCClipping(**dict(method.spec), log=False)
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
    pre_n = np.asarray(pre.norms, dtype=float)
    post_n = np.asarray(post.norms, dtype=float)
    half = len(pre_n) // 2
    if method.kind == "ours":
        res.clip_rate = clipper.clip_rate()
        thr = [v for s, v in logger.metrics.get("grad_clip/threshold", []) if s >= half]
        res.threshold_median = float(np.median(thr)) if thr else None
    elif method.kind == "lightning":
        assert method.clip_val is not None  # sweep_methods gives every "lightning" row a clip_val
        fin = np.isfinite(pre_n)
        res.clip_rate = float(np.mean(fin & (pre_n > method.clip_val))) if len(pre_n) else 0.0
        res.threshold_median = float(method.clip_val)
    elif method.kind in ("zclip", "agc", "adagc"):
        fin = np.isfinite(pre_n) & np.isfinite(post_n)
        clipped = fin & (post_n < pre_n * (1 - 1e-4))
        res.clip_rate = float(np.mean(clipped)) if len(pre_n) else 0.0
        # the threshold in force is only observable on clipped steps: the post-clip norm
        late = clipped[half:]
        res.threshold_median = float(np.median(post_n[half:][late])) if late.any() else None
    if res.diverged:
        res.threshold_median = None
        if method.kind == "lightning":
            assert method.clip_val is not None  # sweep_methods gives every "lightning" row a clip_val
            res.threshold_last = float(method.clip_val)
        elif method.kind in ("ours", "zclip", "agc", "adagc"):
            n = min(len(pre_n), len(post_n))
            ok = np.isfinite(pre_n[:n]) & np.isfinite(post_n[:n]) & (post_n[:n] < pre_n[:n] * (1 - 1e-4))
            res.threshold_last = float(post_n[:n][ok][-1]) if ok.any() else None
    return res


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


def table(rows: list[Row], task: Task) -> str:
    head = (f"| method | diverged / seeds | diverged at step (median) | final {task.metric} (mean ± sd, non-diverged) "
            "| best / worst seed "
            f"| steps to {task.metric} < {task.target:g} (median, reached) | clip rate (mean) "
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


def _tuned_row(rows: list[Row]) -> Row:
    return next(r for r in rows if r.method.name.startswith(TUNED_PREFIX))


def summary(per_task: dict[str, list[Row]]) -> tuple[str, list[str]]:
    """The table over all tasks: each method's diverged seeds and final metric relative to the tuned fixed
    threshold's, and whether it meets the target. Returns the table and the names that meet it."""
    keys = list(per_task)
    tuned = {k: _tuned_row(per_task[k]) for k in keys}
    names = [r.method.name for r in per_task[keys[0]] if r.method.kind not in ("none", "lightning")]
    head = "| method | " + " | ".join(
        f"{TASKS[k].key}: diverged | {TASKS[k].key}: final {TASKS[k].metric} (x tuned)" for k in keys
    ) + f" | 0 diverged and <= {TARGET_RATIO:g}x tuned on every task |"
    lines = [head, "|" + "---|" * (2 + 2 * len(keys))]
    winners = []
    for name in names:
        cells, ok = [], True
        for k in keys:
            row = next((r for r in per_task[k] if r.method.name == name
                        or (name.startswith(TUNED_PREFIX) and r.method.name.startswith(TUNED_PREFIX))), None)
            if row is None:
                cells += ["—", "—"]
                ok = False
                continue
            ratio = row.mean_final / tuned[k].mean_final if row.final_vals and tuned[k].final_vals else math.inf
            ok = ok and row.diverged == 0 and ratio <= TARGET_RATIO
            final = f"{row.mean_final:.4f} ({ratio:.2f}x)" if row.final_vals else "diverged"
            cells += [f"{row.diverged}/{row.n}", final]
        shown = name
        if name.startswith(TUNED_PREFIX):
            shown = "tuned fixed threshold (" + ", ".join(f"{k} {tuned[k].method.spec[1]:g}" for k in keys) + ")"
        if ok and not name.startswith(TUNED_PREFIX):
            winners.append(name)
        verdict = "reference" if name.startswith(TUNED_PREFIX) else ("**yes**" if ok else "no")
        lines.append(f"| {shown} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines), winners


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


def plot(per_task: dict[str, list[Row]], cfgs: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(per_task)
    fig, axes = plt.subplots(len(keys), 2, figsize=(15, 7 * len(keys)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for (ax_fixed, ax_adapt), k in zip(axes, keys):
        rows, cfg, task = per_task[k], cfgs[k], TASKS[k]
        steps = cfg["steps"]
        smooth = max(1, min(25, steps // 20))
        tuned_name = _tuned_row(rows).method.name
        groups = [
            (ax_fixed, "no clipping and fixed thresholds",
             [r for r in rows if r.method.kind in ("none", "lightning") or r.method.name == tuned_name]),
            (ax_adapt, "adaptive (tuned fixed for reference)",
             [r for r in rows if r.method.kind in ("ours", "agc", "adagc", "zclip")]),
        ]
        xs = np.arange(1, steps + 1)
        for ax, title, group in groups:
            for i, row in enumerate(group):
                y = median_curve(row.runs, steps, smooth)
                label = f"{row.method.name} ({row.diverged}/{row.n} diverged)"
                tuned = row.method.name == tuned_name
                ax.plot(xs, np.where(np.isfinite(y), y, np.nan), "--" if tuned else "-",
                        color="black" if tuned else cmap(i % 20), lw=1.6 if tuned else 1.1, label=label)
            ax.set_yscale("log")
            ax.set_xlabel("optimizer step")
            ax.set_title(f"{task.title}: {title}", fontsize=10)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
            ax.grid(alpha=0.3, which="both")
        ax_fixed.set_ylabel(f"training loss (moving avg {smooth}, median over seeds)")
    fig.suptitle(f"Training loss, median over {len(per_task[keys[0]][0].runs)} seeds "
                 "(a curve ends where most seeds diverged)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_output_arguments(p, "tiny smoke setting (both tasks, 1 seed, 30 steps)")
    p.add_argument("--tasks", default="adding,digits", help="comma-separated tasks: adding, digits")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick: 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (default: adding 2000, digits 600; quick: 30)")
    p.add_argument("--seq-len", type=int, default=None, help="adding: sequence length (default 30; quick: 10)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default 50; quick: 10)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default 2; quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no-zclip", action="store_true", help="leave out the zclip comparison")
    p.add_argument("--core", action="store_true",
                   help="only the tuned fixed threshold, the policies' defaults and their history='clipped' variants, "
                   "AGC, AdaGC, zclip and the two low-percentile candidates (for a busy machine)")
    p.add_argument("--digits-sweep", default=None, help="comma-separated fixed thresholds for the digits sweep")
    return p.parse_args(argv)


def task_config(key: str, args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    common = {"task": key, "val_every": args.val_every or (10 if q else 50), "log_every": 1 if q else 10,
              "threads": args.threads, "target": TASKS[key].target, "diverge_bound": TASKS[key].diverge_bound}
    if key == "adding":
        return {**common, "seq_len": args.seq_len or (10 if q else 30), "steps": args.steps or (30 if q else 2000),
                "hidden": 16 if q else 64, "cell": "rnn", "lr": 0.05, "momentum": 0.9, "init_scale": 1.2,
                "batch_size": 64, "num_train": 512 if q else 4096, "num_val": 128 if q else 512}
    return {**common, "steps": args.steps or (30 if q else 600), "hidden": 32 if q else 64, "lr": 0.05 / 32,
            "momentum": 0.9, "batch_size": 32, "num_val": 359}


def setting_line(key: str, cfg: dict[str, Any]) -> str:
    if key == "adding":
        return (f"`AddingRNN(hidden_size={cfg['hidden']}, cell={cfg['cell']!r}, lr={cfg['lr']:g}, "
                f"momentum={cfg['momentum']:g}, init_scale={cfg['init_scale']:g})` on "
                f"`AddingProblemDataModule(seq_len={cfg['seq_len']}, num_train={cfg['num_train']}, "
                f"num_val={cfg['num_val']}, batch_size={cfg['batch_size']}, seed=seed)`, `max_steps={cfg['steps']}`")
    return (f"MLP 64-{cfg['hidden']}-{cfg['hidden']}-10 (ReLU) on scikit-learn's digits (inputs in [0, 1]; "
            f"{cfg['num_val']} held out, the rest shuffled into batches of {cfg['batch_size']}), cross-entropy "
            f"summed over the batch, SGD lr={cfg['lr']:g} (= 0.05 / {cfg['batch_size']}) "
            f"momentum={cfg['momentum']:g}, `max_steps={cfg['steps']}`")


def main(argv: list[str] | None = None) -> dict[str, list[Row]]:
    args = parse_args(argv)
    q = args.quick
    keys = [k.strip() for k in args.tasks.split(",") if k.strip()]
    for k in keys:
        if k not in TASKS:
            raise SystemExit(f"unknown task {k!r}: choose from {', '.join(TASKS)}")
    cfgs = {k: task_config(k, args) for k in keys}
    n_seeds = args.seeds or (1 if q else 3)
    workers = args.workers if args.workers is not None else (1 if q else 2)
    seeds = list(range(n_seeds))
    has_zclip = not args.no_zclip and zclip_available()
    args.out = output_dir(args.out, q, "exploding")
    print(f"machine: {machine()}", flush=True)
    for k in keys:
        print(f"{k}: {cfgs[k]}", flush=True)
    print(f"seeds={seeds}, workers={workers}", flush=True)

    t0 = time.perf_counter()
    sweep_values = {k: TASKS[k].quick_sweep if q else TASKS[k].sweep for k in keys}
    if args.digits_sweep and "digits" in sweep_values:
        sweep_values["digits"] = tuple(float(v) for v in args.digits_sweep.split(",") if v.strip())
    sweeps = {k: sweep_methods(sweep_values[k]) for k in keys}
    jobs = [(m, s, cfgs[k]) for k in keys for m in sweeps[k] for s in seeds]
    results = list(process_map(_run, jobs, workers))
    per_task: dict[str, list[Row]] = {}
    tuned: dict[str, float] = {}
    for k in keys:
        mine = [r for r in results if r.task == k]
        per_task[k] = [Row(m, [r for r in mine if r.method == m.name]) for m in sweeps[k]]
        fixed_rows = [r for r in per_task[k] if r.method.kind == "lightning"]
        best = min(fixed_rows, key=lambda r: (r.score, r.mean_final))
        tuned[k] = float(best.method.clip_val or 1.0)
        print(f"{k}: tuned fixed threshold {tuned[k]:g} (lowest mean final {TASKS[k].metric}, diverged = inf)",
              flush=True)
    phase2 = {k: [m for m in adaptive_methods(tuned[k], has_zclip) if not args.core or m.name in CORE_ROWS
                  or m.name.startswith(TUNED_PREFIX)] for k in keys}
    jobs = [(m, s, cfgs[k]) for k in keys for m in phase2[k] for s in seeds]
    results = list(process_map(_run, jobs, workers))
    for k in keys:
        mine = [r for r in results if r.task == k]
        per_task[k] += [Row(m, [r for r in mine if r.method == m.name]) for m in phase2[k]]
    total = time.perf_counter() - t0

    png = os.path.join(args.out, "exploding.png")
    plot(per_task, cfgs, png)
    command = command_line("exploding", argv)
    zclip_line = ("`zclip` (PyPI) is installed: its `ZClipLightningCallback()` is the last row of each task."
                  if has_zclip else
                  "`zclip` (PyPI) is not installed (or `--no-zclip`): no zclip row. `pip install zclip` adds it.")
    both, winners = summary(per_task)
    verdict = (f"Meets the target on every task: {', '.join(f'`{w}`' for w in winners)}." if winners else
               "No adaptive policy meets the target on every task.")
    parts = [
        "# Does clipping help, and does an adaptive policy need tuning? Two tasks, real Lightning Trainer",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}.",
        f"Total wall time: {total:.0f} s ({workers} worker process(es), {args.threads} torch thread(s) each). "
        "Wall times are noisy: other jobs shared the machine; a diverged run stops early (compare ms/step).",
        "",
        f"Seeds {seeds}. Diverged = training loss NaN/Inf or above the task's bound (the run is stopped there). "
        "Tuned fixed threshold: the sweep value with the lowest mean final validation metric (diverged = inf) on "
        "these seeds. Clip rate: `GradientClipping.clip_rate()` for our callback; pre-clip norm > clip_val for "
        "Lightning's; post-clip norm < pre-clip norm for zclip, AdaptiveGradientClipping and AdaGCClipping. "
        "Threshold in force: for runs that did not diverge, `grad_clip/threshold` over the second half of the run, "
        "median over seeds (zclip, AGC and AdaGC: the post-clip total norm of their clipped steps); for diverged "
        "runs (`last:`), the norm the last clipped step before the divergence was clipped to.",
        "",
        zclip_line,
        "",
        f"## Both tasks: final metric relative to the tuned fixed threshold (target: 0 diverged, <= "
        f"{TARGET_RATIO:g}x on every task)",
        "",
        both,
        "",
        verdict,
        "",
    ]
    for k in keys:
        task, cfg = TASKS[k], cfgs[k]
        sweep = sweep_values[k]
        parts += [
            f"## Task `{k}`: {task.title}",
            "",
            f"Setting: {setting_line(k, cfg)}. Final {task.metric} on the held-out set, measured every "
            f"{cfg['val_every']} steps; {task.trivial_name} scores {task.trivial:.3g}. Divergence bound: training "
            f"loss > {task.diverge_bound:g}. Sweep {{{', '.join(f'{v:g}' for v in sweep)}}} → tuned fixed "
            f"threshold **{tuned[k]:g}**.",
            "",
            table(per_task[k], task),
            "",
        ]
    parts += ["![training loss](exploding.png)", ""]
    md_path = os.path.join(args.out, "exploding.md")
    write_results(md_path, "\n".join(parts))
    print()
    for k in keys:
        print(f"task {k}:")
        print(table(per_task[k], TASKS[k]))
        print()
    print(both)
    print(verdict)
    print(f"\ntotal wall time: {total:.1f} s; wrote {md_path} and {png}")
    return per_task


if __name__ == "__main__":
    main()
