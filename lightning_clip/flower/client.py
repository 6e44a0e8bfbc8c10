"""A Flower ``ClientApp`` that trains a LightningModule on each site: :func:`lightning_client_app`.

On a train message the site loads the global arrays into a fresh module (``module_fn``), trains it on its own
data (``data_fn``) for the configured epochs or steps with the given callbacks (the library's clipping, guards
and monitor work as in any ``Trainer``), and replies with its arrays and metrics: ``num-examples`` (the size of
its training set, FedAvg's weight) and every scalar the module or the callbacks logged (``train_loss``,
``grad_norm/total``, ...). On an evaluate message it validates the global arrays on its validation data.

Client-side clipping: when the round's config holds ``clipping_norm`` (set by FedARC with secure aggregation and
by Flower's client-side DP wrapper), the site clips its update ``w - g`` to that L2 norm
(``min(1, C / (||u|| + 1e-6))``, the factor of ``torch.nn.utils.clip_grad_norm_``) before replying.

Secure aggregation: with Flower's ``secaggplus_mod`` in ``mods`` the train messages come in Flower's legacy
layout (``fitins.*``); the site then replies with its clipped *update* and the weight the server asked for, so
that SecAgg+ reveals the plain mean of the updates.

Simulated sites: ``update_transform(update, site) -> update`` replaces what a site sends (e.g. an attack of
:mod:`lightning_clip.sim` for the sites marked Byzantine); it runs after the clipping, like a site that ignores
the protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from torch import Tensor

from lightning_clip.core.functional import clip_coefficient
from lightning_clip.exceptions import check_optional_positive_int
from lightning_clip.flower.records import SECURE_WEIGHT_KEY, Layout

__all__ = ["SECURE_WEIGHT_KEY", "SiteContext", "UpdateTransform", "lightning_client_app"]

#: The legacy layout of a train message (what ``secaggplus_mod`` passes on).
_LEGACY_PARAMETERS = "fitins.parameters"

#: The Lightning ``Trainer`` arguments the helper sets itself.
_OWN_TRAINER_ARGS = ("max_epochs", "max_steps", "callbacks")


@dataclass(frozen=True)
class SiteContext:
    """Where an update transform runs.

    Attributes:
        site: The site's ``partition-id`` from its node config, else its node id.
        server_round: The round (from 1).
        node_id: The node id Flower gave the site.
    """

    site: int
    server_round: int
    node_id: int


class UpdateTransform(Protocol):
    """Replaces what a site sends: ``transform(update [d], site) -> update [d]`` (same shape and dtype)."""

    def __call__(self, update: Tensor, site: SiteContext) -> Tensor: ...


def _site(context: Context) -> int:
    value = context.node_config.get("partition-id")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else int(context.node_id)


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    out = {}
    for name, value in trainer.callback_metrics.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            out[name] = float(value)
    return out


def _num_examples(loader: Any) -> int:
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return 1


def lightning_client_app(
    module_fn: Callable[[Context], pl.LightningModule],
    data_fn: Callable[[Context], tuple[Any, Any]],
    *,
    epochs: int | None = None,
    steps: int | None = None,
    callbacks_fn: Callable[[Context], Sequence[pl.Callback]] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    update_transform: UpdateTransform | None = None,
    mods: Sequence[Any] = (),
) -> ClientApp:
    """Flower's ``ClientApp`` training ``module_fn(context)`` on ``data_fn(context)`` with Lightning on each site.

    Example::

        app = lightning_client_app(lambda ctx: DigitsClassifier(), lambda ctx: loaders(ctx.node_config["partition-id"]),
                                   steps=20, callbacks_fn=lambda ctx: [GradientClipping(threshold=1.0)])

    Args:
        module_fn: Builds a fresh LightningModule; the global arrays are loaded into its ``state_dict`` by key.
        data_fn: Returns ``(train_loader, val_loader)`` of the site (``val_loader`` may be ``None`` when the
            site does not evaluate).
        epochs: Local epochs per round; give ``epochs`` or ``steps``, not both.
        steps: Local optimizer steps per round.
        callbacks_fn: Builds the Trainer's callbacks for each round (e.g. ``GradientClipping``,
            ``NonFiniteGradientGuard``, ``GradientNormMonitor``).
        trainer_kwargs: Other ``lightning.pytorch.Trainer`` arguments (the defaults: CPU, one device, no logger,
            no checkpoints, no progress bar).
        update_transform: Replaces the update a site sends (simulated misbehaving sites), after clipping.
        mods: Flower client mods (e.g. ``secaggplus_mod``), outermost first.

    Raises:
        ValueError: Unless exactly one of ``epochs`` and ``steps`` is a positive integer, or when
            ``trainer_kwargs`` sets what the helper sets itself.
    """
    epochs = check_optional_positive_int("epochs", epochs)
    steps = check_optional_positive_int("steps", steps)
    if (epochs is None) == (steps is None):
        raise ValueError("Give exactly one of `epochs` and `steps` (local training per round) but got "
                         f"epochs={epochs}, steps={steps}")
    for name, fn in (("module_fn", module_fn), ("data_fn", data_fn)):
        if not callable(fn):
            raise TypeError(f"Expected argument `{name}` to be a callable taking the Flower Context but got {fn!r}")
    if callbacks_fn is not None and not callable(callbacks_fn):
        raise TypeError(f"Expected argument `callbacks_fn` to be a callable or None but got {callbacks_fn!r}")
    if update_transform is not None and not callable(update_transform):
        raise TypeError(f"Expected argument `update_transform` to be a callable or None but got {update_transform!r}")
    extra = dict(trainer_kwargs or {})
    clash = sorted(set(extra) & set(_OWN_TRAINER_ARGS))
    if clash:
        raise ValueError(f"`trainer_kwargs` may not set {', '.join(clash)}: give `epochs`/`steps` and `callbacks_fn`")
    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False}

    def trainer(context: Context, **limits: Any) -> pl.Trainer:
        callbacks = list(callbacks_fn(context)) if callbacks_fn is not None else []
        return pl.Trainer(**{**defaults, **extra, **limits}, callbacks=callbacks)

    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        legacy = _LEGACY_PARAMETERS in msg.content.array_records
        if legacy:
            fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
            config: Mapping[str, Any] = dict(fitins.config)
            module = module_fn(context)
            names = list(module.state_dict().keys())
            global_arrays = ArrayRecord(dict(zip(names, [Array(np.asarray(a)) for a in
                                                         parameters_to_ndarrays(fitins.parameters)])))
        else:
            global_arrays = _only(msg.content.array_records, "ArrayRecord")
            config = _config(msg.content.config_records)
            module = module_fn(context)
        module.load_state_dict(global_arrays.to_torch_state_dict())
        train_loader, _ = data_fn(context)
        limits = {"max_epochs": epochs} if epochs is not None else {"max_steps": steps, "max_epochs": -1}
        fit = trainer(context, **limits)
        fit.fit(module, train_dataloaders=train_loader)
        layout = Layout(global_arrays)
        local = ArrayRecord(module.state_dict())
        update = layout.flatten(local) - layout.global_flat
        bound = config.get(KEY_CLIPPING_NORM)
        if bound is not None:
            update = update * clip_coefficient(float(bound), torch.linalg.vector_norm(update))
        site = SiteContext(_site(context), int(config.get("server-round", 0)), int(context.node_id))
        if update_transform is not None:
            update = update_transform(update, site)
        metrics: dict[str, Any] = {"num-examples": _num_examples(train_loader), **_metrics(fit)}
        if legacy:  # secure aggregation: the update itself, and the weight every site reports
            delta = layout.record(update)
            ndarrays = [delta[key].numpy() if key in layout.keys else np.zeros_like(global_arrays[key].numpy())
                        for key in global_arrays]
            weight = int(config.get(SECURE_WEIGHT_KEY, 1))
            fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(ndarrays), weight, metrics)
            return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
        content = RecordDict({"arrays": layout.record(layout.global_flat + update), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        global_arrays = _only(msg.content.array_records, "ArrayRecord")
        module = module_fn(context)
        module.load_state_dict(global_arrays.to_torch_state_dict())
        _, val_loader = data_fn(context)
        if val_loader is None:
            raise ValueError("This site has no validation data (data_fn returned val_loader=None); set "
                             "fraction_evaluate=0.0 on the server")
        check = trainer(context)
        check.validate(module, dataloaders=val_loader, verbose=False)
        metrics: dict[str, Any] = {"num-examples": _num_examples(val_loader), **_metrics(check)}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _only(records: Mapping[str, Any], kind: str) -> Any:
    if len(records) != 1:
        raise ValueError(f"Expected one {kind} in the message but got {len(records)}: {list(records)}")
    return next(iter(records.values()))


def _config(records: Mapping[str, ConfigRecord]) -> Mapping[str, Any]:
    if "config" in records:
        return records["config"]
    return _only(records, "ConfigRecord") if records else {}
