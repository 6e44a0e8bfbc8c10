"""Federated training across sites with Flower: the robust pipeline as a server strategy, a Lightning client.

Needs the optional extra ``pip install 'lightning-clip[flower]'`` (Flower's message API, ``flwr >= 1.40``).

* :class:`FedARC`: Flower's ``FedAvg`` whose aggregation of the sites' updates is the library's one pipeline
  ``rule(NNM(bucket(clip(ARC(x)))))``, configured by the same :class:`~lightning_clip.robust.options.ARCConfig`
  as the ``ddp_arc`` strategy; with ``secure_aggregation=`` Flower's SecAgg+ on the mean path.
* :func:`lightning_client_app`: Flower's ``ClientApp`` that trains a LightningModule locally on each site.
* :func:`differential_privacy`: Flower's own central-DP wrappers around a :class:`FedARC`, epsilon from the
  library's accountant.
* :class:`InProcessGrid`: a Grid that calls a ``ClientApp`` in this process (debugging and studies).
"""

from __future__ import annotations

#: How to install what this package needs.
FLOWER_EXTRA_HINT = "pip install 'lightning-clip[flower]'  (Flower >= 1.40, Python >= 3.11)"

try:
    from flwr.serverapp.strategy import FedAvg as _FedAvg  # noqa: F401  (the message API this package builds on)
except ImportError as err:
    raise ImportError(f"lightning_clip.flower needs Flower's message API: {FLOWER_EXTRA_HINT}") from err

from lightning_clip.flower.client import SiteContext, UpdateTransform, lightning_client_app  # noqa: E402
from lightning_clip.flower.grid import InProcessGrid  # noqa: E402
from lightning_clip.flower.privacy import differential_privacy  # noqa: E402
from lightning_clip.flower.strategy import FedARC  # noqa: E402

__all__ = [
    "FLOWER_EXTRA_HINT",
    "FedARC",
    "InProcessGrid",
    "SiteContext",
    "UpdateTransform",
    "differential_privacy",
    "lightning_client_app",
]
