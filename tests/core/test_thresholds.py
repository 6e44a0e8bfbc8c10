"""Threshold policies against independent references: numpy.percentile and a plain-Python ZClip."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from lightning_clip.core.thresholds import (
    FixedThreshold,
    PercentileThreshold,
    QuantileThreshold,
    ThresholdPolicy,
    WarmupThreshold,
    ZScoreThreshold,
    as_policy,
)

NAN = float("nan")
INF = float("inf")
META = torch.device("meta")


def _norms(n: int, seed: int, *, nan_rate: float = 0.05, inf_rate: float = 0.03, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.lognormal(mean=0.0, sigma=1.0, size=n)
    if ties:
        v = np.round(v * 4) / 4  # many exact duplicates (and zeros)
    v = v.astype(np.float32)
    v[rng.random(n) < nan_rate] = np.nan
    inf_mask = rng.random(n) < inf_rate
    v[inf_mask] = np.where(rng.random(n) < 0.8, np.inf, -np.inf)[inf_mask]
    return v


def _policy(backend: str, **kwargs) -> PercentileThreshold:
    return PercentileThreshold(backend=backend, **kwargs)


def _expected_percentiles(norms, percentile, window, warmup_steps, warmup_threshold):
    """numpy reference: the threshold every step should return (fp32)."""
    out, hist = [], []
    for t, v in enumerate(norms):
        if np.isfinite(v):
            hist.append(v)
        h = hist if window is None else hist[-window:]
        if t < warmup_steps or not h:
            out.append(np.float32(warmup_threshold))
        else:
            out.append(np.float32(np.percentile(np.asarray(h, dtype=np.float32), percentile)))
    return np.asarray(out, dtype=np.float32)


def _run(policy: ThresholdPolicy, norms) -> np.ndarray:
    out = []
    for v in norms:
        thr = policy(torch.tensor(v, dtype=torch.float32))
        assert thr.shape == () and thr.dtype == torch.float32 and thr.device.type == "cpu"
        out.append(thr.item())
    return np.asarray(out, dtype=np.float32)


def _run_tensors(policy: ThresholdPolicy, norms) -> list[torch.Tensor]:
    return [policy(torch.tensor(v, dtype=torch.float32)).clone() for v in norms]


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------------------------------
# PercentileThreshold vs numpy.percentile


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("percentile", [1e-6, 50.0, 90.0, 99.9999, 33.3])
@pytest.mark.parametrize("window", [None, 2, 7])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.filterwarnings("ignore:PercentileThreshold\\(percentile=1e-06\\)")
def test_percentile_matches_numpy(backend, percentile, window, ties):
    norms = _norms(250, seed=int(percentile * 10) + (window or 0), ties=ties)
    policy = _policy(backend, percentile=percentile, warmup_steps=5, warmup_threshold=2.5, window=window)
    got = _run(policy, norms)
    exp = _expected_percentiles(norms, percentile, window, 5, 2.5)
    np.testing.assert_array_equal(got.view(np.int32), exp.view(np.int32))  # bit for bit
    assert policy.steps == len(norms)
    assert policy.norm_history is not None and policy.norm_history.backend == backend
    # non-finite norms never entered the history
    hist = policy.state_dict()["history"]
    assert torch.isfinite(hist).all()
    n_finite = int(np.isfinite(norms).sum())
    assert hist.numel() == (n_finite if window is None else min(window, n_finite))


@pytest.mark.parametrize("backend", ["host", "device"])
def test_percentile_warmup_semantics(backend):
    norms = np.asarray([5.0, 1.0, NAN, 3.0, 2.0, 4.0, INF, 0.5], dtype=np.float32)
    policy = _policy(backend, percentile=50.0, warmup_steps=3, warmup_threshold=0.7)
    got = _run(policy, norms)
    # first 3 calls: warmup_threshold (norms seen meanwhile already count)
    assert got[:3].tolist() == [np.float32(0.7)] * 3
    assert got[3] == np.float32(np.median([5.0, 1.0, 3.0]))
    assert got[4] == np.float32(np.median([5.0, 1.0, 3.0, 2.0]))
    assert got[6] == np.float32(np.median([5.0, 1.0, 3.0, 2.0, 4.0]))  # the inf is ignored
    np.testing.assert_array_equal(got, _expected_percentiles(norms, 50.0, None, 3, 0.7))


@pytest.mark.parametrize("backend", ["host", "device"])
def test_percentile_without_finite_norm_uses_warmup_threshold(backend):
    policy = _policy(backend, percentile=90.0, warmup_steps=0, warmup_threshold=INF)
    got = _run(policy, np.asarray([NAN, INF, -INF, NAN], dtype=np.float32))
    assert np.isinf(got).all() and (got > 0).all()
    assert policy(torch.tensor(2.0)).item() == 2.0
    policy = _policy(backend, percentile=90.0, warmup_steps=0, warmup_threshold=1.5)
    assert policy(torch.tensor(NAN)).item() == np.float32(1.5)


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("window", [None, 1000])
def test_percentile_long_run_matches_numpy(backend, window):
    n = 6000 if backend == "host" else 2300  # host chunks split; the device buffer grows 16 -> 4096
    norms = _norms(n, seed=11, nan_rate=0.01, inf_rate=0.005)
    policy = _policy(backend, percentile=90.0, warmup_steps=10, window=window)
    got = _run(policy, norms)
    exp = _expected_percentiles(norms, 90.0, window, 10, 1.0)
    np.testing.assert_array_equal(got, exp)
    finite = norms[np.isfinite(norms)]
    kept = finite.size if window is None else min(window, finite.size)
    assert policy.norm_history is not None and len(policy.norm_history) == kept
    history = policy.state_dict()["history"]
    assert history.dtype == torch.float32
    expected = np.sort(finite) if window is None else finite[-window:]  # a window is saved oldest first
    np.testing.assert_array_equal(history.numpy(), expected)


@pytest.mark.parametrize("save_backend", ["host", "device"])
@pytest.mark.parametrize("load_backend", ["host", "device"])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("split", [3, 60])  # mid-warmup and after warmup
def test_percentile_state_round_trip(save_backend, load_backend, window, split):
    norms = _norms(120, seed=21)
    kwargs = dict(percentile=75.0, warmup_steps=10, warmup_threshold=0.9, window=window)
    uninterrupted = _run_tensors(_policy(load_backend, **kwargs), norms)

    first = _policy(save_backend, **kwargs)
    _run(first, norms[:split])
    state = _round_trip(first.state_dict())
    assert state["steps"] == split
    assert state["history"].dtype == torch.float32
    resumed = _policy(load_backend, **kwargs)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.state_dict()["history"], state["history"])  # pending state is reported back
    assert resumed.steps == split and resumed.norm_history is None  # placed on the device at the first call
    rest = _run_tensors(resumed, norms[split:])
    for t, (a, b) in enumerate(zip(rest, uninterrupted[split:]), start=split):
        assert torch.equal(a, b), f"step {t}: {a.item()} != {b.item()}"
    # and saving again gives the same state as never stopping
    ref = _policy(load_backend, **kwargs)
    _run(ref, norms)
    assert torch.equal(resumed.state_dict()["history"], ref.state_dict()["history"])
    assert resumed.state_dict()["steps"] == ref.state_dict()["steps"] == len(norms)


def _expected_clipped(norms, percentile, window, warmup_steps, warmup_threshold):
    """numpy reference of history="clipped": the threshold comes from the earlier records, then min(norm, it)."""
    out, hist = [], []
    for t, v in enumerate(norms):
        h = hist if window is None else hist[-window:]
        if t < warmup_steps or not h:
            thr = np.float32(warmup_threshold)
        else:
            thr = np.float32(np.percentile(np.asarray(h, dtype=np.float32), percentile))
        out.append(thr)
        if np.isfinite(v):
            hist.append(min(np.float32(v), thr))
    return np.asarray(out, dtype=np.float32)


@pytest.mark.parametrize("backend", ["host", "device"])
def test_percentile_clipped_history_by_hand(backend):
    # p50, 2 warmup steps at 1.0: records are min(norm, threshold in force)
    norms = np.asarray([0.5, 3.0, 0.8, NAN, 100.0, 0.2, INF, 0.9], dtype=np.float32)
    policy = _policy(backend, percentile=50.0, warmup_steps=2, warmup_threshold=1.0, history="clipped")
    got = _run(policy, norms)
    # t0: 1.0, records 0.5 | t1: 1.0, records 1.0 (3.0 clipped) | t2: median(0.5, 1) = 0.75, records 0.75
    # t3 (NaN): median(0.5, 1, 0.75) = 0.75, nothing recorded | t4: 0.75, the explosion records 0.75
    # t5: median(0.5, 1, 0.75, 0.75) = 0.75, records 0.2 | t6 (inf): median(.2, .5, .75, .75, 1) = 0.75
    # t7: 0.75 (nothing recorded at t6), records 0.75 (0.9 clipped)
    expected = np.asarray([1.0, 1.0, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, _expected_clipped(norms, 50.0, None, 2, 1.0))
    np.testing.assert_array_equal(np.sort(policy.state_dict()["history"].numpy()),
                                  np.asarray([0.2, 0.5, 0.75, 0.75, 0.75, 1.0], dtype=np.float32))
    # the raw history follows the explosion instead
    raw = _run(_policy(backend, percentile=50.0, warmup_steps=2, warmup_threshold=1.0), norms)
    assert raw[4] == np.float32(np.median([0.5, 3.0, 0.8, 100.0]))


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("window", [None, 9])
def test_percentile_clipped_history_matches_numpy(backend, window):
    norms = _norms(400, seed=5) * np.float32(1.0 + np.arange(400) / 50.0)  # growing norms, spikes, NaN/Inf
    policy = _policy(backend, percentile=90.0, warmup_steps=5, warmup_threshold=2.0, window=window,
                     history="clipped")
    got = _run(policy, norms)
    np.testing.assert_array_equal(got, _expected_clipped(norms, 90.0, window, 5, 2.0))
    assert got.max() <= np.float32(2.0)  # no record exceeds its step's threshold: it never rises above the first


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("window", [None, 7])
def test_percentile_clipped_history_round_trip(backend, window):
    norms = _norms(90, seed=8)
    kwargs = dict(percentile=75.0, warmup_steps=10, warmup_threshold=3.0, window=window, history="clipped")
    uninterrupted = _run_tensors(_policy(backend, **kwargs), norms)
    first = _policy(backend, **kwargs)
    _run(first, norms[:40])
    resumed = _policy(backend, **kwargs)
    resumed.load_state_dict(_round_trip(first.state_dict()))
    rest = _run_tensors(resumed, norms[40:])
    assert all(torch.equal(a, b) for a, b in zip(rest, uninterrupted[40:]))
    with pytest.raises(ValueError, match=r"history='clipped' .* history='raw'; resume with the same `history`"):
        _policy(backend, window=window).load_state_dict(first.state_dict())


def test_zscore_refuses_a_state_of_another_history():
    first = ZScoreThreshold(warmup_steps=2, history="clipped")
    _run(first, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"history='clipped' .* history='zclip'; resume with the same `history`"):
        ZScoreThreshold(warmup_steps=2).load_state_dict(first.state_dict())


def test_percentile_reset_and_fresh():
    policy = _policy("host", percentile=50.0, warmup_steps=0, window=4)
    _run(policy, [1.0, 2.0, 3.0])
    clone = policy.fresh()
    assert clone is not policy and repr(clone) == repr(policy)
    assert clone.steps == 0 and clone.state_dict()["history"].numel() == 0
    assert policy.state_dict()["history"].numel() == 3  # the original is untouched
    policy.reset()
    assert policy.steps == 0 and policy.state_dict()["history"].numel() == 0
    assert policy(torch.tensor(8.0)).item() == 8.0


def test_percentile_backend_argument():
    assert PercentileThreshold().backend == "auto"
    auto = PercentileThreshold(warmup_steps=0)
    auto(torch.tensor(1.0))
    assert auto.norm_history is not None and auto.norm_history.backend == "host"  # CPU norms: host
    auto = PercentileThreshold(warmup_steps=0)
    auto(torch.empty((), device=META))
    assert auto.norm_history is not None and auto.norm_history.backend == "device"  # elsewhere: device
    assert "backend='device'" in repr(PercentileThreshold(backend="device"))
    with pytest.raises(ValueError, match=r"argument `backend` to be one of 'auto', 'host', 'device' but got 'gpu'"):
        PercentileThreshold(backend="gpu")


@pytest.mark.parametrize("percentile,words", [(0, "nearly every step would be clipped"),
                                              (100, "no step would be clipped"),
                                              (0.0, "smallest norm"), (100.0, "largest norm")])
def test_percentile_edges_are_rejected_with_the_reason(percentile, words):
    with pytest.raises(ValueError) as info:
        PercentileThreshold(percentile=percentile)
    msg = str(info.value)
    assert "`percentile`" in msg and "(0, 100)" in msg and f"got {float(percentile)!r}" in msg and words in msg


def test_warmup_default_then_is_a_valid_percentile_policy():
    policy = WarmupThreshold()
    assert isinstance(policy.then, PercentileThreshold) and 0 < policy.then.percentile < 100
    norms = [float(x) for x in _norms(150, seed=5, nan_rate=0.0, inf_rate=0.0)]
    got = _run(policy, norms)
    assert (got[:100] == np.float32(1.0)).all()
    np.testing.assert_array_equal(got[100:], _expected_percentiles(np.float32(norms), 90.0, None, 0, 1.0)[100:])


@pytest.mark.parametrize("make", [
    lambda: PercentileThreshold(percentile=60.0, warmup_steps=2, window=5),
    lambda: ZScoreThreshold(warmup_steps=3, max_norm=None),
    lambda: QuantileThreshold(),
])
def test_policy_follows_the_norms_to_another_device(make):
    """State built on one device moves with the norms (here to meta, where nothing can be read)."""
    policy = make()
    _run(policy, [1.0, 2.0, 3.0, 4.0])
    out = policy(torch.empty((), device=META))
    assert out.device == META and policy.steps == 5
    if isinstance(policy, PercentileThreshold):  # "auto" chose again for the new device
        assert policy.norm_history is not None and policy.norm_history.backend == "device"


# Every policy, and WarmupThreshold around each of them, with and without steps taken.
POLICIES = {
    "fixed": lambda: FixedThreshold(0.7),
    "percentile-host": lambda: _policy("host", percentile=70.0, warmup_steps=3),
    "percentile-device-window": lambda: _policy("device", percentile=70.0, warmup_steps=3, window=6),
    "zscore": lambda: ZScoreThreshold(warmup_steps=4, max_norm=None),
    "quantile": lambda: QuantileThreshold(0.8, initial=0.3, learning_rate=0.1),
}
POLICIES.update({f"warmup({k})": (lambda make=make: WarmupThreshold(5, 2.0, then=make()))
                 for k, make in list(POLICIES.items())})


def _assert_state_equal(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_state_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("steps", [0, 2, 30])
def test_state_dict_after_load_before_any_call_is_the_loaded_state(name, steps):
    make = POLICIES[name]
    norms = [float(x) for x in _norms(60, seed=41)]
    source = make()
    _run(source, norms[:steps])
    saved = _round_trip(source.state_dict())
    loaded = make()
    loaded.load_state_dict(saved)
    _assert_state_equal(loaded.state_dict(), saved)
    _assert_state_equal(_round_trip(loaded.state_dict()), saved)  # and it survives a second save
    # then it continues exactly as the source does
    for t, v in enumerate(norms[steps:], start=steps):
        a, b = source(torch.tensor(v)), loaded(torch.tensor(v))
        assert torch.equal(a, b), f"step {t}"
    _assert_state_equal(loaded.state_dict(), source.state_dict())


def test_zscore_refuses_a_state_of_another_warmup_length():
    first = ZScoreThreshold(warmup_steps=4)
    _run(first, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"warmup_steps=4 .* warmup_steps=5; resume with the same `warmup_steps`"):
        ZScoreThreshold(warmup_steps=5).load_state_dict(first.state_dict())


def test_percentile_refuses_a_state_of_another_window():
    first = _policy("host", window=4)
    _run(first, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"window=4 .* window=5; resume with the same `window`"):
        _policy("host", window=5).load_state_dict(first.state_dict())


# --------------------------------------------------------------------------------------------------
# ZScoreThreshold vs a plain-Python ZClip


class RefZClip:
    """ZClip's algorithm, written from its description, in Python floats; NaN/Inf never touch the state."""

    def __init__(self, alpha, z_thresh, warmup_steps, max_norm, clip_option, clip_factor, skip_update_on_spike,
                 eps, history="zclip"):
        self.clipped = history == "clipped"  # record min(norm, threshold in force) in the buffer and the EMA
        self.alpha, self.z_thresh, self.warmup_steps = alpha, z_thresh, warmup_steps
        self.max_norm, self.clip_option, self.clip_factor = max_norm, clip_option, clip_factor
        self.skip, self.eps = skip_update_on_spike, eps
        self.buffer: list[float] = []
        self.mean = self.var = None

    def __call__(self, g: float) -> float:
        cap = INF if self.max_norm is None else self.max_norm
        if self.mean is None:  # warmup
            if math.isfinite(g):
                self.buffer.append(min(g, cap) if self.clipped else g)
                if len(self.buffer) >= self.warmup_steps:
                    self.mean = sum(self.buffer) / len(self.buffer)
                    self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return cap
        std = math.sqrt(self.var)
        if not math.isfinite(g):
            return min(self.mean + self.z_thresh * (std + self.eps), cap)
        z = (g - self.mean) / (std + self.eps)
        if z > self.z_thresh:
            if self.clip_option == "adaptive_scaling":
                thr = self.clip_factor * (self.mean + self.z_thresh * std / (z / self.z_thresh))
            else:
                thr = self.mean
            x = thr
            spike = True
        else:
            thr = self.mean + self.z_thresh * (std + self.eps)
            x = g
            spike = False
        if self.clipped:
            x = min(g, thr, cap)
        if not (spike and self.skip):
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return min(thr, cap)


def _spiky(n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    v = np.abs(1.0 + 0.1 * rng.standard_normal(n))
    v[rng.random(n) < 0.06] *= rng.uniform(4, 30)  # spikes
    v[5] = NAN  # during warmup
    v[40] = NAN  # right after a typical warmup
    v[rng.random(n) < 0.03] = NAN
    v[rng.random(n) < 0.02] = INF
    return [float(x) for x in v.astype(np.float32)]


ZCONFIGS = [
    dict(),
    dict(clip_option="mean"),
    dict(skip_update_on_spike=True),
    dict(max_norm=None),
    dict(max_norm=1.12, clip_factor=0.7),
    dict(alpha=0.9, z_thresh=1.5, warmup_steps=5, max_norm=None, clip_factor=1.3),
    dict(alpha=0.5, z_thresh=3.0, warmup_steps=1, max_norm=50.0, clip_option="mean", skip_update_on_spike=True),
    dict(history="clipped"),
    dict(history="clipped", max_norm=1.05),  # the cap binds: warmup buffer and EMA take min(norm, 1.05)
    dict(history="clipped", max_norm=None, alpha=0.9, warmup_steps=5),
]


def _zkwargs(cfg):
    kw = dict(alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=10.0, clip_option="adaptive_scaling",
              clip_factor=1.0, skip_update_on_spike=False, eps=1e-6)
    kw.update(cfg)
    return kw


@pytest.mark.parametrize("cfg", ZCONFIGS, ids=[str(i) for i in range(len(ZCONFIGS))])
@pytest.mark.parametrize("seed", [0, 1])
def test_zscore_matches_reference_zclip(cfg, seed):
    kw = _zkwargs(cfg)
    norms = _spiky(300, seed)
    policy, ref = ZScoreThreshold(**kw), RefZClip(**kw)
    spikes = 0
    for t, g in enumerate(norms):
        got = policy(torch.tensor(g, dtype=torch.float32))
        assert got.shape == () and got.dtype == torch.float32
        exp = ref(g)
        if math.isinf(exp):
            assert got.item() == exp, f"step {t}"
        else:
            assert got.item() == pytest.approx(exp, rel=2e-5), f"step {t}: norm {g}"
        if ref.mean is not None and math.isfinite(g) and exp < g:
            spikes += 1
    assert spikes > 5  # the sequence really exercised clipping
    state = policy.state_dict()
    assert bool(state["initialized"])
    assert state["mean"].item() == pytest.approx(ref.mean, rel=2e-5)
    assert state["var"].item() == pytest.approx(ref.var, rel=1e-4)


def test_zscore_warmup_threshold_is_max_norm_or_inf():
    policy = ZScoreThreshold(warmup_steps=4, max_norm=3.0)
    assert [policy(torch.tensor(x)).item() for x in (1.0, NAN, 2.0, 1.5)] == [3.0] * 4
    assert not bool(policy.state_dict()["initialized"])  # the NaN did not count toward the 4
    policy(torch.tensor(1.0))
    assert bool(policy.state_dict()["initialized"])
    policy = ZScoreThreshold(warmup_steps=2, max_norm=None)
    assert math.isinf(policy(torch.tensor(1.0)).item())


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_zscore_nonfinite_never_changes_state(bad):
    policy = ZScoreThreshold(warmup_steps=3, max_norm=None)
    for x in (1.0, 1.2, 0.9, 1.1, 1.05):
        policy(torch.tensor(x))
    before = policy.state_dict()
    thr = policy(torch.tensor(bad))
    after = policy.state_dict()
    for k in ("mean", "var", "initialized", "num_warmup", "buffer"):
        assert torch.equal(before[k], after[k]), k
    assert math.isfinite(thr.item())


@pytest.mark.parametrize("split", [10, 23, 150])
def test_zscore_state_round_trip(split):
    kw = _zkwargs(dict(warmup_steps=25))
    norms = _spiky(220, 3)
    full = ZScoreThreshold(**kw)
    uninterrupted = _run_tensors(full, norms)
    first = ZScoreThreshold(**kw)
    _run(first, norms[:split])
    state = _round_trip(first.state_dict())
    resumed = ZScoreThreshold(**kw)
    resumed.load_state_dict(state)
    saved_again = resumed.state_dict()  # before any call: the loaded state is reported back
    for k, v in state.items():
        assert (torch.equal(saved_again[k], v) if isinstance(v, torch.Tensor) else saved_again[k] == v), k
    rest = _run_tensors(resumed, norms[split:])
    for t, (a, b) in enumerate(zip(rest, uninterrupted[split:]), start=split):
        assert torch.equal(a, b), f"step {t}"
    end_a, end_b = resumed.state_dict(), full.state_dict()
    for k in end_b:
        assert (torch.equal(end_a[k], end_b[k]) if isinstance(end_b[k], torch.Tensor) else end_a[k] == end_b[k]), k


# --------------------------------------------------------------------------------------------------
# WarmupThreshold, FixedThreshold, as_policy


@pytest.mark.parametrize(
    "make_inner",
    [
        lambda: _policy("host", percentile=80.0, warmup_steps=0),
        lambda: _policy("device", percentile=80.0, warmup_steps=0, window=9),
        lambda: ZScoreThreshold(warmup_steps=5, max_norm=None),
        lambda: FixedThreshold(0.4),
    ],
    ids=["percentile-host", "percentile-device-window", "zscore", "fixed"],
)
def test_warmup_fixed_then_inner_saw_every_norm(make_inner):
    norms = [float(x) for x in _norms(80, seed=31)]
    bare = _run_tensors(make_inner(), norms)
    policy = WarmupThreshold(warmup_steps=12, warmup_threshold=0.25, then=make_inner())
    got = _run_tensors(policy, norms)
    for t in range(12):
        assert got[t].item() == np.float32(0.25)
    for t in range(12, len(norms)):
        assert torch.equal(got[t], bare[t]), f"step {t}"


def test_warmup_default_inner_and_round_trip():
    norms = [float(x) for x in _norms(60, seed=32)]
    policy = WarmupThreshold(warmup_steps=10, warmup_threshold=2.0)
    assert isinstance(policy.then, PercentileThreshold)
    uninterrupted = _run_tensors(policy, norms)
    first = WarmupThreshold(warmup_steps=10, warmup_threshold=2.0)
    _run(first, norms[:7])
    resumed = WarmupThreshold(warmup_steps=10, warmup_threshold=2.0)
    resumed.load_state_dict(_round_trip(first.state_dict()))
    assert resumed.steps == 7
    rest = _run_tensors(resumed, norms[7:])
    for a, b in zip(rest, uninterrupted[7:]):
        assert torch.equal(a, b)
    resumed.reset()
    assert resumed.steps == 0 and resumed.then.steps == 0


def test_warmup_accepts_float_then():
    policy = WarmupThreshold(warmup_steps=1, warmup_threshold=5.0, then=0.5)
    assert isinstance(policy.then, FixedThreshold)
    assert [policy(torch.tensor(1.0)).item() for _ in range(3)] == [5.0, 0.5, 0.5]


def test_fixed_threshold_and_round_trip():
    policy = FixedThreshold(0.3)
    thr = policy(torch.tensor(10.0))
    assert thr.dtype == torch.float32 and thr.shape == () and thr.item() == np.float32(0.3)
    other = FixedThreshold(1.0)
    other.load_state_dict(_round_trip(policy.state_dict()))
    assert torch.equal(other(torch.tensor(NAN)), thr)


def test_as_policy():
    assert isinstance(as_policy(2), FixedThreshold) and as_policy(2).max_norm == 2.0
    p = PercentileThreshold()
    assert as_policy(p) is p


# --------------------------------------------------------------------------------------------------
# argument validation: every bad value raises naming the argument


BAD_ARGS = [
    (FixedThreshold, {"max_norm": 0.0}, ValueError, "max_norm"),
    (FixedThreshold, {"max_norm": -1.0}, ValueError, "max_norm"),
    (FixedThreshold, {"max_norm": NAN}, ValueError, "max_norm"),
    (FixedThreshold, {"max_norm": INF}, ValueError, "max_norm"),
    (FixedThreshold, {"max_norm": "1"}, TypeError, "max_norm"),
    (FixedThreshold, {"max_norm": True}, TypeError, "max_norm"),
    (FixedThreshold, {"max_norm": None}, TypeError, "max_norm"),
    (PercentileThreshold, {"percentile": -0.1}, ValueError, "percentile"),
    (PercentileThreshold, {"percentile": 0}, ValueError, "percentile"),
    (PercentileThreshold, {"percentile": 100.0}, ValueError, "percentile"),
    (PercentileThreshold, {"percentile": 100.5}, ValueError, "percentile"),
    (PercentileThreshold, {"percentile": INF}, ValueError, "percentile"),
    (PercentileThreshold, {"percentile": NAN}, ValueError, "percentile"),
    (PercentileThreshold, {"percentile": "90"}, TypeError, "percentile"),
    (PercentileThreshold, {"warmup_steps": -1}, ValueError, "warmup_steps"),
    (PercentileThreshold, {"warmup_steps": 2.0}, TypeError, "warmup_steps"),
    (PercentileThreshold, {"warmup_steps": True}, TypeError, "warmup_steps"),
    (PercentileThreshold, {"warmup_threshold": 0.0}, ValueError, "warmup_threshold"),
    (PercentileThreshold, {"warmup_threshold": NAN}, ValueError, "warmup_threshold"),
    (PercentileThreshold, {"warmup_threshold": "x"}, TypeError, "warmup_threshold"),
    (PercentileThreshold, {"window": 0}, ValueError, "window"),
    (PercentileThreshold, {"window": -5}, ValueError, "window"),
    (PercentileThreshold, {"window": 2.5}, TypeError, "window"),
    (PercentileThreshold, {"window": False}, TypeError, "window"),
    (PercentileThreshold, {"backend": "cuda"}, ValueError, "backend"),
    (PercentileThreshold, {"backend": None}, ValueError, "backend"),
    (PercentileThreshold, {"history": "clip"}, ValueError, "history"),
    (ZScoreThreshold, {"history": "raw"}, ValueError, "history"),
    (WarmupThreshold, {"warmup_steps": -2}, ValueError, "warmup_steps"),
    (WarmupThreshold, {"warmup_steps": 1.5}, TypeError, "warmup_steps"),
    (WarmupThreshold, {"warmup_threshold": -1.0}, ValueError, "warmup_threshold"),
    (WarmupThreshold, {"then": "percentile"}, TypeError, "then"),
    (WarmupThreshold, {"then": -1.0}, ValueError, "then"),
    (WarmupThreshold, {"then": True}, TypeError, "then"),
    (QuantileThreshold, {"quantile": 0.0}, ValueError, "quantile"),
    (QuantileThreshold, {"quantile": 1.0}, ValueError, "quantile"),
    (QuantileThreshold, {"quantile": "0.5"}, TypeError, "quantile"),
    (QuantileThreshold, {"initial": 0.0}, ValueError, "initial"),
    (QuantileThreshold, {"initial": INF}, ValueError, "initial"),
    (QuantileThreshold, {"learning_rate": -0.2}, ValueError, "learning_rate"),
    (QuantileThreshold, {"learning_rate": NAN}, ValueError, "learning_rate"),
    (ZScoreThreshold, {"alpha": 0.0}, ValueError, "alpha"),
    (ZScoreThreshold, {"alpha": 1.0}, ValueError, "alpha"),
    (ZScoreThreshold, {"alpha": 1.5}, ValueError, "alpha"),
    (ZScoreThreshold, {"alpha": "0.9"}, TypeError, "alpha"),
    (ZScoreThreshold, {"z_thresh": 0.0}, ValueError, "z_thresh"),
    (ZScoreThreshold, {"z_thresh": -2.5}, ValueError, "z_thresh"),
    (ZScoreThreshold, {"warmup_steps": 0}, ValueError, "warmup_steps"),
    (ZScoreThreshold, {"warmup_steps": 2.0}, TypeError, "warmup_steps"),
    (ZScoreThreshold, {"max_norm": 0.0}, ValueError, "max_norm"),
    (ZScoreThreshold, {"max_norm": INF}, ValueError, "max_norm"),
    (ZScoreThreshold, {"clip_option": "median"}, ValueError, "clip_option"),
    (ZScoreThreshold, {"clip_factor": 0.0}, ValueError, "clip_factor"),
    (ZScoreThreshold, {"clip_factor": NAN}, ValueError, "clip_factor"),
    (ZScoreThreshold, {"skip_update_on_spike": 1}, TypeError, "skip_update_on_spike"),
    (ZScoreThreshold, {"skip_update_on_spike": "yes"}, TypeError, "skip_update_on_spike"),
    (ZScoreThreshold, {"eps": 0.0}, ValueError, "eps"),
    (ZScoreThreshold, {"eps": -1e-6}, ValueError, "eps"),
]


@pytest.mark.parametrize("cls,kwargs,exc,name", BAD_ARGS,
                         ids=[f"{c.__name__}-{next(iter(k))}={next(iter(k.values()))!r}" for c, k, _, _ in BAD_ARGS])
def test_bad_arguments_raise_naming_the_argument(cls, kwargs, exc, name):
    with pytest.raises(exc) as info:
        cls(**kwargs)
    msg = str(info.value)
    assert f"`{name}`" in msg
    value = next(iter(kwargs.values()))
    assert repr(value) in msg or str(value) in msg  # and the offending value


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1.0, ValueError), ("1", TypeError), (None, TypeError),
                                     (True, TypeError), ([1.0], TypeError)])
def test_as_policy_rejects_bad_values(bad, exc):
    with pytest.raises(exc, match="`threshold`"):
        as_policy(bad)


# --------------------------------------------------------------------------------------------------
# QuantileThreshold vs the geometric update of Andrew et al. 2021, in Python floats


def _quantile_reference(norms, quantile, initial, learning_rate):
    """C_t is in force at step t; C_{t+1} = C_t * exp(-lr * (1[norm <= C_t] - q)); NaN/Inf leave C alone."""
    out, c = [], initial
    for g in norms:
        out.append(c)
        if math.isfinite(g):
            c = c * math.exp(-learning_rate * ((1.0 if g <= c else 0.0) - quantile))
    return out, c


def test_quantile_by_hand():
    # learning_rate = 2 ln 2 and quantile 1/2: halve after a norm at or under C, double after one above
    policy = QuantileThreshold(quantile=0.5, initial=1.0, learning_rate=2 * math.log(2.0))
    got = _run(policy, [0.5, 2.0, NAN, 3.0, INF, 1.0, -INF, 2.0, 0.1])
    # 1 (0.5 <= 1: halve) -> 0.5 (2 > 0.5: double) -> 1 (NaN: keep) -> 1 (3 > 1) -> 2 (Inf: keep) -> 2
    # (1 <= 2: halve) -> 1 (-Inf: keep) -> 1 (2 > 1) -> 2 (0.1 <= 2) -> 1
    np.testing.assert_allclose(got, [1.0, 0.5, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0], rtol=1e-6)
    assert policy.state_dict()["threshold"].item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("quantile,initial,learning_rate", [(0.5, 1.0, 0.2), (0.9, 0.01, 0.05), (0.1, 50.0, 0.5)])
def test_quantile_matches_the_formula_and_tracks_the_quantile(quantile, initial, learning_rate):
    norms = [float(x) for x in _norms(1500, seed=3)]
    got = _run(QuantileThreshold(quantile, initial, learning_rate), norms)
    exp, _ = _quantile_reference(norms[:100], quantile, initial, learning_rate)
    np.testing.assert_allclose(got[:100], exp, rtol=1e-5)
    # every step, from the policy's own fp32 C_t (over thousands of steps float64 drifts to another side of
    # some norm and the whole sequence shifts; the rule itself must hold exactly at every step)
    for t in range(1, len(norms)):
        _, step = _quantile_reference([norms[t - 1]], quantile, float(got[t - 1]), learning_rate)
        assert got[t] == pytest.approx(step, rel=1e-6), f"step {t}"
    late = [(g, c) for g, c in zip(norms[700:], got[700:]) if math.isfinite(g)]
    below = np.mean([g <= c for g, c in late])
    assert abs(below - quantile) < 0.06  # it tracks the quantile


def test_quantile_explosion_raises_it_by_one_factor_per_step():
    policy = QuantileThreshold()
    got = _run(policy, [1e30, 1e30, 1e30])
    np.testing.assert_allclose(got, [1.0, math.exp(0.1), math.exp(0.2)], rtol=1e-6)


@pytest.mark.parametrize("split", [0, 17, 200])
def test_quantile_round_trip_gives_the_same_thresholds(split):
    norms = [float(x) for x in _norms(300, seed=9)]
    kw = dict(quantile=0.7, initial=2.0, learning_rate=0.3)
    uninterrupted = _run_tensors(QuantileThreshold(**kw), norms)
    first = QuantileThreshold(**kw)
    _run(first, norms[:split])
    state = _round_trip(first.state_dict())
    assert state["steps"] == split and state["threshold"].dtype == torch.float32
    resumed = QuantileThreshold(**kw)
    resumed.load_state_dict(state)
    rest = _run_tensors(resumed, norms[split:])
    assert all(torch.equal(a, b) for a, b in zip(rest, uninterrupted[split:]))


def test_quantile_refuses_a_bad_checkpoint_threshold():
    with pytest.raises(ValueError, match="`threshold` to be a positive finite number but got nan"):
        QuantileThreshold().load_state_dict({"steps": 3, "threshold": torch.tensor(NAN)})


def test_float32_cannot_hold_the_threshold_error_at_construction():
    from lightning_clip.core.thresholds import as_policy

    for make, name, word in [
        (lambda: FixedThreshold(1e-300), "max_norm", "0"),
        (lambda: as_policy(1e-300), "threshold", "0"),
        (lambda: QuantileThreshold(initial=1e-300), "initial", "0"),
        (lambda: QuantileThreshold(initial=1e300), "initial", "inf"),
        (lambda: PercentileThreshold(warmup_threshold=1e39), "warmup_threshold", "inf"),
        (lambda: WarmupThreshold(warmup_threshold=1e-45), "warmup_threshold", "0"),
        (lambda: ZScoreThreshold(max_norm=1e40), "max_norm", "inf"),
    ]:
        with pytest.raises(ValueError, match=rf"`{name}` to be in \[1.175e-38, 3.403e\+38\].* is {word}\)"):
            make()
    assert float(torch.tensor(FixedThreshold(1.2e-38).max_norm, dtype=torch.float32)) > 0  # the edge holds
    assert PercentileThreshold(warmup_threshold=float("inf")).warmup_threshold == float("inf")  # "no clip" stays


def test_quantile_learning_rate_is_bounded_and_the_threshold_stays_finite():
    with pytest.raises(ValueError, match=r"`learning_rate` to be in \(0, 88\] but got 1000000.0"):
        QuantileThreshold(learning_rate=1e6)
    policy = QuantileThreshold(quantile=0.9, initial=1.0, learning_rate=88.0)
    seen = [policy(torch.tensor(v)) for v in [3e38, 3e38] + [0.0] * 25]  # x exp(79.2) up, x exp(-8.8) down
    assert all(torch.isfinite(c) and c > 0 for c in seen)
    assert seen[2] == torch.tensor(3.4028234663852886e38, dtype=torch.float32)  # capped at float32's largest
    assert seen[-1] == torch.tensor(1.1754943508222875e-38, dtype=torch.float32)  # and its smallest normal


def test_percentile_window_one_is_refused_with_raw_history_and_a_fraction_warns():
    with pytest.raises(ValueError, match=r"`window` to be None or an integer >= 2 with history='raw' but got 1"):
        PercentileThreshold(window=1)
    policy = PercentileThreshold(50.0, warmup_steps=0, window=1, history="clipped")  # the last record: meaningful
    assert [float(policy(torch.tensor(v))) for v in (1.0, 3.0, 0.5, 2.0)] == [1.0, 1.0, 1.0, 0.5]
    with pytest.warns(UserWarning, match=r"percentile=0.9\).*0-100 scale .*percentile=90\)"):
        PercentileThreshold(0.9)
