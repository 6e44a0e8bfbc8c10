"""ARCConfig, the one options object: validation, what it builds, and the documentation and YAML that must list
exactly its fields."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_clip.robust import pipeline
from lightning_clip.robust.options import PIPELINE_FIELDS, ARCConfig
from lightning_clip.robust.pipeline import aggregate
from lightning_clip.robust.rules import RULES, CenteredClipping
from lightning_clip.robust.transforms import WorkerMomentum

ROOT = Path(__file__).resolve().parents[2]


def test_config_validates_once_and_builds_the_chain_and_pipeline():
    assert ARCConfig().send_chain() == []
    chain = ARCConfig(worker_momentum=0.9).send_chain(["extra"])  # type: ignore[list-item]
    assert isinstance(chain[0], WorkerMomentum) and chain[0].beta == 0.9 and chain[1] == "extra"
    with pytest.raises(dataclasses.FrozenInstanceError):
        ARCConfig().num_byzantine = 2  # type: ignore[misc]
    config = ARCConfig(num_byzantine=1, aggregator="median", nnm=True, static_clip=3)
    assert config.static_clip == 3.0 and not config.uses_all_reduce and ARCConfig().uses_all_reduce
    x = torch.randn(5, 3)
    expected = aggregate(x, "median", 1, nnm=True, arc=True, static_clip=3.0)
    assert torch.equal(pipeline.server_aggregation(config)(x), expected)
    with pytest.raises(ValueError, match=r"world size 2"):
        ARCConfig(num_byzantine=1).check_world_size(2)




def test_robust_comm_bucketing_and_rule_settings_are_validated():
    assert ARCConfig().robust_comm == "sharded"
    with pytest.raises(ValueError, match=r"`robust_comm` to be one of 'sharded', 'gather' but got 'ring'"):
        ARCConfig(robust_comm="ring")
    with pytest.raises(TypeError, match=r"`robust_comm` to be a string"):
        ARCConfig(robust_comm=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`bucket_size`"):
        ARCConfig(bucket_size=0)
    with pytest.raises(ValueError, match=r"`cclip_tau`"):
        ARCConfig(aggregator="cclip", cclip_tau=0.0)
    with pytest.raises(ValueError, match=r"`bucket_size` to leave more than 2 \* num_byzantine = 2 buckets "
                                         r"\(num_byzantine=1\) of 4"):
        ARCConfig(aggregator="cwtm", bucket_size=2).check_world_size(4)
    ARCConfig(aggregator="cwtm", bucket_size=2).check_world_size(5)


def test_the_rule_object_takes_its_settings_from_the_config():
    assert ARCConfig(aggregator="cwtm").rule is RULES["cwtm"]
    assert ARCConfig(aggregator="cclip", cclip_tau=0.5, cclip_iters=3).rule == CenteredClipping(tau=0.5, iters=3)
    for rule in RULES.values():  # every setting a rule reads is a pipeline field of the config
        assert set(rule.option_fields.values()) <= set(PIPELINE_FIELDS)


def test_aggregate_takes_the_pipeline_fields_and_nothing_else():
    x = torch.randn(5, 3)
    kwargs = {"bucket_size": 2, "bucket_seed": 3, "cclip_tau": 0.5, "cclip_iters": 2}
    assert set(kwargs) | {"aggregator", "num_byzantine", "nnm", "arc", "static_clip"} == set(PIPELINE_FIELDS)
    config = ARCConfig(aggregator="cclip", num_byzantine=1, arc=False, **kwargs)
    assert torch.equal(aggregate(x, "cclip", 1, **kwargs), pipeline.server_aggregation(config)(x))
    with pytest.raises(TypeError, match=r"`dp_seed`: the pipeline's settings are aggregator, num_byzantine"):
        aggregate(x, "mean", 1, dp_seed=3)
    with pytest.raises(ValueError, match=r"`bucket_seed`"):
        aggregate(x, "mean", 1, bucket_seed=-1)


# ---------------------------------------------------------------------------------------------------
# The ddp_arc guide's options table and configs/arc_ddp.yaml list exactly the fields (tests/docs holds that table
# to ARCDDPStrategy's signature and defaults; this holds it to ARCConfig's fields)


def _guide_strategy_rows() -> set[str]:
    lines = (ROOT / "docs" / "guides" / "ddp-arc.md").read_text().splitlines()
    start = lines.index("<!-- checked: options lightning_clip.ARCDDPStrategy -->") + 3  # the marker, header, rule
    names: set[str] = set()
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        names |= set(re.findall(r"`(\*{0,2}\w+)`", line.split("|")[1]))
    return names


def test_the_ddp_arc_guides_options_table_lists_every_field_and_nothing_else():
    fields = set(ARCConfig.field_names())
    own = {"arc_config", "send_transforms", "log_arc", "**kwargs"}
    assert _guide_strategy_rows() == fields | own


def test_arc_ddp_yaml_spells_out_every_field_at_its_default():
    config = yaml.safe_load((ROOT / "configs" / "arc_ddp.yaml").read_text())
    init_args = config["trainer"]["strategy"]["init_args"]
    settings = {k: v for k, v in init_args.items() if k in ARCConfig.field_names()}
    assert set(settings) == set(ARCConfig.field_names())
    for field in dataclasses.fields(ARCConfig):
        assert settings[field.name] == field.default, field.name
    assert set(init_args) - set(settings) <= {"send_transforms", "log_arc", "process_group_backend"}


def test_from_keywords_takes_the_fields_out_of_the_keywords_or_the_object_whole():
    keywords = {"num_byzantine": 2, "aggregator": "cwtm", "fraction_train": 0.5}
    config = ARCConfig.from_keywords("Owner", None, keywords)
    assert config == ARCConfig(num_byzantine=2, aggregator="cwtm") and keywords == {"fraction_train": 0.5}
    whole = ARCConfig(nnm=True)
    assert ARCConfig.from_keywords("Owner", whole, {"other": 1}) is whole
    with pytest.raises(ValueError, match="Give Owner either `arc_config` or .*nnm.*not both"):
        ARCConfig.from_keywords("Owner", whole, {"nnm": False})
    with pytest.raises(TypeError, match="arc_config"):
        ARCConfig.from_keywords("Owner", {"nnm": True}, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aggregator"):
        ARCConfig.from_keywords("Owner", None, {"aggregator": "krumm"})


def test_signature_with_fields_lists_every_field_with_its_default_and_type():
    def init(self, *, own: int = 3, **kwargs) -> None: ...

    params = ARCConfig.signature_with_fields(init).parameters
    assert list(params)[: len(ARCConfig.field_names()) + 1] == ["self", *ARCConfig.field_names()]
    for field in dataclasses.fields(ARCConfig):
        assert params[field.name].default == field.default and params[field.name].kind.name == "KEYWORD_ONLY"
    assert list(params)[-2:] == ["own", "kwargs"]


@pytest.mark.parametrize("name", ["bucket_seed", "dp_seed"])
def test_seeds_outside_32_bits_are_refused_at_construction(name):
    with pytest.raises(ValueError, match=rf"`{name}` to be an integer in \[0, 2\*\*32\) but got {2**70}"):
        ARCConfig(**{name: 2**70})


@pytest.mark.parametrize(("settings", "named", "why"), [
    ({"cclip_tau": 2.0}, "cclip_tau=2.0", "aggregator='mean' is not 'cclip'"),
    ({"aggregator": "cwtm", "cclip_iters": 3}, "cclip_iters=3", "aggregator='cwtm' is not 'cclip'"),
    ({"bucket_seed": 7}, "bucket_seed=7", "bucket_size=1"),
    ({"dp_delta": 1e-6}, "dp_delta=1e-06", "dp_noise_multiplier=0"),
    ({"dp_sampling_rate": 0.5}, "dp_sampling_rate=0.5", "dp_noise_multiplier=0"),
    ({"dp_accountant": "rdp"}, "dp_accountant='rdp'", "dp_noise_multiplier=0"),
    ({"dp_clipped_count_stddev": 0.3}, "dp_clipped_count_stddev=0.3", "no adaptive bound"),
    ({"dp_seed": 3}, "dp_seed=3", "no adaptive bound"),
    ({"dp_clip_learning_rate": 0.5}, "dp_clip_learning_rate=0.5", "dp_clip_quantile=None"),
])
def test_a_setting_that_has_no_effect_warns_naming_it(settings, named, why):
    with pytest.warns(UserWarning, match=rf"ARCConfig: `{re.escape(named)}` has no effect: .*{re.escape(why)}"):
        ARCConfig(**settings)


def test_settings_that_take_effect_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ARCConfig(aggregator="cclip", cclip_tau=2.0, cclip_iters=2, bucket_size=2, bucket_seed=7, num_byzantine=0)
        ARCConfig(static_clip=1.0, dp_clip_quantile=0.5, dp_clip_learning_rate=0.5, dp_seed=3,
                  dp_clipped_count_stddev=0.3)
        ARCConfig(arc=False, static_clip=1.0, dp_noise_multiplier=1.0, dp_delta=1e-6, dp_sampling_rate=0.5,
                  dp_accountant="rdp", dp_seed=3)


def test_dp_accountant_is_checked_and_reaches_the_strategys_epsilon():
    from lightning_clip import ARCDDPStrategy
    from lightning_clip.robust import privacy

    with pytest.raises(ValueError, match=r"`dp_accountant` to be one of 'pld', 'rdp' but got 'prv'"):
        ARCConfig(static_clip=1.0, dp_noise_multiplier=1.0, arc=False, dp_accountant="prv")
    for accountant in ("pld", "rdp"):
        strategy = ARCDDPStrategy(arc=False, static_clip=1.0, dp_noise_multiplier=1.0, dp_accountant=accountant)
        assert strategy.dp_epsilon(100) == privacy.epsilon(1.0, 1.0, 100, 1e-5, accountant)
    assert ARCDDPStrategy(arc=False, static_clip=1.0, dp_noise_multiplier=1.0).dp_epsilon(100) < \
        ARCDDPStrategy(arc=False, static_clip=1.0, dp_noise_multiplier=1.0, dp_accountant="rdp").dp_epsilon(100)
