"""The Lightning ClientApp helper: a site's reply is what the same Lightning training gives, with the library's
callbacks in force; client-side clipping; simulated sites through an update transform built from the
simulation layer's attacks; Flower's legacy layout under secure aggregation; bad arguments."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr.serverapp")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.common import FitIns, parameters_to_ndarrays  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402

from lightning_clip import GradientClipping, NonFiniteGradientGuard  # noqa: E402
from lightning_clip.flower import SiteContext, lightning_client_app  # noqa: E402
from lightning_clip.flower.client import SECURE_WEIGHT_KEY  # noqa: E402
from lightning_clip.flower.grid import ensure_task_identity  # noqa: E402
from lightning_clip.flower.records import Layout  # noqa: E402
from lightning_clip.sim import ByzantineSpec  # noqa: E402
from tests.helpers.flower import SiteRegressor, initial_arrays, site_data, site_module  # noqa: E402

STEPS = 3


def _context(site: int = 1) -> Context:
    return Context(run_id=1, node_id=500 + site, node_config={"partition-id": site, "num-partitions": 4},
                   state=RecordDict(), run_config={})


def _train_message(config: dict | None = None, arrays: ArrayRecord | None = None) -> Message:
    ensure_task_identity()
    content = RecordDict({"arrays": arrays or initial_arrays(),
                          "config": ConfigRecord({"server-round": 2, **(config or {})})})
    return Message(content, dst_node_id=501, message_type=MessageType.TRAIN)


def _reference_update(callbacks=(), module: pl.LightningModule | None = None) -> torch.Tensor:
    """The same local training, run directly with Lightning."""
    module = module or site_module(_context())
    module.load_state_dict(initial_arrays().to_torch_state_dict())
    train, _ = site_data(_context())
    pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, max_epochs=-1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks)).fit(module, train)
    layout = Layout(initial_arrays())
    return layout.flatten(ArrayRecord(module.state_dict())) - layout.global_flat


def _update(reply: Message) -> torch.Tensor:
    layout = Layout(initial_arrays())
    return layout.flatten(reply.content["arrays"]) - layout.global_flat


def test_a_site_replies_with_its_lightning_training_and_metrics():
    reply = lightning_client_app(site_module, site_data, steps=STEPS)(_train_message(), _context())
    assert torch.equal(_update(reply), _reference_update())
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 32 and np.isfinite(metrics["train_loss"])


def test_the_librarys_callbacks_act_on_the_local_training():
    clip = lightning_client_app(site_module, site_data, steps=STEPS,
                                callbacks_fn=lambda ctx: [GradientClipping(threshold=0.01)])
    clipped = _update(clip(_train_message(), _context()))
    assert torch.equal(clipped, _reference_update([GradientClipping(threshold=0.01)]))
    free = _reference_update()
    # SGD: three steps of gradients clipped to norm 0.01 move the weights by at most 3 * lr * 0.01
    assert float(clipped.norm()) <= STEPS * 0.05 * 0.01 * (1 + 1e-5) < float(free.norm())

    def nan_module(ctx):
        torch.manual_seed(0)
        return SiteRegressor(lr=0.05, nan_at={1})

    guarded = lightning_client_app(nan_module, site_data, steps=STEPS,
                                   callbacks_fn=lambda ctx: [NonFiniteGradientGuard(action="skip")])
    assert bool(torch.isfinite(_update(guarded(_train_message(), _context()))).all())
    unguarded = lightning_client_app(nan_module, site_data, steps=STEPS)
    assert not bool(torch.isfinite(_update(unguarded(_train_message(), _context()))).all())


def test_the_site_clips_its_update_when_the_round_asks_for_it():
    reference = _reference_update()
    bound = 0.25 * float(reference.norm())
    app = lightning_client_app(site_module, site_data, steps=STEPS)
    update = _update(app(_train_message({"clipping_norm": bound}), _context()))
    # torch's clip_grad_norm_ factor on the update as one vector
    expected = reference * min(1.0, bound / (float(reference.norm()) + 1e-6))
    assert torch.allclose(update, expected, rtol=1e-5, atol=1e-7)
    assert float(update.norm()) == pytest.approx(bound, rel=1e-5)
    loose = _update(app(_train_message({"clipping_norm": 10 * float(reference.norm())}), _context()))
    assert torch.equal(loose, reference)


def _byzantine(spec: ByzantineSpec):
    """The composition a test or a study makes: the simulation layer's attack on the sites the spec marks."""

    def transform(update: torch.Tensor, site: SiteContext) -> torch.Tensor:
        return spec.apply(update) if spec.is_byzantine(site.site) else update

    return transform


@pytest.mark.parametrize(("spec", "expected"), [
    (ByzantineSpec(ranks=[1], attack="sign_flip"), lambda u: -u),
    (ByzantineSpec(ranks=[1], attack="scale", factor=-50.0), lambda u: -50.0 * u),
    (ByzantineSpec(ranks=[1], attack="nan"), lambda u: torch.full_like(u, float("nan"))),
    # the baseline that clips only the sites marked adversarial, at 2.0
    (ByzantineSpec(ranks=[1], attack="scale", factor=1e4, fixed_clip=2.0),
     lambda u: 1e4 * u * min(1.0, 2.0 / (float((1e4 * u).norm()) + 1e-6))),
])
def test_simulated_sites_send_the_simulation_layers_attack(spec, expected):
    reference = _reference_update()
    app = lightning_client_app(site_module, site_data, steps=STEPS, update_transform=_byzantine(spec))
    sent = _update(app(_train_message(), _context(site=1)))
    torch.testing.assert_close(sent, expected(reference).to(sent.dtype), equal_nan=True, rtol=1e-5, atol=1e-6)
    honest = _update(app(_train_message(), _context(site=2)))
    assert torch.equal(honest, _update(lightning_client_app(site_module, site_data, steps=STEPS)(
        _train_message(), _context(site=2))))


def test_the_transform_sees_the_site_and_the_round():
    seen = []

    def record(update, site):
        seen.append(site)
        return update

    lightning_client_app(site_module, site_data, steps=1, update_transform=record)(_train_message(), _context(3))
    assert seen == [SiteContext(site=3, server_round=2, node_id=503)]


def test_under_secure_aggregation_the_site_replies_in_flowers_legacy_layout_with_its_clipped_update():
    ensure_task_identity()
    reference = _reference_update()
    bound = 0.5 * float(reference.norm())
    fitins = FitIns(compat.arrayrecord_to_parameters(initial_arrays(), keep_input=True),
                    {"server-round": 1, "clipping_norm": bound, SECURE_WEIGHT_KEY: 1000})
    msg = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=501,
                  message_type=MessageType.TRAIN)
    reply = lightning_client_app(site_module, site_data, steps=STEPS)(msg, _context())
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert fitres.num_examples == 1000 and fitres.metrics["num-examples"] == 32
    sent = torch.cat([torch.from_numpy(a).reshape(-1) for a in parameters_to_ndarrays(fitres.parameters)])
    assert torch.allclose(sent, reference * (bound / (float(reference.norm()) + 1e-6)), rtol=1e-5, atol=1e-7)


def test_evaluation_validates_the_global_arrays_on_the_sites_data():
    ensure_task_identity()
    msg = Message(RecordDict({"arrays": initial_arrays(), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=501, message_type=MessageType.EVALUATE)
    metrics = lightning_client_app(site_module, site_data, steps=1)(msg, _context()).content["metrics"]
    module = site_module(_context())
    module.load_state_dict(initial_arrays().to_torch_state_dict())
    _, val = site_data(_context())
    with torch.no_grad():
        losses = [torch.nn.functional.mse_loss(module.net(x), y) for x, y in val]
    assert metrics["num-examples"] == 16
    assert metrics["val_loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({}, ValueError, "exactly one of `epochs` and `steps`"),
    ({"epochs": 1, "steps": 2}, ValueError, "exactly one"),
    ({"steps": 0}, ValueError, "steps"),
    ({"steps": 1, "trainer_kwargs": {"max_steps": 5}}, ValueError, "max_steps"),
    ({"steps": 1, "update_transform": 3}, TypeError, "update_transform"),
    ({"steps": 1, "callbacks_fn": [GradientClipping(threshold=1.0)]}, TypeError, "callbacks_fn"),
])
def test_bad_arguments_fail_when_the_app_is_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        lightning_client_app(site_module, site_data, **kwargs)


def test_local_epochs_run_whole_passes_over_the_sites_data():
    app = lightning_client_app(site_module, site_data, epochs=2)
    update = _update(app(_train_message(), _context()))
    module = site_module(_context())
    module.load_state_dict(initial_arrays().to_torch_state_dict())
    train, _ = site_data(_context())
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train)
    assert trainer.global_step == 2 * len(train) == 8
    layout = Layout(initial_arrays())
    assert torch.equal(update, layout.flatten(ArrayRecord(module.state_dict())) - layout.global_flat)


def test_a_gradient_ascent_site_is_a_module_factory_choice():
    # data-level attacks live in the site's own factories: here the Byzantine site ascends its loss
    class Ascent(SiteRegressor):
        def training_step(self, batch, batch_idx):
            return -super().training_step(batch, batch_idx)

    def module_fn(ctx):
        torch.manual_seed(0)
        return Ascent(lr=0.05) if ctx.node_config["partition-id"] == 1 else SiteRegressor(lr=0.05)

    app = lightning_client_app(module_fn, site_data, steps=1)
    ascent = _update(app(_train_message(), _context(site=1)))
    honest = _update(lightning_client_app(site_module, site_data, steps=1)(_train_message(), _context(site=1)))
    assert torch.allclose(ascent, -honest, rtol=1e-5, atol=1e-7) and float(honest.norm()) > 0
