"""Federated training with Flower: 10 sites train the digits MLP with Lightning, one site attacks, FedARC holds.

Each site holds a label-skewed (Dirichlet 0.5) shard of scikit-learn's digits and trains the global model for
20 local steps per round with the library's guard and clipping callbacks. The last site is Byzantine and sends
its update sign-flipped (the simulation layer's attack, passed to the client helper as an update transform).
The server is FedARC: ARC > NNM > CWTM with ``num_byzantine=1``. The run uses Flower's simulation engine (Ray);
``--in-process`` calls every site in this process instead (no Ray).

    pip install 'lightning-clip[flower,cli]'          # Flower, and scikit-learn for the digits
    python examples/flower_digits.py                 # Flower's simulation engine, 10 sites, 10 rounds
    python examples/flower_digits.py --in-process --rounds 3
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import GradientClipping, NonFiniteGradientGuard
from lightning_clip.flower import FedARC, InProcessGrid, SiteContext, lightning_client_app
from lightning_clip.sim import ByzantineSpec
from lightning_clip.sim.data import load_digits_tensors
from lightning_clip.sim.partition import dirichlet_split
from lightning_clip.tools.demo import DigitsClassifier

SITES = 10
X, Y = load_digits_tensors()
TEST = torch.arange(len(Y)) % 5 == 0  # every fifth sample is held out for the server's test
SHARDS = dirichlet_split(Y[~TEST], SITES, alpha=0.5, seed=0)
ATTACK = ByzantineSpec(ranks=[SITES - 1], attack="sign_flip")


def module_fn(context: Context) -> DigitsClassifier:
    return DigitsClassifier(lr=0.1)


def data_fn(context: Context) -> tuple[DataLoader, DataLoader]:
    site = int(context.node_config["partition-id"])
    x, y = X[~TEST][SHARDS[site]], Y[~TEST][SHARDS[site]]
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    return loader, DataLoader(TensorDataset(x, y), batch_size=256)


def attack(update: torch.Tensor, site: SiteContext) -> torch.Tensor:
    """The Byzantine site sends the simulation layer's sign-flip of its update; the others send theirs."""
    return ATTACK.apply(update) if ATTACK.is_byzantine(site.site) else update


client_app = lightning_client_app(
    module_fn, data_fn, steps=20, update_transform=attack,
    callbacks_fn=lambda ctx: [NonFiniteGradientGuard(action="skip"), GradientClipping(threshold=5.0)])


def accuracy(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = DigitsClassifier()
    model.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        acc = float((model(X[TEST]).argmax(dim=1) == Y[TEST]).float().mean())
    print(f"round {server_round}: test accuracy {acc:.3f}", flush=True)
    return MetricRecord({"accuracy": acc})


def server_app(rounds: int) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedARC(num_byzantine=1, aggregator="cwtm", nnm=True, min_train_nodes=SITES,
                          min_available_nodes=SITES, fraction_evaluate=0.0)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(DigitsClassifier().state_dict()), num_rounds=rounds,
                       evaluate_fn=accuracy)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--in-process", action="store_true", help="call the sites in this process (no Ray)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the global model's initial weights")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    if args.in_process:
        strategy = FedARC(num_byzantine=1, aggregator="cwtm", nnm=True, min_train_nodes=SITES,
                          min_available_nodes=SITES, fraction_evaluate=0.0)
        strategy.start(grid=InProcessGrid(client_app, SITES),
                       initial_arrays=ArrayRecord(DigitsClassifier().state_dict()), num_rounds=args.rounds,
                       evaluate_fn=accuracy)
        return
    from flwr.simulation import run_simulation

    run_simulation(server_app=server_app(args.rounds), client_app=client_app, num_supernodes=SITES,
                   backend_config={"client_resources": {"num_cpus": 1}})


if __name__ == "__main__":
    main()
