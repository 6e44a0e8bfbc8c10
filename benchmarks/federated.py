"""Federated training with Byzantine sites: Flower's robust strategies against FedARC, on digits.

Setting: scikit-learn's digits (``benchmarks.common.load_data``: a fixed train/test split), ``N = 10`` sites,
each with a Dirichlet(alpha = 0.5) label-skewed shard of the train split (non-IID). Every round every site
trains the global MLP 64-64-10 locally (:func:`lightning_clip.flower.lightning_client_app`: a Lightning
``Trainer``, SGD, ``LOCAL_STEPS`` steps of batch 32) and replies with its arrays; the server aggregates
and the test accuracy of the global model is measured after every round (Flower's ``evaluate_fn``).

The last ``f`` of the 10 sites are Byzantine, ``f`` in {0, 1, 3}:

* ``SF``: the site sends its update negated (sign flip);
* ``scale``: its update times 1000 (a huge update);
* ``LF``: it trains honestly on flipped labels ``y -> 9 - y`` (label flip, a data-level attack);
* ``ALIE``: "a little is enough", ``mean - z std`` of the honest sites' updates of the round (omniscient).

The vector-level attacks are the simulation layer's (``lightning_clip.sim.ByzantineTransform``, run on the
stacked updates of the round as ``simulate_sends`` does for DDP ranks), applied to the replies on their way to
the server, so every strategy faces the same attack.

Strategies, each told the true ``f`` (``num_malicious_nodes``, ``num_byzantine``): Flower's ``FedAvg``,
``Krum``, ``FedMedian``, ``FedTrimmedAvg`` (trimming ``max(f, 1)`` sites per side), ``Bulyan`` (only where
``n >= 4 f + 3``), and FedARC: ``ARC > NNM > CWTM`` and ``ARC > mean``. The strategies run unchanged through
``strategy.start`` on :class:`~lightning_clip.flower.InProcessGrid`, which calls the ``ClientApp`` of each
site in this process (the runtimes themselves are exercised by the tests).

Usage (from the repository root)::

    python -m benchmarks.federated            # the study, into benchmarks/results/federated.md / .png
    python -m benchmarks.federated --quick    # smoke run to a temporary directory

Needs the extra ``pip install 'lightning-clip[flower]'``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from benchmarks.common import (
    ATTACKS,
    LABEL_FLIP,
    NUM_CLASSES,
    ByzantineSpec,
    ByzantineTransform,
    Data,
    SendBuffers,
    add_output_arguments,
    command_line,
    flower_api,
    honest_shards,
    load_data,
    machine,
    make_model,
    md_table,
    output_dir,
    simulate_sends,
    write_results,
)

NAME = "federated"
N = 10
HET = "a=0.5"
LOCAL_STEPS = 10
BATCH = 32
LR = 0.1
HIDDEN = 64
ATTACK_NAMES = ("SF", "scale", LABEL_FLIP, "ALIE")
BYZANTINE_COUNTS = (1, 3)
STRATEGIES = ("FedAvg", "Krum", "FedMedian", "FedTrimmedAvg", "Bulyan", "ARC > NNM > CWTM", "ARC > mean")
OURS = ("ARC > NNM > CWTM", "ARC > mean")


class DigitsSite(pl.LightningModule):
    """The site's model: ``make_model``'s MLP with plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model(0, HIDDEN)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


@dataclass(frozen=True)
class Scenario:
    """``f`` Byzantine sites (the last ``f`` of ``n``) running ``attack`` (``None`` for no attack)."""

    attack: str | None
    f: int
    n: int = N

    @property
    def label(self) -> str:
        return "no attack" if self.attack is None else f"{self.attack} f={self.f}"

    @property
    def byzantine(self) -> list[int]:
        return list(range(self.n - self.f, self.n))


def make_strategy(name: str, f: int) -> Any | None:
    """The server strategy ``name`` told ``f``; ``None`` where it cannot run (Bulyan needs ``n >= 4 f + 3``)."""
    from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum

    kw: dict[str, Any] = {"fraction_evaluate": 0.0, "min_train_nodes": N, "min_available_nodes": N}
    fl = flower_api()
    if name == "FedAvg":
        return FedAvg(**kw)
    if name == "Krum":
        return Krum(num_malicious_nodes=f, **kw)
    if name == "FedMedian":
        return FedMedian(**kw)
    if name == "FedTrimmedAvg":
        return FedTrimmedAvg(beta=(max(f, 1) + 0.5) / N, **kw)
    if name == "Bulyan":
        return Bulyan(num_malicious_nodes=f, **kw) if 4 * f + 3 <= N else None
    if name == "ARC > NNM > CWTM":
        return fl.FedARC(num_byzantine=f, aggregator="cwtm", nnm=True, arc=True, **kw)
    if name == "ARC > mean":
        return fl.FedARC(num_byzantine=f, aggregator="mean", arc=True, **kw)
    raise ValueError(f"unknown strategy {name!r}")


def flat(record: Any) -> Tensor:
    """The arrays of ``record`` laid end to end (all float32 here)."""
    return torch.cat([torch.from_numpy(record[k].numpy()).reshape(-1) for k in record])


def write_flat(record: Any, vector: Tensor) -> Any:
    """A record like ``record`` holding ``vector``."""
    from flwr.app import Array, ArrayRecord

    out, offset = {}, 0
    for key in record:
        a = record[key].numpy()
        out[key] = Array(vector[offset : offset + a.size].reshape(a.shape).numpy().astype(a.dtype))
        offset += a.size
    return ArrayRecord(out)


def attack_grid(client_app: Any, scenario: Scenario) -> Any:
    """An ``InProcessGrid`` whose Byzantine sites' train replies carry the scenario's vector-level attack."""
    kwargs = ATTACKS[scenario.attack] if scenario.attack is not None else None
    chains = None
    if kwargs is not None and scenario.f > 0:
        spec = ByzantineSpec(ranks=scenario.byzantine, **kwargs)
        chains = [[ByzantineTransform.from_spec(spec)] for _ in range(scenario.n)]

    class AttackGrid(flower_api().InProcessGrid):  # type: ignore[misc, name-defined]
        round = 0

        def deliver(self, messages: list[Any]) -> list[Any]:
            out = super().deliver(messages)
            if chains is None or not messages or messages[0].metadata.message_type != "train":
                return out
            self.round += 1
            order = sorted(range(len(out)), key=lambda i: self.contexts[messages[i].metadata.dst_node_id]
                           .node_config["partition-id"])
            global_arrays = messages[0].content["arrays"]
            g = flat(global_arrays)
            sends = [SendBuffers([flat(out[i].content["arrays"]) - g], [[]]) for i in order]
            attacked = simulate_sends(chains, sends, self.round - 1, lambda x: x.mean(dim=0))
            for row, i in enumerate(order):
                if row in scenario.byzantine:
                    out[i].content["arrays"] = write_flat(global_arrays, g + attacked[row])
            return out

    return AttackGrid(client_app, scenario.n)


def run_one(name: str, scenario: Scenario, rounds: int, seed: int, data: Data,
            shards: list[Tensor]) -> list[float] | None:
    """Test accuracy after each round of ``name`` under ``scenario`` (``None`` if the strategy cannot run)."""
    from flwr.app import ArrayRecord, MetricRecord

    strategy = make_strategy(name, scenario.f)
    if strategy is None:
        return None
    fl = flower_api()
    gens = {site: torch.Generator().manual_seed(seed * 1_000_003 + site * 7_919 + 29) for site in range(N)}
    flip = scenario.attack == LABEL_FLIP

    def data_fn(context: Any) -> tuple[DataLoader, None]:
        site = int(context.node_config["partition-id"])
        x, y = data.train_x[shards[site]], data.train_y[shards[site]]
        if flip and site in scenario.byzantine:
            y = (NUM_CLASSES - 1) - y
        sampler = RandomSampler(range(len(y)), replacement=True, num_samples=LOCAL_STEPS * BATCH,
                                generator=gens[site])
        return DataLoader(TensorDataset(x, y), batch_size=BATCH, sampler=sampler), None

    app = fl.lightning_client_app(lambda context: DigitsSite(), data_fn, steps=LOCAL_STEPS)
    grid = attack_grid(app, scenario)
    model = DigitsSite()
    accs: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            logits = model.net(data.test_x)
        ok = (logits.argmax(dim=1) == data.test_y) & torch.isfinite(logits).all(dim=1)
        acc = float(ok.float().mean())
        if server_round > 0:
            accs.append(acc)
        return MetricRecord({"accuracy": acc})

    torch.manual_seed(seed)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(DigitsSite().state_dict()), num_rounds=rounds,
                   evaluate_fn=evaluate)
    return accs


def scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [Scenario("SF", 1)]
    return [Scenario(None, 0)] + [Scenario(a, f) for a in ATTACK_NAMES for f in BYZANTINE_COUNTS]


def quiet() -> None:
    """Keep the output to the study's own lines (Flower logs every round, Lightning every Trainer)."""
    flower_api()  # Flower sets its logger's level when it is imported
    logging.getLogger("flwr").setLevel(logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available.*")


def plot(curves: dict[tuple[str, str], list[float]], labels: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.6), sharey=True, squeeze=False)
    for ax, label in zip(axes[0], labels):
        for name in STRATEGIES:
            ys = curves.get((name, label))
            if ys is None:
                continue
            ax.plot(range(1, len(ys) + 1), ys, label=name, lw=2.0 if name in OURS else 1.0,
                    ls="-" if name in OURS else "--")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylim(0.0, 1.0)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Digits, {N} sites (Dirichlet {HET}), Byzantine sites last", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser, "3 rounds, sign flip with f=1, three strategies (a smoke run)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args(argv)
    out = output_dir(args.out, args.quick, NAME)
    quiet()
    torch.set_num_threads(1)
    rounds = 3 if args.quick else args.rounds
    names: tuple[str, ...] = ("FedAvg", "Krum", "ARC > NNM > CWTM") if args.quick else STRATEGIES
    seeds = (1,) if args.quick else tuple(range(1, args.seeds + 1))
    data = load_data()
    runs = [(name, sc, seed) for sc in scenarios(args.quick) for name in names for seed in seeds]
    print(f"{len(runs)} runs of {rounds} rounds, {N} sites each", flush=True)
    t0 = time.perf_counter()
    curves: dict[tuple[str, str, int], list[float]] = {}
    for i, (name, sc, seed) in enumerate(runs):
        gc.collect()
        gc.freeze()  # Flower's Bulyan collects garbage for every reply: keep the objects that live on out of it
        shards = honest_shards(data, HET, N, seed)
        accs = run_one(name, sc, rounds, seed, data, shards)
        if accs is not None:
            curves[(name, sc.label, seed)] = accs
            print(f"  {i + 1}/{len(runs)} {name:<18} {sc.label:<12} seed {seed}: final {accs[-1]:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    wall = time.perf_counter() - t0
    labels = [sc.label for sc in scenarios(args.quick)]
    mean_curves = {}
    for name in names:
        for label in labels:
            per_seed = [curves[(name, label, s)] for s in seeds if (name, label, s) in curves]
            if per_seed:
                mean_curves[(name, label)] = [statistics.fmean(v) for v in zip(*per_seed)]

    def cell(name: str, label: str) -> str:
        c = mean_curves.get((name, label))
        return "n/a" if c is None else f"{c[-1]:.3f}"

    table = md_table(["strategy", *labels], [[name, *(cell(name, lab) for lab in labels)] for name in names])
    counts = sorted({sc.f for sc in scenarios(args.quick) if sc.attack is not None})

    def worst(name: str, f: int) -> str:
        # over the attacks with f Byzantine sites that the strategy can run (Bulyan: none at f = 3)
        finals = [c[-1] for (n, lab), c in mean_curves.items() if n == name and lab.endswith(f" f={f}")]
        return f"{min(finals):.3f}" if finals else "n/a"

    worst_table = md_table(["strategy", *(f"worst final accuracy over the attacks, f={f}" for f in counts)],
                           [[name, *(worst(name, f) for f in counts)] for name in names])
    print(table)
    md = "\n".join([
        "# Federated training with Byzantine sites: Flower's strategies and FedARC",
        "",
        f"Digits, {N} sites with Dirichlet({HET[2:]}) label-skewed shards, MLP 64-{HIDDEN}-10, {rounds} rounds of "
        f"{LOCAL_STEPS} local SGD steps (batch {BATCH}, lr {LR}) per site through `lightning_client_app`; the last "
        f"f sites are Byzantine. Every strategy is told the true f. Seeds {list(seeds)}.",
        "",
        "Final test accuracy of the global model (mean over seeds). SF: sign-flipped update; scale: update x 1000; "
        "LF: trained on flipped labels; ALIE: mean - z std of the honest updates. FedTrimmedAvg trims max(f, 1) "
        "sites per side; Bulyan needs n >= 4 f + 3 (n/a otherwise).",
        "",
        table,
        "",
        worst_table,
        "",
        f"Command: `{command_line(NAME, argv)}`",
        "",
        f"Machine: {machine()}",
        "",
        f"Wall time: {wall:.0f} s ({len(curves)} runs)",
    ])
    write_results(os.path.join(out, f"{NAME}.md"), md)
    plot(mean_curves, [lab for lab in labels if lab.endswith(f"f={max(sc.f for sc in scenarios(args.quick))}")],
         os.path.join(out, f"{NAME}.png"))
    print(f"wrote {out}/{NAME}.md and {NAME}.png")


if __name__ == "__main__":
    main()
