"""The recommended set-up in a plain PyTorch loop (no Lightning): search the threshold, clip at it, skip spikes.

    python examples/plain_pytorch_loop.py

1. The search (``lightning_clip.core.search``, the same one ``ClipThresholdFinder`` runs in ``fit``): the
   median gradient norm of a few batches at the starting weights sets a grid of candidate thresholds; a
   short run per candidate, each from the same weights, optimizer state and batches; among the thresholds
   whose mean loss is within 2 standard errors of the best, the one nearest the middle of their band.
2. Training clips the total norm at that threshold (``clip_grads_with_norm_`` on one ``gradient_stats`` pass)
   and skips a step whose log gradient norm is a spike against the recent ones (``RollingWindow``, what
   ``SpikeGuard(scale="log")`` does). Step 150's batch is corrupted (targets x20): its step is skipped.
"""

from __future__ import annotations

import copy

import torch

from lightning_clip.core.functional import clip_grads_with_norm_
from lightning_clip.core.grads import collect_grads, gradient_stats
from lightning_clip.core.search import candidate_grid, probe_median, search
from lightning_clip.core.window import RollingWindow

STEPS, SPIKE_STEP, SEARCH_STEPS = 200, 150, 30
WINDOW, Z_THRESH = 64, 6.0


def make_batches(num: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches, drawn once (a run over ``batches[:n]`` sees the same data every time)."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num, 32, 16, generator=g)
    ys = xs.sum(dim=2, keepdim=True)
    ys[SPIKE_STEP] *= 20.0  # one corrupted batch
    return list(zip(xs, ys))


def step_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def main() -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = make_batches(STEPS)
    start = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    # 1. The search, from the starting point every time.
    def restore() -> None:
        model.load_state_dict(start[0])
        opt.load_state_dict(copy.deepcopy(start[1]))

    def run(threshold: float, num_steps: int) -> list[float]:
        restore()
        losses = []
        for x, y in batches[:num_steps]:
            loss = step_loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            grads, _ = collect_grads(model.parameters())
            clip_grads_with_norm_(grads, threshold, gradient_stats(grads).total_norm)
            opt.step()
            losses.append(loss.item())
        return losses

    norms = []
    for x, y in batches[:8]:  # the probe: gradient norms at the starting weights
        model.zero_grad()
        step_loss(model, x, y).backward()
        norms.append(float(gradient_stats(collect_grads(model.parameters())[0]).total_norm))
    result = search(run, candidate_grid(probe_median(norms)), num_steps=SEARCH_STEPS)
    print(result)
    threshold = result.threshold
    restore()

    # 2. Training: clip at the found threshold; skip a step whose log norm is a spike.
    window = RollingWindow(WINDOW)
    loss_value = float("nan")
    for step, (x, y) in enumerate(batches):
        loss = step_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        grads, _ = collect_grads(model.parameters())
        stats = gradient_stats(grads)  # one foreach pass
        log_norm = stats.total_norm.log()
        z = window.zscore(log_norm)
        if not bool(stats.finite) or (window.filled == WINDOW and z.item() > Z_THRESH):
            print(f"step {step:3d} loss {loss.item():9.3f} norm {stats.total_norm.item():8.3f}  skipped: "
                  f"z-score {z.item():.1f} of the log norm")
            continue
        window.push(log_norm)
        coef = clip_grads_with_norm_(grads, threshold, stats.total_norm)
        opt.step()
        loss_value = loss.item()
        if step % 25 == 0:
            print(f"step {step:3d} loss {loss_value:9.3f} norm {stats.total_norm.item():8.3f} "
                  f"threshold {threshold:.3g} coef {coef.item():.3f}")
    print(f"final loss {loss_value:.4g} (step {STEPS - 1})")
    return loss_value


if __name__ == "__main__":
    main()
