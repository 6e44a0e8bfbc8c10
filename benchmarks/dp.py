"""What does client-level differential privacy cost in ``ddp_arc``? Accuracy against epsilon on digits, real DDP.

Setting: the digits task of ``benchmarks.robustness`` (its data split, shards, model, batches and worker
momentum, from ``benchmarks.common``), with ``n = 10`` ranks in real DDP (gloo, CPU; one launch, every run
in sequence). Each rank's worker momentum is clipped to ``C`` and the hook adds ``N(0, sigma^2 C^2)`` once to
the sum of the ``n`` clipped vectors before dividing by ``n`` (``ARCConfig(dp_noise_multiplier=sigma,
static_clip=C)``), then a plain SGD step. A small MLP 64-16-10 (1210 weights) keeps the noise's norm
``sigma C sqrt(d) / n`` as small as this setting allows.

Two studies, ``sigma`` in {0, 0.5, 1, 2}:

* **honest**: 10 honest ranks, DP-FedAvg (``arc=False``, the mean): the setting whose guarantee holds;
* **one Byzantine rank**: 9 honest ranks and rank 9 Byzantine (sign flip of its momentum, or the line-
  searched ALIE attack; the worst case is reported), ``num_byzantine=1``, with ``clip > mean`` (DP-FedAvg),
  ``ARC > clip > mean`` and ``ARC > clip > NNM > cwtm``. With ARC, NNM or a robust rule the guarantee is
  not established (the library warns): their epsilon is the accountant's number for the same noise, not a
  guarantee.

Epsilon: the library's ``epsilon`` (dp-accounting's RDP accountant) at ``delta = 1e-5`` for ``sampling rate 1``
(every rank's client takes part in every step) and the run's steps. Metric: the test accuracy at the end of
training and the best over the evaluations, averaged over seeds.

Usage (from the repository root)::

    python -m benchmarks.dp              # the study (minutes on 2 cores), into benchmarks/results/dp.md
    python -m benchmarks.dp --quick      # smoke run to a temporary directory

Writes ``dp.md`` (tables, command, machine, wall time) and ``dp.png`` (accuracy against epsilon).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

from benchmarks.common import (
    ARCConfig,
    Result,
    SendTransform,
    Setting,
    add_output_arguments,
    attack_transforms,
    command_line,
    epsilon,
    machine,
    md_table,
    output_dir,
    run_ddp_all,
    write_results,
)

NAME = "dp"
N = 10
SIGMAS = (0.0, 0.5, 1.0, 2.0)
DELTA = 1e-5
HET = "a=0.5"
#: Byzantine rows: label -> (arc, aggregator, nnm).
ROWS: dict[str, tuple[bool, str, bool]] = {
    "clip > mean": (False, "mean", False),
    "ARC > clip > mean": (True, "mean", False),
    "ARC > clip > NNM > cwtm": (True, "cwtm", True),
}
HONEST_ROW = "clip > mean (10 honest)"
ATTACKS = ("SF", "ALIE-LS")


@dataclass(frozen=True)
class DPRun:
    sigma: float
    row: str
    attack: str | None  # None: 10 honest ranks
    seed: int

    @property
    def het(self) -> str:
        return HET

    @property
    def n(self) -> int:
        return N

    @property
    def honest(self) -> int:
        return N if self.attack is None else N - 1

    @property
    def label(self) -> str:
        return f"sigma={self.sigma:g} {self.row:<26} {self.attack or '-':<8} seed {self.seed}"

    def config(self, setting: Setting) -> ARCConfig:
        """Worker momentum, the clip, the noise (and ARC / the rule in the Byzantine rows)."""
        arc, rule, nnm = (False, "mean", False) if self.attack is None else ROWS[self.row]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the DP guarantee is not established" for the ARC rows: in the table
            return ARCConfig(num_byzantine=0 if self.attack is None else 1, aggregator=rule, nnm=nnm, arc=arc,
                             static_clip=setting.clip, worker_momentum=setting.beta, dp_noise_multiplier=self.sigma,
                             dp_seed=self.seed, dp_delta=DELTA)

    def transforms(self) -> list[SendTransform]:
        return attack_transforms(self.attack, range(self.honest, N))


def build_runs(sigmas: tuple[float, ...], attacks: tuple[str, ...], seeds: tuple[int, ...],
               byz_seeds: tuple[int, ...]) -> list[DPRun]:
    runs = [DPRun(s, HONEST_ROW, None, seed) for s in sigmas for seed in seeds]
    runs += [DPRun(s, row, a, seed) for s in sigmas for row in ROWS for a in attacks for seed in byz_seeds]
    return runs


def tables(results: list[Result], sigmas: tuple[float, ...], steps: int) -> tuple[str, dict]:
    by: dict[tuple[float, str, str | None], list[Result]] = defaultdict(list)
    for r in results:
        by[(r.run.sigma, r.run.row, r.run.attack)].append(r)

    def mean(key: tuple, metric: str) -> float:
        return statistics.fmean(r.accs[-1] if metric == "final" else r.max_acc for r in by[key])

    eps = {s: epsilon(s, 1.0, steps, DELTA) for s in sigmas}
    attacks = sorted({r.run.attack for r in results if r.run.attack is not None})
    summary: dict[str, dict[float, float]] = defaultdict(dict)
    honest, byz = [], []
    for s in sigmas:
        final, best = mean((s, HONEST_ROW, None), "final"), mean((s, HONEST_ROW, None), "max")
        summary[HONEST_ROW][s] = final
        honest.append([f"{s:g}", f"{eps[s]:.3g}", f"{final:.3f}", f"{best:.3f}"])
        cells = []
        for row in ROWS:
            worst = min(attacks, key=lambda a: mean((s, row, a), "final"))
            summary[row][s] = mean((s, row, worst), "final")
            cells.append(f"{summary[row][s]:.3f} ({worst})")
        byz.append([f"{s:g}", f"{eps[s]:.3g}", *cells])
    text = (md_table(["sigma", f"epsilon (delta = {DELTA:g})", f"{HONEST_ROW}: final", "best"], honest) + "\n\n"
            + md_table(["sigma", "epsilon", *(row + ("" if row == "clip > mean" else " †") for row in ROWS)], byz))
    return text, {"eps": eps, "summary": summary}


def plot(info: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    eps = info["eps"]
    for row, accs in info["summary"].items():
        xs = [eps[s] for s in accs if eps[s] != float("inf")]
        ys = [accs[s] for s in accs if eps[s] != float("inf")]
        ax.plot(xs, ys, marker="o", label=row)
        if 0.0 in accs:
            ax.axhline(accs[0.0], ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon at delta = {DELTA:g} (dotted: no noise)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"Client-level DP in ddp_arc, digits, n = {N} ranks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser, "1 seed, 30 steps, sigma in {0, 1}, sign flip only (a smoke run)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the honest study")
    parser.add_argument("--byz-seeds", type=int, default=1, help="seeds of the Byzantine study")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    out = output_dir(args.out, args.quick, NAME)
    sigmas: tuple[float, ...]
    attacks: tuple[str, ...]
    seeds: tuple[int, ...]
    byz_seeds: tuple[int, ...]
    if args.quick:
        sigmas, attacks, seeds, byz_seeds, steps = (0.0, 1.0), ("SF",), (1,), (1,), 30
    else:
        sigmas, attacks, steps = SIGMAS, ATTACKS, args.steps
        seeds, byz_seeds = tuple(range(1, args.seeds + 1)), tuple(range(1, args.byz_seeds + 1))
    setting = Setting(steps=steps, hidden=16)
    runs = build_runs(sigmas, attacks, seeds, byz_seeds)
    print(f"{len(runs)} runs on {N} gloo processes", flush=True)
    t0 = time.perf_counter()
    results, _ = run_ddp_all(runs, setting, cache=None)
    wall = time.perf_counter() - t0
    text, info = tables(results, sigmas, steps)
    print(text)
    md = "\n".join([
        "# Client-level differential privacy in ddp_arc: accuracy against epsilon",
        "",
        f"Digits, {N} ranks in real DDP (gloo, CPU), heterogeneity {HET}, MLP 64-{setting.hidden}-10, "
        f"{steps} steps of batch {setting.batch}, worker momentum {setting.beta}, lr {setting.lr}, clip C = "
        f"{setting.clip:g}; noise N(0, sigma^2 C^2) on the sum of the clipped vectors; seeds {list(seeds)} "
        f"(Byzantine study: {list(byz_seeds)}). "
        f"Epsilon: dp-accounting's RDP accountant, sampling rate 1, {steps} steps.",
        "",
        "Test accuracy (mean over seeds). First table: 10 honest ranks (DP-FedAvg: the guarantee holds). "
        f"Second: 9 honest ranks + 1 Byzantine, the worst final accuracy over the attacks {list(attacks)}. "
        "† ARC, NNM or a robust rule: the noise is the same, but the DP guarantee is not established.",
        "",
        text,
        "",
        f"Command: `{command_line(NAME, argv)}`",
        "",
        f"Machine: {machine()}",
        "",
        f"Wall time: {wall:.0f} s ({len(runs)} runs)",
    ])
    write_results(os.path.join(out, "dp.md"), md)
    plot(info, os.path.join(out, "dp.png"))
    print(f"wrote {out}/dp.md and dp.png")


if __name__ == "__main__":
    main()
