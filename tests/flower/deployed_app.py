"""The Flower App the deployment test runs on a SuperLink and SuperNodes: FedARC (ARC > NNM > CWTM) on the
tiny regression sites, with site 2 sending NaN. The ServerApp writes the result to ``out-dir`` (run config)."""

from __future__ import annotations

import json
import os

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from lightning_clip.flower import FedARC, SiteContext, lightning_client_app
from tests.helpers.flower import initial_arrays, site_data, site_module

NAN_SITE = 2


def _nan_site(update: torch.Tensor, site: SiteContext) -> torch.Tensor:
    return torch.full_like(update, float("nan")) if site.site == NAN_SITE else update


client_app = lightning_client_app(site_module, site_data, steps=2, update_transform=_nan_site)
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    sites = int(context.run_config["num-sites"])
    # training only: each message starts a ClientApp process; evaluation in Flower's runtime is tested in the
    # simulation engine
    strategy = FedARC(num_byzantine=1, aggregator="cwtm", nnm=True, min_train_nodes=sites,
                      min_available_nodes=sites, fraction_evaluate=0.0)
    start = initial_arrays()
    result = strategy.start(grid=grid, initial_arrays=start, num_rounds=int(context.run_config["num-server-rounds"]),
                            timeout=240)
    flat = torch.cat([torch.from_numpy(result.arrays[k].numpy()).reshape(-1) for k in result.arrays])
    start_flat = torch.cat([torch.from_numpy(start[k].numpy()).reshape(-1) for k in start])
    summary = {
        "finite": bool(torch.isfinite(flat).all()),
        "moved": float((flat - start_flat).norm()),
        "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "node_ids": strategy.last_node_ids,
        "pid": os.getpid(),
    }
    with open(os.path.join(str(context.run_config["out-dir"]), "result.json"), "w") as fh:
        json.dump(summary, fh)
