"""Does the clip-threshold finder replace hand tuning? Five tasks x two schedules, paired seeds, plain PyTorch loops.

Tasks (each at a constant learning rate and with a cosine schedule to 0):

- ``adding``: the adding problem (seq_len 30) with a vanilla tanh RNN (hidden 64, recurrent weights orthogonal
  x1.2), SGD lr 0.05 momentum 0.9, 1500 steps: the set-up of ``benchmarks/exploding.py``, where an unclipped
  run explodes within ten steps. Metric: validation MSE.
- ``digits``: an MLP 64-64-64-10 on scikit-learn's digits with the cross-entropy summed over batches of 32,
  SGD lr 0.05/32 momentum 0.9, 1000 steps: gradient norms ~10-60 and no clipping needed. Metric: validation CE.
- ``lm`` and ``lm10x``: the 2-layer causal transformer of ``benchmarks/spikes.py`` (d 64) on Markov text
  (``sim.data.markov_text``), AdamW at lr 3e-3 and at 10x, 600 steps. Metric: validation CE per token.
- ``charlstm``: a character LSTM (embedding 32, hidden 64) on generated words (``sim.data.word_text``), the
  cross-entropy summed over the 32 positions of a window (as Zaremba et al.), SGD lr 1, 1000 steps: unclipped
  it diverges. Metric: validation CE per character.

Methods, on every test seed (the same seed: the same initial weights and batch order for every method): no
clipping, a fixed 1.0, every threshold policy and clipping callback at its defaults (``PercentileThreshold``,
``QuantileThreshold``, ``ZScoreThreshold``, ``WarmupThreshold``, ``AdaptiveGradientClipping``,
``AdaGCClipping``, each through the same core functions its callback calls), the **tuned fixed threshold**
(the value of a half-decade grid with the lowest geometric-mean final loss on separate tuning seeds), and the
finder: :func:`lightning_clip.core.search.search` in the same loop (the search ``ClipThresholdFinder`` runs at
fit start: the probe median of the first batches, one run per candidate from the initial weights on the run's
first batches under the run's schedule), then the training run at the threshold it chose. The finder runs
twice: at ``ClipThresholdFinder``'s defaults (9 candidates of 50 steps at the schedule's first steps; among the
thresholds whose mean loss is within 2 SE of the best, the one nearest the geometric middle of their band;
refined), also trained for the steps left after its search (equal total steps), and with the previous
selection, the largest of those thresholds (``choice="largest"``). The final validation loss is the mean of 10
evaluations over the last tenth of the run.

Every run is cached in ``--cache`` (one JSON file per run, named by the hash of its settings), so a crash or a
change to one method re-runs only what changed. ``--lightning-check`` runs ``ClipThresholdFinder`` in a
Lightning ``Trainer`` on one task and seed and checks it picks the plain-loop search's threshold.

Usage::

    python -m benchmarks.tuning_free                    # the full study (~3 h of one core)
    python -m benchmarks.tuning_free --tasks adding       # one task
    python -m benchmarks.tuning_free --quick              # tiny models, 3 seeds, into a temporary directory
    python -m benchmarks.tuning_free --lightning-check    # the Lightning callback against the plain loop

Writes ``tuning_free.md`` (tables, command, machine) and ``tuning_free.png`` (final loss against threshold)
into ``--out``: ``benchmarks/results`` for a full run, a new temporary directory with ``--quick``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.common import (
    ALPHABET,
    SearchRule,
    adagc_coefficients,
    adaptive_clip_grads_,
    add_output_arguments,
    adding_problem,
    candidate_grid,
    clip_grads_with_norm_,
    command_line,
    divergence_step,
    gradient_stats,
    load_digits_tensors,
    machine,
    markov_text,
    output_dir,
    probe_median,
    schedule_steps,
    search,
    word_text,
    write_results,
)

#: Bump when a change to this file changes what a cached run computes (every cached run is then redone).
CACHE_VERSION = 2
#: The default cache of finished runs (ignored by git): one JSON file per run, named by its settings' hash.
CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "tuning_free"

# ------------------------------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Task:
    """One task: its training settings (``cfg``, every value of which enters the runs' cache keys), the
    half-decade grid its fixed threshold is tuned over, and the tiny settings of ``--quick``."""

    key: str
    title: str
    metric: str
    cfg: dict[str, Any]
    grid: tuple[float, ...]
    quick: dict[str, Any]


_LM = {"d": 64, "layers": 2, "heads": 4, "window": 32, "vocab": 32, "concentration": 0.1, "tokens": 500_000,
       "batch": 16, "opt": "adamw", "steps": 600}
#: AdamW: the search picks thresholds up to ~25 here, so the grid reaches above them (no clipping is a baseline).
_LM_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
_LM_QUICK = {"d": 16, "layers": 1, "heads": 2, "window": 8, "tokens": 20_000, "batch": 4, "steps": 30}
TASKS: dict[str, Task] = {t.key: t for t in (
    Task("adding", "adding problem, vanilla tanh RNN (SGD)", "val MSE",
         {"hidden": 64, "seq_len": 30, "init_scale": 1.2, "num_train": 4096, "num_val": 512, "batch": 64,
          "opt": "sgd", "lr": 0.05, "momentum": 0.9, "steps": 1500},
         (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
         {"hidden": 16, "seq_len": 10, "num_train": 512, "num_val": 128, "steps": 30}),
    Task("digits", "digits MLP, summed cross-entropy (SGD)", "val CE",
         {"hidden": 64, "num_val": 359, "batch": 32, "opt": "sgd", "lr": 0.05 / 32, "momentum": 0.9, "steps": 1000},
         (1.0, 3.0, 10.0, 30.0, 100.0, 300.0),
         {"hidden": 16, "steps": 30}),
    Task("lm", "transformer LM on Markov text (AdamW, lr 3e-3)", "val CE",
         {**_LM, "lr": 3e-3}, _LM_GRID, _LM_QUICK),
    Task("lm10x", "transformer LM on Markov text (AdamW, lr 3e-2 = 10x)", "val CE",
         {**_LM, "lr": 3e-2}, _LM_GRID, _LM_QUICK),
    Task("charlstm", "character LSTM LM on generated words (SGD)", "val CE",
         {"embed": 32, "hidden": 64, "window": 32, "words": 64, "concentration": 0.1, "chars": 400_000, "batch": 16,
          "loss": "sum_over_time", "opt": "sgd", "lr": 1.0, "momentum": 0.0, "steps": 1000},
         (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
         {"embed": 8, "hidden": 16, "window": 8, "chars": 20_000, "batch": 4, "steps": 30}),
)}
SCHEDULES = ("constant", "cosine")


def task_kind(cfg: dict[str, Any]) -> str:
    """The model family of a task's settings."""
    if "seq_len" in cfg:
        return "adding"
    if "d" in cfg:
        return "lm"
    if "words" in cfg:
        return "charlstm"
    return "digits"


def lr_at(schedule: str, lr: float, step: int, steps: int) -> float:
    """The learning rate of 0-based ``step`` of a ``steps``-step run: constant, or cosine from ``lr`` to 0."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":  # lr * factor, as LambdaLR computes it (halving is exact, so the bits are unchanged)
        return lr * (0.5 * (1.0 + math.cos(math.pi * step / steps)))
    raise ValueError(f"unknown schedule {schedule!r}")


_DATA_CACHE: dict[str, Any] = {}


def _data(cfg: dict[str, Any]) -> Any:
    """The task's tensors (fixed across seeds: a seed changes the initial weights and the batch order)."""
    kind = task_kind(cfg)
    key = json.dumps({k: v for k, v in cfg.items() if k in ("seq_len", "num_train", "num_val", "window", "vocab",
                                                            "concentration", "tokens", "words", "chars")},
                     sort_keys=True) + kind
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    if kind == "adding":
        x, y = adding_problem(cfg["num_train"] + cfg["num_val"], cfg["seq_len"], seed=0)
        n = cfg["num_train"]
        out: Any = ((x[:n], y[:n]), (x[n:], y[n:]))
    elif kind == "digits":
        x, y = load_digits_tensors()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        v = cfg["num_val"]
        out = ((x[perm[v:]], y[perm[v:]]), (x[perm[:v]], y[perm[:v]]))
    else:
        w = cfg["window"] + 1
        if kind == "lm":
            train, _ = markov_text(cfg["tokens"], cfg["vocab"], cfg["concentration"], seed=1, source_seed=0)
            val, _ = markov_text(128 * w, cfg["vocab"], cfg["concentration"], seed=2, source_seed=0)
        else:
            train, _ = word_text(cfg["chars"], cfg["words"], cfg["concentration"], seed=1, source_seed=0)
            val, _ = word_text(128 * w, cfg["words"], cfg["concentration"], seed=2, source_seed=0)
        out = ((train[: len(train) // w * w].view(-1, w),), (val.view(-1, w),))
    _DATA_CACHE[key] = out
    return out


class BatchStream:
    """Batch ``i`` of a seed's data order: the training set reshuffled every epoch by a generator of ``seed``.

    ``batch(i)`` is a pure function of ``(seed, i)``, so a search and the training run after it can read
    the same first batches, and two methods on the same seed read the same batches.
    """

    def __init__(self, tensors: tuple[Any, ...], batch: int, seed: int) -> None:
        self.tensors = tensors
        self.batch_size = batch
        self.per_epoch = len(tensors[0]) // batch
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.perms: list[Any] = []

    def batch(self, i: int) -> tuple[Any, ...]:
        epoch, j = divmod(i, self.per_epoch)
        while len(self.perms) <= epoch:
            self.perms.append(torch.randperm(len(self.tensors[0]), generator=self.gen))
        idx = self.perms[epoch][j * self.batch_size:(j + 1) * self.batch_size]
        return tuple(t[idx] for t in self.tensors)


@dataclass
class Setup:
    """One seed of one task: the model at its initial weights, its batches and how to score it."""

    model: Any
    stream: BatchStream
    loss: Callable[[tuple[Any, ...]], Any]  # training loss of a batch
    val: Callable[[], float]  # validation loss of the current weights
    make_optimizer: Callable[[], Any]


def build(cfg: dict[str, Any], seed: int) -> Setup:
    """The model (initial weights from ``seed``), its data order (from ``seed``), loss and validation."""
    kind = task_kind(cfg)
    (train, val) = _data(cfg)
    torch.manual_seed(seed)
    if kind == "adding":
        model: nn.Module = _AddingRNN(cfg["hidden"], cfg["init_scale"])

        def loss(b: tuple[Any, ...]) -> Any:
            return nn.functional.mse_loss(model(b[0]), b[1])

        def val_loss() -> float:
            return float(nn.functional.mse_loss(model(val[0]), val[1]))
    elif kind == "digits":
        h = cfg["hidden"]
        model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))

        def loss(b: tuple[Any, ...]) -> Any:
            return nn.functional.cross_entropy(model(b[0]), b[1], reduction="sum")

        def val_loss() -> float:
            return float(nn.functional.cross_entropy(model(val[0]), val[1]))
    else:
        model = _TinyLM(cfg) if kind == "lm" else _CharLSTM(cfg)
        vocab = model.vocab

        per_token = cfg.get("loss") != "sum_over_time"

        def loss(b: tuple[Any, ...]) -> Any:
            (w,) = b
            ce = nn.functional.cross_entropy(model(w[:, :-1]).reshape(-1, vocab), w[:, 1:].reshape(-1))
            return ce if per_token else ce * (w.shape[1] - 1)

        def val_loss() -> float:
            (w,) = val
            return float(nn.functional.cross_entropy(model(w[:, :-1]).reshape(-1, vocab), w[:, 1:].reshape(-1)))

    def make_optimizer() -> Any:
        if cfg["opt"] == "sgd":
            return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
        return torch.optim.AdamW(model.parameters(), lr=cfg["lr"])

    def validate() -> float:
        with torch.no_grad():
            value = val_loss()
        return value if math.isfinite(value) else math.inf

    return Setup(model, BatchStream(train, cfg["batch"], seed), loss, validate, make_optimizer)


class _AddingRNN(nn.Module):
    """The vanilla tanh RNN of the adding problem (orthogonal recurrent weights times ``init_scale``)."""

    def __init__(self, hidden: int, init_scale: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        weight_hh = self.rnn.weight_hh_l0
        assert isinstance(weight_hh, Tensor)  # an nn.RNN parameter; nn.Module.__getattr__ types it Tensor | Module
        nn.init.orthogonal_(weight_hh, gain=init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class _TinyLM(nn.Module):
    """The 2-layer causal transformer of benchmarks/spikes.py."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        d, w = cfg["d"], cfg["window"]
        self.vocab = cfg["vocab"]
        self.embed = nn.Embedding(self.vocab, d)
        self.pos = nn.Parameter(torch.zeros(w, d))
        layer = nn.TransformerEncoderLayer(d, cfg["heads"], 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg["layers"], enable_nested_tensor=False)
        self.head = nn.Linear(d, self.vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(w))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.embed(x) + self.pos, mask=self.causal, is_causal=True))


class _CharLSTM(nn.Module):
    """A one-layer character LSTM language model."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.vocab = len(ALPHABET)
        self.embed = nn.Embedding(self.vocab, cfg["embed"])
        self.lstm = nn.LSTM(cfg["embed"], cfg["hidden"], batch_first=True)
        self.head = nn.Linear(cfg["hidden"], self.vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(x))[0])


# ------------------------------------------------------------------------------------------------- methods

#: A clipping method as a hashable spec: ("none",), ("fixed", c), ("policy", name, kwargs), ("agc",), ("adagc",).
Spec = tuple[Any, ...]

#: The baselines at their defaults (name, spec), before the tuned fixed threshold and the finder.
BASELINES: list[tuple[str, Spec]] = [
    ("no clipping", ("none",)),
    ("fixed 1.0", ("fixed", 1.0)),
    ("PercentileThreshold()", ("policy", "PercentileThreshold")),
    ("QuantileThreshold()", ("policy", "QuantileThreshold")),
    ("ZScoreThreshold()", ("policy", "ZScoreThreshold")),
    ("WarmupThreshold()", ("policy", "WarmupThreshold")),
    ("AdaptiveGradientClipping()", ("agc",)),
    ("AdaGCClipping()", ("adagc",)),
]


class _AdaGCArgs(TypedDict):
    """The keyword arguments of ``adagc_coefficients`` that ``AdaGCClipping`` passes from its settings."""

    warmup_steps: int
    absolute: float
    relative: float
    beta: float


class Clipper:
    """Clip the gradients of one step the way the library's callback for ``spec`` does, at its defaults."""

    def __init__(self, spec: Spec, params: Sequence[Any]) -> None:
        self.spec = spec
        self.params = list(params)
        self.policy: Any = None
        self.gamma: Any = None
        self.steps = 0
        self.thresholds: list[float] = []
        if spec[0] == "policy":
            import lightning_clip

            self.policy = getattr(lightning_clip, spec[1])()
        elif spec[0] == "fixed":
            self.threshold = torch.tensor(float(spec[1]))
        elif spec[0] == "adagc":
            from lightning_clip import AdaGCClipping

            adagc = AdaGCClipping()  # the callback's defaults
            self.adagc: _AdaGCArgs = {"warmup_steps": adagc.warmup_steps, "absolute": adagc.absolute,
                                      "relative": adagc.relative, "beta": adagc.beta}
        elif spec[0] == "agc":
            from lightning_clip import AdaptiveGradientClipping

            agc = AdaptiveGradientClipping()
            self.agc = (agc.clip_factor, agc.eps)
        elif spec[0] != "none":
            raise ValueError(f"unknown method {spec!r}")

    def __call__(self, grads: list[Any]) -> float:
        """Clip ``grads`` (of ``self.params``, in order) in place; return the pre-clip total norm."""
        stats = gradient_stats(grads)
        kind = self.spec[0]
        if kind == "fixed":
            clip_grads_with_norm_(grads, self.threshold, stats.total_norm)
        elif kind == "policy":
            threshold = self.policy(stats.total_norm)
            clip_grads_with_norm_(grads, threshold, stats.total_norm)
            self.thresholds.append(float(threshold))
        elif kind == "agc":
            adaptive_clip_grads_(self.params, grads, self.agc[0], self.agc[1], grad_norms=list(stats.norms.unbind()))
        elif kind == "adagc":
            if self.gamma is None:
                self.gamma = torch.full_like(stats.norms, float("inf"))
            coef, self.gamma = adagc_coefficients(stats.norms, stats.total_norm, self.gamma, self.steps,
                                                  **self.adagc)
            torch._foreach_mul_(grads, list(coef.unbind()))
        self.steps += 1
        return float(stats.total_norm)


# ------------------------------------------------------------------------------------------------- one run

#: A run diverged when a training loss is not finite or above this multiple of the run's first loss,
#: or when its final validation loss is not below the validation loss of the initial weights.
DIVERGE_FACTOR = 1e3
#: The final validation loss is the mean of this many evaluations over the last tenth of the run (every
#: hundredth of it, the last step included): one evaluation at a constant learning rate catches the weights at
#: a random phase of their fluctuation.
TAIL_EVALS = 10


def train(cfg: dict[str, Any], seed: int, spec: Spec, schedule: str, steps: int,
          val_points: int = 10) -> dict[str, Any]:
    """One training run in a plain loop: ``steps`` optimizer steps of ``spec`` clipping under ``schedule``.

    Returns the per-step training losses and pre-clip norms, ``val_points`` validation losses along the run
    and ``final_val``, the mean validation loss of :data:`TAIL_EVALS` evaluations spread over the last tenth
    of the run (``inf`` for a divergence).
    """
    torch.set_num_threads(1)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    s = build(cfg, seed)
    params = [p for p in s.model.parameters() if p.requires_grad]
    opt = s.make_optimizer()
    clipper = Clipper(spec, params)
    val0 = s.val()
    every = max(1, steps // val_points)
    tail_every = max(1, steps // (10 * TAIL_EVALS))
    tail_from = steps - (TAIL_EVALS - 1) * tail_every  # the 1-based step of the first tail evaluation
    tail: list[float] = []
    losses: list[float] = []
    norms: list[float] = []
    vals: list[tuple[int, float]] = [(0, val0)]
    diverged_at: int | None = None
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(schedule, cfg["lr"], t, steps)
        loss = s.loss(s.stream.batch(t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value) or value > DIVERGE_FACTOR * losses[0]:
            diverged_at = t
            break
        grads = [p.grad for p in params if p.grad is not None]
        norms.append(clipper(grads))
        opt.step()
        tail_point = t + 1 >= tail_from and (steps - t - 1) % tail_every == 0
        curve_point = (t + 1) % every == 0 or t + 1 == steps
        if tail_point or curve_point:
            value = s.val()
            if tail_point:
                tail.append(value)
            if curve_point:
                vals.append((t + 1, value))
    final = math.inf if diverged_at is not None or not tail else float(np.mean(tail))
    if diverged_at is None and not final < val0:
        diverged_at = steps
    thr = clipper.thresholds[len(clipper.thresholds) // 2:]
    return {"final_val": final if diverged_at is None else math.inf, "val0": val0, "diverged_at": diverged_at,
            "tail_vals": tail,
            "steps": len(losses), "losses": [float(f"{v:.5g}") for v in losses],
            "norms": [float(f"{v:.4g}") for v in norms], "vals": vals,
            "threshold_median": float(np.median(thr)) if thr else None,
            "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}


# ------------------------------------------------------------------------------------------------- the cache


def _key(job: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps({**job, "version": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:20]


def cached(cache: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    """The finished result of ``job`` in ``cache``, or ``None``."""
    path = cache / f"{_key(job)}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["result"]
    except (OSError, ValueError, KeyError):
        return None


def find(cfg: dict[str, Any], seed: int, schedule: str, finder: dict[str, Any]) -> dict[str, Any]:
    """The finder's search on one seed, through :func:`lightning_clip.core.search.search` in a plain loop.

    As ``ClipThresholdFinder`` does at fit start: the median total gradient norm of the first
    ``num_probe_batches`` batches at the initial weights (no update) scales the candidate grid; every
    candidate run starts from the initial weights and a fresh optimizer, reads the run's first batches and
    follows the learning-rate schedule of the training run (a scheduler stepped every optimizer step).
    ``finder`` holds the search's settings: ``num_candidates``, ``num_batches``, ``num_probe_batches`` and
    the :class:`~lightning_clip.core.search.SearchRule` fields under ``"rule"``.
    """
    import copy

    torch.set_num_threads(1)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    s = build(cfg, seed)
    params = [p for p in s.model.parameters() if p.requires_grad]
    opt = s.make_optimizer()
    weights = copy.deepcopy(s.model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    rule = SearchRule(**finder["rule"])
    norms = []
    for i in range(finder["num_probe_batches"]):
        opt.zero_grad(set_to_none=True)
        s.loss(s.stream.batch(i)).backward()
        norms.append(float(gradient_stats([p.grad for p in params if p.grad is not None]).total_norm))
    m0 = probe_median(norms)
    steps = cfg["steps"]

    # the learning rate of each run step: the training's schedule compressed into the run (compress_schedule=True),
    # or the schedule's first steps (the default)
    compressed = finder.get("horizon") == "compressed"

    def run(threshold: float, num_steps: int) -> list[float]:
        s.model.load_state_dict(weights)
        opt.load_state_dict(copy.deepcopy(opt_state))
        clipper = Clipper(("fixed", threshold), params)
        at = schedule_steps(steps if compressed else None, num_steps)
        losses: list[float] = []
        for t in range(num_steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(schedule, cfg["lr"], at[t], steps)
            opt.zero_grad(set_to_none=True)
            loss = s.loss(s.stream.batch(t))
            loss.backward()
            losses.append(float(loss.detach()))
            if divergence_step(losses, rule.divergence_factor) is not None:
                break
            clipper([p.grad for p in params if p.grad is not None])
            opt.step()
        return losses

    grid = candidate_grid(m0, finder["num_candidates"], *finder.get("grid", ()))
    result = search(run, grid, finder["num_batches"], rule)
    return {"threshold": result.threshold, "m0": m0, "candidates": result.candidates, "scores": result.scores,
            "num_steps": result.num_steps, "best": result.best, "chosen": result.chosen, "error": result.error,
            "extra_steps": result.total_steps, "probe_batches": finder["num_probe_batches"],
            "losses": [[float(f"{v:.5g}") for v in run_losses] for run_losses in result.losses],
            "table": result.table(), "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}


def execute(job: dict[str, Any], cache: str) -> dict[str, Any]:
    """Run ``job`` (a dict of its settings) and store its result in ``cache``; returns the result."""
    import warnings

    warnings.filterwarnings("ignore")
    if job["kind"] == "train":
        result = train(job["cfg"], job["seed"], tuple(job["spec"]), job["schedule"], job["steps"])
    elif job["kind"] == "find":
        result = find(job["cfg"], job["seed"], job["schedule"], job["finder"])
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")
    path = Path(cache) / f"{_key(job)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"job": job, "result": result}))
    tmp.replace(path)
    return result


def run_jobs(jobs: list[dict[str, Any]], cache: Path, workers: int, label: str = "") -> list[dict[str, Any]]:
    """Results of ``jobs`` in order: from the cache, else run (``workers`` processes; 1 = this process)."""
    cache.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any] | None] = [cached(cache, j) for j in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        print(f"{label}: {len(jobs) - len(todo)} of {len(jobs)} runs cached, running {len(todo)}", flush=True)
    t0 = time.perf_counter()
    if workers <= 1 or len(todo) <= 1:
        for n, i in enumerate(todo, 1):
            results[i] = execute(jobs[i], str(cache))
            _progress(n, len(todo), t0)
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(execute, jobs[i], str(cache)): i for i in todo}
            for n, fut in enumerate(as_completed(futures), 1):
                results[futures[fut]] = fut.result()
                _progress(n, len(todo), t0)
    return [r for r in results if r is not None]


def _progress(n: int, total: int, t0: float) -> None:
    if n == total or n % 10 == 0:
        print(f"  {n}/{total} runs done, {time.perf_counter() - t0:.0f} s", flush=True)


def train_job(task: str, cfg: dict[str, Any], seed: int, spec: Spec, schedule: str,
              steps: int | None = None) -> dict[str, Any]:
    """The settings of one training run (its cache key)."""
    return {"kind": "train", "task": task, "cfg": cfg, "seed": seed, "spec": list(spec), "schedule": schedule,
            "steps": steps or cfg["steps"]}


#: Seeds of the tuning runs (the tuned fixed threshold is chosen on these) and of the test runs (every method).
TUNING_SEEDS = (100, 101, 102)
#: The test seeds a task may run on (``--seeds``/``--task-seeds``); the first ``NUM_TEST_SEEDS`` by default.
TEST_SEEDS = tuple(range(40))
NUM_TEST_SEEDS = 10


def tuning_jobs(task: Task, cfg: dict[str, Any], schedule: str, seeds: Sequence[int],
                grid: Sequence[float]) -> list[dict[str, Any]]:
    """The grid runs that choose the tuned fixed threshold (on ``seeds``, never the test seeds)."""
    return [train_job(task.key, cfg, seed, ("fixed", c), schedule) for c in grid for seed in seeds]


#: The search at ClipThresholdFinder's defaults: 9 candidates, 50 steps each, scored by the mean loss, the
#: candidate nearest the geometric middle of the near-tie band (within 2 SE of the best), refined. ``revision``
#: (ignored by the search) keys the cache: 2 = the band's largest when the band reaches the smallest candidate.
DEFAULT_RULE: dict[str, Any] = {"num_candidates": 9, "num_batches": 50, "num_probe_batches": 8, "revision": 2,
                              "rule": {"tolerance": 2.0, "refine": True, "choice": "middle"}}
#: The previous default selection (the issue's rule): the largest threshold within 2 SE of the best, refined.
LARGEST_RULE: dict[str, Any] = {"num_candidates": 9, "num_batches": 50, "num_probe_batches": 8,
                              "rule": {"tolerance": 2.0, "refine": True}}


def find_job(task: str, cfg: dict[str, Any], seed: int, schedule: str, finder: dict[str, Any]) -> dict[str, Any]:
    """The settings of one search (its cache key). At a constant learning rate the compressed schedule is the
    schedule's first steps, so the horizon setting is dropped (one search serves both rules)."""
    if schedule == "constant":
        finder = {k: v for k, v in finder.items() if k != "horizon"}
    return {"kind": "find", "task": task, "cfg": cfg, "seed": seed, "schedule": schedule, "finder": finder}


# ------------------------------------------------------------------------------------------------- statistics


def gm_ratio(values: Sequence[float], reference: Sequence[float], rounds: int = 10_000, seed: int = 0
             ) -> tuple[float, float, float]:
    """Geometric mean of ``values / reference`` over paired seeds, with a paired bootstrap 90% interval.

    ``inf`` (and an interval up to ``inf``) when a value is not finite (a divergence) while its reference is.
    """
    v = np.asarray(values, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if v.size == 0 or v.size != r.size:
        raise ValueError(f"Expected paired values but got {v.size} and {r.size}")
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(v) - np.log(r)
    logs = np.where(np.isnan(logs), np.inf, logs)
    if not np.isfinite(logs).all():
        return math.inf, math.inf, math.inf
    idx = np.random.default_rng(seed).integers(0, v.size, size=(rounds, v.size))
    means = logs[idx].mean(axis=1)
    lo, hi = np.quantile(means, [0.05, 0.95])
    return float(np.exp(logs.mean())), float(np.exp(lo)), float(np.exp(hi))


def tuned_threshold(grid: Sequence[float], finals: dict[float, list[float]]) -> float:
    """The grid value whose runs on the tuning seeds end with the lowest geometric-mean final loss
    (a divergence counts as +inf)."""
    def gm(values: list[float]) -> float:
        arr = np.asarray(values, dtype=np.float64)
        return math.inf if not np.isfinite(arr).all() else float(np.exp(np.log(arr).mean()))

    return min(grid, key=lambda c: (gm(finals[c]), c))


# ------------------------------------------------------------------------------------------------- the study


@dataclass
class Method:
    """One row of a task's table: its name, and per test seed the final validation loss (``inf``: diverged)."""

    name: str
    finals: list[float]
    note: str = ""
    thresholds: list[float] | None = None  # the finder's chosen thresholds, per seed
    extra_steps: list[int] | None = None  # the finder's search steps, per seed
    search_cpu_s: list[float] | None = None
    train_cpu_s: list[float] | None = None

    @property
    def diverged(self) -> int:
        return int(sum(not math.isfinite(v) for v in self.finals))


@dataclass
class Setting:
    """One task under one schedule: the tuning sweep, the tuned threshold and every method on the test seeds."""

    task: Task
    cfg: dict[str, Any]
    schedule: str
    sweep: dict[float, list[float]]  # grid value -> final losses on the tuning seeds
    tuned: float
    methods: list[Method]

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    @property
    def reference(self) -> Method:
        return self.methods[0]


#: The same selection, each candidate run following the training's learning-rate schedule compressed into the
#: run (``ClipThresholdFinder(compress_schedule=True)``; used by ``--lightning-check``).
COMPRESSED_RULE: dict[str, Any] = {**DEFAULT_RULE, "horizon": "compressed"}
#: The finder rows: (row name, settings of the search); the last is the library's default
#: (``ClipThresholdFinder()``: each run at the schedule's first steps, the middle of the near-tie band).
FINDERS: list[tuple[str, dict[str, Any]]] = [
    ("finder, largest near-tie (previous rule)", LARGEST_RULE),
    ("finder", DEFAULT_RULE),
]
#: The noise control: a fixed threshold 10**0.05 (1.12) times the tuned one. Its ratio to the tuned threshold
#: shows how far two nearly equal thresholds end apart on the same seeds (the floor of the finder's ratio).
CONTROL_FACTOR = 10 ** 0.05
CONTROL = "fixed 1.12 x tuned (noise control)"
#: The row of the finder trained for the steps left after its search (equal total steps).
EQUAL_STEPS = "finder, equal total steps"


def study(tasks: Sequence[Task], cfgs: dict[str, dict[str, Any]], grids: dict[str, tuple[float, ...]],
          schedules: Sequence[str],
          test_seeds: dict[str, list[int]], tuning_seeds: dict[str, list[int]],
          finders: Sequence[tuple[str, dict[str, Any]]], cache: Path, workers: int,
          baseline_seeds: dict[str, list[int]] | None = None) -> tuple[list[Setting], float]:
    """Run (or read from ``cache``) every run of the study; the tables' numbers, and the CPU seconds of all
    the runs and searches they read. ``test_seeds`` and ``baseline_seeds`` (default: the test seeds) are per
    task; the baselines at their defaults run on ``baseline_seeds``, a prefix of the test seeds."""
    bseeds = {k: (baseline_seeds or {}).get(k, v) for k, v in test_seeds.items()}
    pairs = [(t, sched) for t in tasks for sched in schedules]
    # Phase 1: the tuning sweeps, which choose each setting's tuned threshold.
    jobs = [j for t, sched in pairs for j in tuning_jobs(t, cfgs[t.key], sched, tuning_seeds[t.key], grids[t.key])]
    results = dict(zip((_key(j) for j in jobs), run_jobs(jobs, cache, workers, "phase 1 (tuning sweeps)")))
    tuned: dict[tuple[str, str], float] = {}
    for t, sched in pairs:
        sweep = {c: [results[_key(train_job(t.key, cfgs[t.key], s, ("fixed", c), sched))]["final_val"]
                     for s in tuning_seeds[t.key]] for c in grids[t.key]}
        tuned[t.key, sched] = tuned_threshold(grids[t.key], sweep)
    # Phase 2, one test seed at a time (a cut-short study leaves whole seeds): the searches, then the training
    # runs at the tuned threshold and at each finder's threshold (the library's rule also at equal total steps).
    for n in range(max(len(v) for v in test_seeds.values())):
        at = [(t, sched, test_seeds[t.key][n]) for t, sched in pairs if n < len(test_seeds[t.key])]
        finds = [find_job(t.key, cfgs[t.key], seed, sched, f) for t, sched, seed in at for _, f in finders]
        results.update(zip((_key(j) for j in finds), run_jobs(finds, cache, workers, f"test seed {n}: searches")))
        jobs2: list[dict[str, Any]] = []
        for t, sched, seed in at:
            cfg = cfgs[t.key]
            jobs2.append(train_job(t.key, cfg, seed, ("fixed", tuned[t.key, sched]), sched))
            jobs2.append(train_job(t.key, cfg, seed, ("fixed", tuned[t.key, sched] * CONTROL_FACTOR), sched))
            for i, (_, f) in enumerate(finders):
                found = results[_key(find_job(t.key, cfg, seed, sched, f))]
                jobs2.append(train_job(t.key, cfg, seed, ("fixed", found["threshold"]), sched))
                if i == len(finders) - 1:
                    jobs2.append(train_job(t.key, cfg, seed, ("fixed", found["threshold"]), sched,
                                           max(1, cfg["steps"] - found["extra_steps"])))
        results.update(zip((_key(j) for j in jobs2), run_jobs(jobs2, cache, workers, f"test seed {n}: training")))
    # Phase 3: the baselines at their defaults (no other run depends on them), seed by seed.
    jobs3 = [train_job(t.key, cfgs[t.key], seed, spec, sched) for t, sched in pairs for _, spec in BASELINES
             for seed in bseeds[t.key]]
    jobs3.sort(key=lambda j: j["seed"])
    results.update(zip((_key(j) for j in jobs3), run_jobs(jobs3, cache, workers, "phase 3 (baselines)")))
    settings = [_setting(t, cfgs[t.key], sched, grids[t.key], tuned[t.key, sched], results, test_seeds[t.key],
                         tuning_seeds[t.key], finders, bseeds[t.key]) for t, sched in pairs]
    return settings, float(sum(r["cpu_s"] for r in results.values()))


def _setting(t: Task, cfg: dict[str, Any], sched: str, grid: Sequence[float], c: float,
             results: dict[str, dict[str, Any]], test_seeds: Sequence[int], tuning_seeds: Sequence[int],
             finders: Sequence[tuple[str, dict[str, Any]]], baseline_seeds: Sequence[int] | None = None) -> Setting:
    """One task and schedule's rows, from the runs' ``results`` (keyed by their settings' hash)."""

    def finals(spec: Spec, seeds: Sequence[int] = test_seeds) -> list[float]:
        return [results[_key(train_job(t.key, cfg, s, spec, sched))]["final_val"] for s in seeds]

    sweep = {g: finals(("fixed", g), seeds=tuning_seeds) for g in grid}
    rows = [Method(f"tuned fixed {c:g}", finals(("fixed", c)), "best of the grid on the tuning seeds"),
            Method(CONTROL, finals(("fixed", c * CONTROL_FACTOR)), "the spread a near-identical threshold shows")]
    bseeds = test_seeds if baseline_seeds is None else baseline_seeds
    rows += [Method(name, finals(spec, bseeds)) for name, spec in BASELINES]
    for i, (name, f) in enumerate(finders):
        found = [results[_key(find_job(t.key, cfg, s, sched, f))] for s in test_seeds]
        runs = [results[_key(train_job(t.key, cfg, s, ("fixed", r["threshold"]), sched))]
                for s, r in zip(test_seeds, found)]
        rows.append(Method(name, [r["final_val"] for r in runs], thresholds=[r["threshold"] for r in found],
                           extra_steps=[r["extra_steps"] for r in found],
                           search_cpu_s=[r["cpu_s"] for r in found], train_cpu_s=[r["cpu_s"] for r in runs]))
        if i == len(finders) - 1:
            short = [results[_key(train_job(t.key, cfg, s, ("fixed", r["threshold"]), sched,
                                             max(1, cfg["steps"] - r["extra_steps"])))]
                     for s, r in zip(test_seeds, found)]
            rows.append(Method(EQUAL_STEPS, [r["final_val"] for r in short], thresholds=[r["threshold"] for r in found],
                               extra_steps=[r["extra_steps"] for r in found]))
    return Setting(t, cfg, sched, sweep, c, rows)


# ------------------------------------------------------------------------------------------------- report

#: The targets: the finder's geometric-mean ratio to the tuned fixed threshold, the upper end of its
#: interval, and the tighter ratio on the language model (both learning rates).
TARGET_RATIO, TARGET_UPPER, TARGET_LM = 1.2, 1.5, 1.05


def _ratio_cell(m: Method, ref: Method) -> str:
    """``m`` against ``ref`` on the seeds ``m`` ran (a prefix of the reference's seeds)."""
    if not m.finals:
        return "not run"
    ref = Method(ref.name, ref.finals[: len(m.finals)])
    gm, lo, hi = gm_ratio(m.finals, ref.finals)
    if math.isfinite(gm):
        return f"{gm:.3f} [{lo:.3f}, {hi:.3f}]"
    ok = [i for i, (v, r) in enumerate(zip(m.finals, ref.finals)) if math.isfinite(v) and math.isfinite(r)]
    if not ok:
        return "diverged"
    rest = gm_ratio([m.finals[i] for i in ok], [ref.finals[i] for i in ok])[0]
    return f"inf ({rest:.3f} on the {len(ok)} others)"


def _range(values: Sequence[float]) -> str:
    return f"{np.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def meets_target(st: Setting, m: Method) -> tuple[bool, str]:
    """Whether finder row ``m`` meets the targets on ``st``, and the first one it misses."""
    gm, _, hi = gm_ratio(m.finals, st.reference.finals)
    limit = TARGET_LM if st.task.key.startswith("lm") else TARGET_RATIO
    if m.diverged:
        return False, f"{m.diverged} diverged"
    if gm > limit:
        return False, f"ratio {gm:.2f} > {limit:g}"
    if hi > TARGET_UPPER:
        return False, f"upper end {hi:.2f} > {TARGET_UPPER:g}"
    return True, ""


def summary_table(settings: Sequence[Setting], finder: str, other: str | None) -> str:
    """One row per task and schedule: the finder against the tuned fixed threshold."""
    head = ["task", "schedule", "tuned fixed (grid, tuning seeds)", "finder / tuned: geo. mean [90% CI]",
            "finder diverged", "finder threshold: median (range)", "extra steps (+ probe batches)",
            "search CPU / training CPU", "equal total steps: finder / tuned", "noise control: 1.12 x tuned / tuned"]
    if other:
        head += [f"{other} / tuned", f"{other}: diverged"]
    head += ["meets the target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for st in settings:
        f, ref = st.method(finder), st.reference
        eq = st.method(EQUAL_STEPS)
        ok, why = meets_target(st, f)
        search_s = float(np.mean(f.search_cpu_s or [0.0]))
        training = float(np.mean(f.train_cpu_s or [1.0]))
        cells = [st.task.key, st.schedule, f"{st.tuned:g}", _ratio_cell(f, ref), f"{f.diverged}/{len(f.finals)}",
                 _range(f.thresholds or [math.nan]), f"{np.mean(f.extra_steps or [0]):.0f} (+8)",
                 f"{search_s:.1f} s / {training:.1f} s", _ratio_cell(eq, ref), _ratio_cell(st.method(CONTROL), ref)]
        if other:
            i = st.method(other)
            cells += [_ratio_cell(i, ref), f"{i.diverged}/{len(i.finals)}"]
        cells.append("yes" if ok else f"**no**: {why}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setting_table(st: Setting) -> str:
    """Every method on one task and schedule."""
    ref = st.reference
    lines = ["| method | diverged | final " + st.task.metric + ": mean (min-max) | x tuned: geo. mean [90% CI] "
             "| threshold |", "|---|---|---|---|---|"]
    for m in st.methods:
        fin = [v for v in m.finals if math.isfinite(v)]
        value = f"{np.mean(fin):.4g} ({min(fin):.4g}-{max(fin):.4g})" if fin else "—"
        thr = _range(m.thresholds) if m.thresholds else (m.name.split()[-1] if m is ref else "")
        lines.append(f"| {m.name} | {m.diverged}/{len(m.finals)} | {value} | "
                     f"{'1 (reference)' if m is ref else _ratio_cell(m, ref)} | {thr} |")
    sweep = ", ".join(f"{c:g}: " + (f"{math.exp(np.mean(np.log(v))):.4g}" if np.isfinite(v).all() else "diverged")
                      for c, v in st.sweep.items())
    return "\n".join(lines) + f"\n\nTuning sweep (geometric mean over the tuning seeds): {sweep}."


def plot(settings: Sequence[Setting], finders: Sequence[str], path: str) -> None:
    """Final loss against threshold, one panel per task and schedule: the tuning sweep, the tuned threshold
    and each finder's (threshold, final loss) on the test seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(st.task.key for st in settings))
    scheds = list(dict.fromkeys(st.schedule for st in settings))
    fig, axes = plt.subplots(len(keys), len(scheds), figsize=(5.5 * len(scheds), 3.6 * len(keys)), squeeze=False)
    markers = ["x", "o", "s", "^"]
    for st in settings:
        ax = axes[keys.index(st.task.key)][scheds.index(st.schedule)]
        cs = sorted(st.sweep)
        for i in range(len(next(iter(st.sweep.values())))):
            ax.plot(cs, [st.sweep[c][i] if math.isfinite(st.sweep[c][i]) else np.nan for c in cs], color="0.8",
                    lw=0.8)
        gm = [math.exp(np.mean(np.log(st.sweep[c]))) if np.isfinite(st.sweep[c]).all() else np.nan for c in cs]
        ax.plot(cs, gm, "k-", lw=1.5, label="fixed threshold, tuning seeds (geo. mean)")
        ax.axvline(st.tuned, color="k", ls="--", lw=0.8)
        for j, name in enumerate(finders):
            m = st.method(name)
            xs = m.thresholds or []
            ys = [v if math.isfinite(v) else np.nan for v in m.finals]
            ax.scatter(xs, ys, marker=markers[j % len(markers)], s=22, label=f"{name}, test seeds", zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{st.task.key}, {st.schedule} lr", fontsize=9)
        ax.set_xlabel("clip threshold")
        ax.set_ylabel(f"final {st.task.metric}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_output_arguments(p, "tiny models, 3 test seeds (the baselines on 1), a few dozen steps (a fresh cache)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated: constant, cosine")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"test seeds (default {NUM_TEST_SEEDS}, at most {len(TEST_SEEDS)}; quick: 3)")
    p.add_argument("--task-seeds", default="", help="per-task number of test seeds, e.g. lm=5,lm10x=5 (overrides "
                   "--seeds for those tasks)")
    p.add_argument("--tuning-seeds", default="", help="per-task number of tuning seeds (the first ones), e.g. lm=1 "
                   f"(default {len(TUNING_SEEDS)})")
    p.add_argument("--baseline-seeds", default="", help="per-task number of test seeds the baselines at their "
                   "defaults run on (the first ones), e.g. lm=3 (default: all test seeds)")
    p.add_argument("--workers", type=int, default=None, help="processes (default 2; quick: 1)")
    p.add_argument("--cache", default=None,
                   help=f"cache of finished runs (default {CACHE_DIR.relative_to(CACHE_DIR.parents[2])}; quick: a "
                   "fresh one in the output directory)")
    p.add_argument("--lightning-check", action="store_true",
                   help="only check that ClipThresholdFinder in a Lightning Trainer picks the same threshold as the "
                   "plain-loop search (one task, one seed)")
    return p.parse_args(argv)


def quick_settings() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each task's ``--quick`` settings and a small search (5 candidates of 10 steps)."""
    cfgs = {k: {**t.cfg, **t.quick} for k, t in TASKS.items()}
    return cfgs, {"num_candidates": 5, "num_batches": 10, "num_probe_batches": 4}


def main(argv: list[str] | None = None) -> list[Setting]:
    args = parse_args(argv)
    q = args.quick
    keys = [k.strip() for k in args.tasks.split(",") if k.strip()]
    scheds = [s.strip() for s in args.schedules.split(",") if s.strip()]
    for k in keys:
        if k not in TASKS:
            raise SystemExit(f"unknown task {k!r}: choose from {', '.join(TASKS)}")
    for s in scheds:
        if s not in SCHEDULES:
            raise SystemExit(f"unknown schedule {s!r}: choose from {', '.join(SCHEDULES)}")
    out = output_dir(args.out, q, "tuning_free")
    if args.lightning_check:
        lightning_check(keys[0], q)
        return []
    cfgs = {k: dict(TASKS[k].cfg) for k in keys}
    finders = list(FINDERS)
    if q:
        cfgs, small = quick_settings()
        cfgs = {k: cfgs[k] for k in keys}
        finders = [(name, {**f, **small}) for name, f in finders]
    test_seeds = list(TEST_SEEDS[: args.seeds] if args.seeds else TEST_SEEDS[: 3 if q else NUM_TEST_SEEDS])
    per_task = {k: test_seeds[: min(len(test_seeds), n)] if q else list(TEST_SEEDS[:n])
                for k, n in _per_task(args.task_seeds, keys, "--task-seeds").items()}
    seeds = {k: per_task.get(k, test_seeds) for k in keys}
    baseline_seeds = {k: seeds[k][:n] for k, n in _per_task(args.baseline_seeds, keys, "--baseline-seeds").items()}
    if q:  # the baselines on one seed: enough to show every row works
        baseline_seeds = {k: baseline_seeds.get(k, seeds[k][:1]) for k in keys}
    tuning = list(TUNING_SEEDS[:2] if q else TUNING_SEEDS)
    tuning_seeds = {k: tuning[:n] for k, n in _per_task(args.tuning_seeds, keys, "--tuning-seeds").items()}
    tuning_seeds = {k: tuning_seeds.get(k, tuning) for k in keys}
    workers = args.workers if args.workers is not None else (1 if q else 2)
    cache = Path(args.cache) if args.cache else (Path(out) / "cache" if q else CACHE_DIR)
    print(f"machine: {machine()}", flush=True)
    t0 = time.perf_counter()
    grids = {k: TASKS[k].grid[::3] if q else TASKS[k].grid for k in keys}
    settings, cpu = study([TASKS[k] for k in keys], cfgs, grids, scheds, seeds, tuning_seeds, finders, cache,
                          workers, baseline_seeds)
    wall = time.perf_counter() - t0
    command = command_line("tuning_free", argv)
    finder, other = finders[-1][0], (finders[0][0] if len(finders) > 1 else None)
    png = os.path.join(out, "tuning_free.png")
    plot(settings, [n for n, _ in finders], png)
    parts = [
        "# Does the clip-threshold finder replace hand tuning?",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}.",
        f"Total wall time: {wall:.0f} s for what was not cached ({workers} worker process(es), 1 torch thread "
        f"each); CPU time of every run and search of the study: {cpu:.0f} s.",
        "",
        f"Test seeds {test_seeds}{_seed_note(seeds, baseline_seeds, test_seeds)} (the same seed: the same initial "
        "weights and batch order for every method); "
        f"the tuned fixed threshold is the grid value with the lowest geometric-mean final loss over the tuning "
        f"seeds {tuning}{_seed_note({}, tuning_seeds, tuning, 'tuning')}. Ratios: geometric mean over the test "
        "seeds of a method's final validation loss "
        "over the tuned fixed threshold's on the same seed, with a paired bootstrap 90% interval (10,000 "
        "resamples of the seeds); a divergence makes the ratio inf. Target: 0 divergences, ratio <= "
        f"{TARGET_RATIO:g} with the interval's upper end <= {TARGET_UPPER:g}, and <= {TARGET_LM:g} on the "
        "language model.",
        "",
        "## Summary",
        "",
        summary_table(settings, finder, other),
        "",
    ]
    for st in settings:
        parts += [f"## `{st.task.key}`, {st.schedule} learning rate: {st.task.title}", "",
                  setting_line(st), "", setting_table(st), ""]
    parts += ["![final loss against threshold](tuning_free.png)", ""]
    md = os.path.join(out, "tuning_free.md")
    write_results(md, "\n".join(parts))
    print("\n".join(parts[:-2]), flush=True)
    print(f"total wall time {wall:.0f} s; wrote {md} and {png}", flush=True)
    return settings


def _seed_note(seeds: dict[str, list[int]], fewer: dict[str, list[int]], default: list[int],
               what: str = "the baselines at their defaults") -> str:
    """Which tasks ran on fewer seeds than the others, in words ("" when none)."""
    notes = [f"`{k}`: test seeds {v}" for k, v in seeds.items() if v != default]
    notes += [f"`{k}`: {what} on seeds {v} only" for k, v in fewer.items() if v != seeds.get(k, default)]
    return f" ({'; '.join(notes)})" if notes else ""


def _per_task(text: str, keys: Sequence[str], option: str) -> dict[str, int]:
    """``"lm=5,lm10x=3"`` as ``{"lm": 5, "lm10x": 3}`` (tasks not run are dropped)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, n = part.partition("=")
        low = 0 if option == "--baseline-seeds" else 1
        if key not in TASKS or not n.isdigit() or int(n) < low:
            raise SystemExit(f"{option}: expected TASK=N with TASK one of {', '.join(TASKS)} and N >= {low} but got "
                             f"{part!r}")
        if key in keys:
            out[key] = int(n)
    return out


def setting_line(st: Setting) -> str:
    c = st.cfg
    sched = "constant" if st.schedule == "constant" else "cosine from the initial value to 0"
    opt = (f"SGD lr {c['lr']:g} momentum {c['momentum']:g}" if c["opt"] == "sgd" else f"AdamW lr {c['lr']:g}")
    return (f"{c['steps']} steps, {opt}, learning rate {sched}, batch {c['batch']}. Settings: `{json.dumps(c)}`. "
            f"Fixed-threshold grid: {', '.join(f'{g:g}' for g in st.sweep)}.")



def lightning_check(task: str, quick: bool, seed: int = 0, schedule: str = "cosine") -> dict[str, Any]:
    """Run ``ClipThresholdFinder`` in a Lightning ``Trainer`` on ``task`` and the plain-loop search on the same
    model, data and seed; return both results. Raises ``SystemExit`` when the thresholds differ."""
    import logging
    import warnings

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Dataset

    from lightning_clip import ClipThresholdFinder, GradientClipping

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    # the compressed schedule: the callback steps the schedulers ahead; the plain loop computes the rates
    cfg, finder = (quick_settings()[0][task], {**COMPRESSED_RULE, **quick_settings()[1]}) if quick else (
        dict(TASKS[task].cfg), COMPRESSED_RULE)
    plain = find(cfg, seed, schedule, finder)
    s = build(cfg, seed)
    steps = cfg["steps"]

    class Batches(Dataset):  # batch i of the seed's data order, in order
        def __len__(self) -> int:
            return steps

        def __getitem__(self, i: int) -> tuple[Any, ...]:
            return s.stream.batch(i)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = s.model

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return s.loss(tuple(batch))

        def configure_optimizers(self) -> Any:
            opt = s.make_optimizer()
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_at(schedule, 1.0, t, steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    finder_cb = ClipThresholdFinder(num_candidates=finder["num_candidates"], num_batches=finder["num_batches"],
                                    num_probe_batches=finder["num_probe_batches"], plot=False, compress_schedule=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps,  # the fit's length sets the compression
                         callbacks=[finder_cb, GradientClipping()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Module(), DataLoader(Batches(), batch_size=None))
    res = finder_cb.results
    assert res is not None and finder_cb.threshold is not None
    scores = np.asarray(res.scores, dtype=np.float64)
    plain_scores = np.asarray(plain["scores"], dtype=np.float64)
    same = res.candidates == plain["candidates"] and finder_cb.threshold == plain["threshold"]
    finite = np.isfinite(scores) & np.isfinite(plain_scores)
    diff = float(np.max(np.abs(scores[finite] - plain_scores[finite]) / np.abs(plain_scores[finite]))) \
        if same and finite.any() else math.nan
    print(f"Lightning check on `{task}` ({schedule} learning rate, seed {seed}): ClipThresholdFinder chose "
          f"{finder_cb.threshold:.6g}, the plain-loop search {plain['threshold']:.6g}; probe median "
          f"{finder_cb.initial_norm:.6g} and {plain['m0']:.6g}; {len(res.candidates)} candidates, largest relative "
          f"score difference {diff:.3g}", flush=True)
    if not same:
        raise SystemExit(f"the thresholds differ:\nLightning:\n{res.table()}\nplain loop:\n{plain['table']}")
    return {"lightning": finder_cb.threshold, "plain": plain["threshold"], "max_score_difference": diff}


if __name__ == "__main__":
    main()
