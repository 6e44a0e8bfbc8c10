"""Every tag kind is written and read back by lightning_clip.tags alone, for awkward parameter names too."""

from __future__ import annotations

import re

import pytest

from lightning_clip import tags

# Parameter names that look like suffixes or tag paths: the reader must not be fooled.
AWKWARD_NAMES = ["net.0.weight", "scale_opt2", "encoder_opt1.weight", "block/attn/q_proj.weight", "a/b_opt3",
                 "totalizer", "_opt", "w_opt12_opt3"]
STEP_TAGS = ["grad_norm/total", "grad_norm/clipped_total", "grad_clip/threshold", "grad_clip/clip_rate",
             "grad_nonfinite/skipped", "grad_spike/skipped", "grad_spike/zscore"]


def test_the_spelled_out_tags():
    # The public contract, written out by hand (DESIGN.md §4).
    assert [tags.GRAD_NORM_TOTAL, tags.GRAD_NORM_CLIPPED, tags.CLIP_THRESHOLD, tags.CLIP_RATE,
            tags.NONFINITE_SKIPPED, tags.SPIKE_SKIPPED, tags.SPIKE_ZSCORE] == STEP_TAGS
    assert list(tags.STEP_TAGS) == STEP_TAGS
    assert tags.param_tag("rnn.weight_hh_l0") == "grad_norm/rnn.weight_hh_l0"
    assert tags.histogram_tag("rnn.weight_hh_l0") == "grad_hist/rnn.weight_hh_l0"
    assert (tags.ARC_THRESHOLD, tags.ARC_CLIPPED_RANKS, tags.arc_norm_tag(3)) == (
        "arc/threshold", "arc/clipped_ranks", "arc/norm_rank3")
    assert tags.with_optimizer("grad_norm/total", 1, 2) == "grad_norm/total_opt1"
    assert tags.with_optimizer("grad_norm/total", 0, 1) == "grad_norm/total"
    assert tags.PROGRESS_BAR_NORM == "grad_norm"


@pytest.mark.parametrize("num_optimizers", [1, 3])
@pytest.mark.parametrize("base", STEP_TAGS)
def test_step_tags_round_trip(base, num_optimizers):
    for idx in range(num_optimizers):
        written = tags.with_optimizer(base, idx, num_optimizers)
        expected = tags.Tag(base, idx if num_optimizers > 1 else None)
        assert tags.parse(written, suffixed=num_optimizers > 1) == expected
        assert tags.parse(written) == expected  # the totals are never misread, whatever the hint


@pytest.mark.parametrize("num_optimizers", [1, 2])
@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_parameter_tags_round_trip(name, num_optimizers):
    suffixed = num_optimizers > 1
    for idx in range(num_optimizers):
        expected_idx = idx if suffixed else None
        written = tags.with_optimizer(tags.param_tag(name), idx, num_optimizers)
        assert tags.parse(written, suffixed) == tags.Tag(tags.GRAD_NORM_PREFIX, expected_idx, param=name)
        assert tags.split_optimizer(written, suffixed) == (tags.param_tag(name), expected_idx)
        assert tags.param_name(tags.split_optimizer(written, suffixed)[0]) == name
        hist = tags.with_optimizer(tags.histogram_tag(name), idx, num_optimizers)
        assert tags.parse(hist, suffixed) == tags.Tag(tags.HISTOGRAM_PREFIX, expected_idx, param=name)
        # the layout's per-parameter expression selects it, with or without suffix
        assert tags.PARAM_NORM_PATTERN.search(written)


def test_without_the_hint_a_trailing_suffix_is_read_as_one():
    # Documented ambiguity: a single-optimizer parameter named "scale_opt2" reads as optimizer 2 unless the
    # caller says the run had one optimizer (the report decides from the totals).
    assert tags.parse("grad_norm/scale_opt2") == tags.Tag("grad_norm/", 2, param="scale")
    assert tags.parse("grad_norm/scale_opt2", suffixed=False) == tags.Tag("grad_norm/", None, param="scale_opt2")


@pytest.mark.parametrize("rank", [0, 1, 7, 123])
def test_arc_tags_round_trip(rank):
    tag = tags.arc_norm_tag(rank)
    assert tags.arc_norm_rank(tag) == rank
    assert tags.parse(tag) == tags.parse(tag, suffixed=True) == tags.Tag(tags.ARC_NORM_RANK, rank=rank)
    for tag in (tags.ARC_THRESHOLD, tags.ARC_CLIPPED_RANKS):
        assert tags.parse(tag) == tags.Tag(tag)
    assert tags.ARC_NORM_RANK_PATTERN.search(tags.arc_norm_tag(rank))


@pytest.mark.parametrize("tag", ["train/loss", "val/acc", "grad_norm/", "grad_hist/", "arc/norm_rank", "arc/norm_rankx",
                                 "arc/threshold_opt1", "epoch"])
def test_foreign_tags_are_not_read(tag):
    assert tags.parse(tag) is None
    assert tags.arc_norm_rank(tag) is None


def test_totals_are_not_parameters():
    for tag in ("grad_norm/total", "grad_norm/clipped_total", "grad_norm/total_opt4", "grad_norm/clipped_total_opt0"):
        assert not tags.PARAM_NORM_PATTERN.search(tag)
        assert tags.param_name(tags.split_optimizer(tag)[0]) is None
    assert tags.PARAM_NORM_PATTERN.search("grad_norm/total_steps.weight")


def test_tag_regex_matches_exactly():
    exact = re.compile(tags.tag_regex(tags.CLIP_RATE))
    anyopt = re.compile(tags.tag_regex(tags.CLIP_RATE, any_optimizer=True))
    assert exact.search("grad_clip/clip_rate") and not exact.search("grad_clip/clip_rate_opt1")
    assert anyopt.search("grad_clip/clip_rate") and anyopt.search("grad_clip/clip_rate_opt12")
    assert not anyopt.search("grad_clip/clip_rate_optx") and not anyopt.search("xgrad_clip/clip_rate")


def test_bad_indices_are_rejected():
    with pytest.raises(ValueError, match="Expected argument `rank` to be a non-negative integer but got -1"):
        tags.arc_norm_tag(-1)
    with pytest.raises(ValueError, match="`optimizer_idx`"):
        tags.with_optimizer("grad_norm/total", True, 2)


def test_finder_threshold_tag_round_trips_without_a_suffix():
    assert tags.FINDER_THRESHOLD == "grad_clip/finder_threshold"  # DESIGN.md §4
    assert tags.parse(tags.FINDER_THRESHOLD) == tags.parse(tags.FINDER_THRESHOLD, suffixed=True) == tags.Tag(
        tags.FINDER_THRESHOLD)
    assert tags.split_group(tags.FINDER_THRESHOLD) is None  # not the threshold of a group called "finder..."
    assert tags.parse(tags.FINDER_THRESHOLD + "_opt1") is None  # one per search, never per optimizer
    assert tags.parse(tags.group_tag(tags.CLIP_THRESHOLD, "finder_threshold")) == tags.Tag(
        tags.CLIP_THRESHOLD + "/", group="finder_threshold")
