"""The pure core in a plain PyTorch loop (no Lightning): measure once, pick a threshold, clip.

    python examples/plain_pytorch_loop.py
"""

from __future__ import annotations

import torch

from lightning_clip.core.functional import clip_grads_with_norm_
from lightning_clip.core.grads import collect_grads, gradient_stats
from lightning_clip.core.thresholds import ZScoreThreshold


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = ZScoreThreshold(warmup_steps=10, max_norm=None)
    for step in range(50):
        x = torch.randn(32, 16)
        y = x.sum(dim=1, keepdim=True) * (20.0 if step == 30 else 1.0)  # a loss spike at step 30
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads, _ = collect_grads(model.parameters())
        stats = gradient_stats(grads)  # one foreach pass
        threshold = policy(stats.total_norm)
        if not bool(stats.finite):  # skip non-finite steps
            continue
        coef = clip_grads_with_norm_(grads, threshold, stats.total_norm)
        opt.step()
        if step % 10 == 0 or step == 30:
            print(f"step {step:2d} loss {loss.item():9.3f} norm {stats.total_norm.item():8.3f} "
                  f"threshold {threshold.item():8.3f} coef {coef.item():.3f}")


if __name__ == "__main__":
    main()
