"""Train the adding-problem RNN with monitoring, adaptive clipping and a NaN guard.

    python examples/lightning_trainer.py --max-steps 300
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_clip import GradientClipping, GradientNormMonitor, NonFiniteGradientGuard, PercentileThreshold
from lightning_clip.tools.demo import AddingProblemDataModule, AddingRNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--percentile", type=float, default=90.0)
    args = parser.parse_args()
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        log_every_n_steps=10,
        callbacks=[
            GradientNormMonitor(per_parameter=True),
            GradientClipping(PercentileThreshold(args.percentile, warmup_steps=50, window=200)),
            NonFiniteGradientGuard("skip"),
        ],
    )
    trainer.fit(AddingRNN(), AddingProblemDataModule(seq_len=50))


if __name__ == "__main__":
    main()
