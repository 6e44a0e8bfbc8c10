"""Every logged metric name (TensorBoard tag) in one place: how to write it and how to read it back.

============================ ==========================================================
tag                          meaning (per optimizer step)
============================ ==========================================================
``grad_norm/total``          L2 norm of the optimizer's gradients before clipping
``grad_norm/<param name>``   per-parameter L2 norm before clipping (opt-in)
``grad_norm/clipped_total``  L2 norm after clipping
``grad_clip/threshold``      threshold in force this step
``grad_clip/clip_rate``      fraction of optimizer steps clipped so far
``grad_nonfinite/skipped``   number of optimizer steps skipped so far (guard, ``"skip"``)
``grad_spike/skipped``       number of spikes so far (``SpikeGuard``; skipped with ``"skip"``)
``grad_spike/zscore``        this step's z-score of the monitored value(s) (the largest)
``grad_hist/<param name>``   histogram of a parameter's gradient (TensorBoard only)
``arc/threshold``            ARC clipping threshold across ranks
``arc/clipped_ranks``        number of ranks ARC clipped this step
``arc/norm_rank<i>``         local gradient norm of rank ``i`` before ARC
``dp/epsilon``               client-level DP: epsilon spent so far (at the run's ``delta``)
``dp/clip_bound``            client-level DP: the clip bound in force (adaptive bound)
============================ ==========================================================

``grad_clip/finder_threshold`` is logged once per search (``ClipThresholdFinder``), when its threshold
takes effect; it has no optimizer suffix.

Per-group thresholds (``GradientClipping(groups=...)``) add, for each group: ``grad_clip/norm/<group>``
(the group's L2 norm before clipping), ``grad_clip/threshold/<group>`` (its threshold in force) and
``grad_clip/clip_rate/<group>`` (fraction of steps it was clipped so far).

With several optimizers the suffix ``_opt<i>`` is appended to each ``grad_*`` tag (``arc/*`` tags
have no suffix: the strategy has one gradient). The progress bar shows :data:`PROGRESS_BAR_NORM`.

Writing: :func:`with_optimizer`, :func:`param_tag`, :func:`histogram_tag`, :func:`arc_norm_tag`,
:func:`group_tag`.
Reading: :func:`parse` (every kind at once), or :func:`split_optimizer`, :func:`param_name`,
:func:`arc_norm_rank`, :func:`split_group` alone; :func:`tag_regex` and the ``*_PATTERN`` expressions select tags.
A parameter named ``total`` or ``clipped_total`` would share its tag with the totals; :func:`parse`
reads such a tag as the total.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ARC_CLIPPED_RANKS",
    "ARC_NORM_RANK",
    "ARC_NORM_RANK_PATTERN",
    "ARC_PREFIX",
    "ARC_THRESHOLD",
    "CLIP_RATE",
    "DP_CLIP_BOUND",
    "DP_EPSILON",
    "DP_PREFIX",
    "FINDER_THRESHOLD",
    "GROUP_NORM",
    "GROUP_TAGS",
    "CLIP_THRESHOLD",
    "GRAD_NORM_CLIPPED",
    "GRAD_NORM_PREFIX",
    "GRAD_NORM_TOTAL",
    "HISTOGRAM_PREFIX",
    "LOSS_TAGS",
    "NONFINITE_SKIPPED",
    "OPTIMIZER_SUFFIX_PATTERN",
    "PARAM_NORM_PATTERN",
    "PROGRESS_BAR_NORM",
    "SPIKE_SKIPPED",
    "SPIKE_ZSCORE",
    "STEP_TAGS",
    "Tag",
    "arc_norm_rank",
    "arc_norm_tag",
    "group_tag",
    "histogram_tag",
    "loss_tag",
    "param_name",
    "param_tag",
    "parse",
    "split_group",
    "split_optimizer",
    "tag_regex",
    "with_optimizer",
]

GRAD_NORM_PREFIX = "grad_norm/"
GRAD_NORM_TOTAL = GRAD_NORM_PREFIX + "total"
GRAD_NORM_CLIPPED = GRAD_NORM_PREFIX + "clipped_total"
CLIP_THRESHOLD = "grad_clip/threshold"
CLIP_RATE = "grad_clip/clip_rate"
NONFINITE_SKIPPED = "grad_nonfinite/skipped"
SPIKE_SKIPPED = "grad_spike/skipped"
SPIKE_ZSCORE = "grad_spike/zscore"
HISTOGRAM_PREFIX = "grad_hist/"
ARC_PREFIX = "arc/"
ARC_THRESHOLD = ARC_PREFIX + "threshold"
ARC_CLIPPED_RANKS = ARC_PREFIX + "clipped_ranks"
ARC_NORM_RANK = ARC_PREFIX + "norm_rank{rank}"
DP_PREFIX = "dp/"
DP_EPSILON = DP_PREFIX + "epsilon"
DP_CLIP_BOUND = DP_PREFIX + "clip_bound"
#: The threshold ``ClipThresholdFinder`` chose, logged when it takes effect (once per search).
FINDER_THRESHOLD = "grad_clip/finder_threshold"
#: Per-group thresholds (``GradientClipping(groups=...)``): ``<base>/<group>`` for each of these bases.
GROUP_NORM = "grad_clip/norm"
GROUP_TAGS: tuple[str, ...] = (GROUP_NORM, CLIP_THRESHOLD, CLIP_RATE)
#: Progress-bar key of the pre-clip total norm (``GradientNormMonitor(prog_bar=True)``).
PROGRESS_BAR_NORM = GRAD_NORM_PREFIX.rstrip("/")

#: The per-step tags of one optimizer (without suffix), in the order the callbacks document them.
STEP_TAGS: tuple[str, ...] = (
    GRAD_NORM_TOTAL, GRAD_NORM_CLIPPED, CLIP_THRESHOLD, CLIP_RATE, NONFINITE_SKIPPED, SPIKE_SKIPPED, SPIKE_ZSCORE,
)

#: The model's training-loss tags that reports read (the demo models log the first), most specific first.
#: Not written by this package: a LightningModule logs its own loss under one of these names.
LOSS_TAGS: tuple[str, ...] = ("train/loss", "train/loss_step", "train_loss", "train_loss_step", "loss")

# The patterns below have one plain group at most (no named groups): TensorBoard's layout uses them too.
_OPT = "_opt"
_SUFFIX = re.escape(_OPT) + r"\d+"
#: Matches the ``_opt<i>`` suffix at the end of a tag (group 1: ``i``).
OPTIMIZER_SUFFIX_PATTERN = re.compile(re.escape(_OPT) + r"(\d+)$")
#: Matches a per-parameter norm tag, with or without the suffix (not the totals).
PARAM_NORM_PATTERN = re.compile(
    "^" + re.escape(GRAD_NORM_PREFIX)
    + "(?!(?:" + "|".join(re.escape(t[len(GRAD_NORM_PREFIX):]) for t in (GRAD_NORM_TOTAL, GRAD_NORM_CLIPPED))
    + ")(?:" + _SUFFIX + ")?$).+"
)
_ARC_RANK_HEAD, _ARC_RANK_TAIL = ARC_NORM_RANK.split("{rank}")
#: Matches ``arc/norm_rank<i>`` (group 1: ``i``).
ARC_NORM_RANK_PATTERN = re.compile("^" + re.escape(_ARC_RANK_HEAD) + r"(\d+)" + re.escape(_ARC_RANK_TAIL) + "$")


def _check_index(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"Expected argument `{name}` to be a non-negative integer but got {value!r}")
    return value


def with_optimizer(tag: str, optimizer_idx: int, num_optimizers: int) -> str:
    """Append ``_opt<i>`` to ``tag`` when the trainer has several optimizers."""
    _check_index("optimizer_idx", optimizer_idx)
    return f"{tag}{_OPT}{optimizer_idx}" if num_optimizers > 1 else tag


def split_optimizer(tag: str, suffixed: bool | None = None) -> tuple[str, int | None]:
    """Split ``tag`` into the tag without ``_opt<i>`` and ``i`` (``None`` without a suffix).

    Args:
        tag: a logged tag.
        suffixed: whether the run had several optimizers (every ``grad_*`` tag then ends with
            ``_opt<i>``). ``None`` strips a trailing ``_opt<i>`` whenever there is one, which misreads
            a single-optimizer parameter whose own name ends with ``_opt<digits>``.
    """
    if suffixed is False:
        return tag, None
    m = OPTIMIZER_SUFFIX_PATTERN.search(tag)
    if m is None:
        return tag, None
    return tag[: m.start()], int(m.group(1))


def tag_regex(tag: str, any_optimizer: bool = False) -> str:
    """A regular expression matching exactly ``tag`` (``any_optimizer``: also ``tag`` + ``_opt<i>``)."""
    return "^" + re.escape(tag) + ("(?:" + _SUFFIX + ")?" if any_optimizer else "") + "$"


def param_tag(name: str) -> str:
    """Tag of the per-parameter norm of parameter ``name``."""
    return GRAD_NORM_PREFIX + name


def param_name(tag: str) -> str | None:
    """The parameter name of a per-parameter norm tag without suffix (``None`` for any other tag)."""
    if not tag.startswith(GRAD_NORM_PREFIX) or tag in (GRAD_NORM_TOTAL, GRAD_NORM_CLIPPED):
        return None
    name = tag[len(GRAD_NORM_PREFIX):]
    return name or None


def histogram_tag(name: str) -> str:
    """Tag of the gradient histogram of parameter ``name``."""
    return HISTOGRAM_PREFIX + name


def arc_norm_tag(rank: int) -> str:
    """Tag of rank ``rank``'s local gradient norm before ARC."""
    return ARC_NORM_RANK.format(rank=_check_index("rank", rank))


def arc_norm_rank(tag: str) -> int | None:
    """The rank of an ``arc/norm_rank<i>`` tag (``None`` for any other tag)."""
    m = ARC_NORM_RANK_PATTERN.match(tag)
    return int(m.group(1)) if m else None


def group_tag(base: str, group: str) -> str:
    """Tag of ``base`` (one of :data:`GROUP_TAGS`) for the clipping group named ``group``."""
    if base not in GROUP_TAGS:
        raise ValueError(f"Expected argument `base` to be one of {GROUP_TAGS} but got {base!r}")
    if not isinstance(group, str) or not group:
        raise ValueError(f"Expected argument `group` to be a non-empty string but got {group!r}")
    return f"{base}/{group}"


def split_group(tag: str) -> tuple[str, str] | None:
    """``(base, group)`` of a per-group tag without suffix (``None`` for any other tag)."""
    for base in GROUP_TAGS:
        head = base + "/"
        if tag.startswith(head) and len(tag) > len(head):
            return base, tag[len(head):]
    return None


def loss_tag(logged: Iterable[str]) -> str | None:
    """The first of :data:`LOSS_TAGS` among the ``logged`` tags (``None`` when the run logged none)."""
    present = set(logged)
    return next((t for t in LOSS_TAGS if t in present), None)


@dataclass(frozen=True)
class Tag:
    """A logged tag, read back.

    Attributes:
        base: the tag without the ``_opt<i>`` suffix; for per-parameter tags the prefix
            :data:`GRAD_NORM_PREFIX` / :data:`HISTOGRAM_PREFIX`, for rank norms :data:`ARC_NORM_RANK`.
        optimizer: ``i`` of the suffix, ``None`` without one.
        param: the parameter name of a per-parameter norm or histogram tag.
        rank: the rank of an ``arc/norm_rank<i>`` tag.
        group: the clipping group of a per-group tag (``base`` is then one of :data:`GROUP_TAGS` plus ``"/"``,
            a prefix as for per-parameter tags, so it never equals a whole-optimizer tag).
    """

    base: str
    optimizer: int | None = None
    param: str | None = None
    rank: int | None = None
    group: str | None = None


def parse(tag: str, suffixed: bool | None = None) -> Tag | None:
    """Read ``tag`` back; ``None`` when this package does not write it.

    Args:
        tag: a logged tag.
        suffixed: whether the run had several optimizers (see :func:`split_optimizer`).
    """
    rank = arc_norm_rank(tag)
    if rank is not None:
        return Tag(ARC_NORM_RANK, rank=rank)
    if tag in (ARC_THRESHOLD, ARC_CLIPPED_RANKS, DP_EPSILON, DP_CLIP_BOUND, FINDER_THRESHOLD):
        return Tag(tag)
    if tag in STEP_TAGS:  # a total never carries a suffix-looking name
        return Tag(tag)
    base, idx = split_optimizer(tag, suffixed)
    if base in STEP_TAGS:
        return Tag(base, idx)
    grouped = split_group(base)
    if grouped is not None:
        return Tag(grouped[0] + "/", idx, group=grouped[1])
    name = param_name(base)
    if name is not None:
        return Tag(GRAD_NORM_PREFIX, idx, param=name)
    if base.startswith(HISTOGRAM_PREFIX) and len(base) > len(HISTOGRAM_PREFIX):
        return Tag(HISTOGRAM_PREFIX, idx, param=base[len(HISTOGRAM_PREFIX):])
    return None
