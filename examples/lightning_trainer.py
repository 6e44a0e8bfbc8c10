"""Train the adding-problem RNN with the recommended set-up: the clipping threshold found at fit start.

    python examples/lightning_trainer.py              # --max-steps 1000 --seq-len 30 --num-batches 50
    tensorboard --logdir lightning_logs

``ClipThresholdFinder`` runs a short search when ``fit`` starts (one short run per candidate threshold, all
from the same weights and batches), prints the table, writes ``clip_threshold_finder.png`` next to the logs,
puts everything back and sets the chosen threshold on ``GradientClipping``. ``SpikeGuard`` skips the steps
whose gradient norm jumps far above the recent ones; ``GradientNormMonitor`` logs the norms.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_clip import ClipThresholdFinder, GradientClipping, GradientNormMonitor, SpikeGuard
from lightning_clip.tools.demo import AddingProblemDataModule, AddingRNN


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=30, help="adding-problem sequence length (longer: harder)")
    parser.add_argument("--num-batches", type=int, default=50, help="optimizer steps per candidate threshold")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        log_every_n_steps=10,
        callbacks=[
            ClipThresholdFinder(num_batches=args.num_batches),
            GradientClipping(),  # its threshold is the finder's choice
            SpikeGuard(scale="log"),
            GradientNormMonitor(per_parameter=True),
        ],
    )
    model, data = AddingRNN(), AddingProblemDataModule(seq_len=args.seq_len)
    trainer.fit(model, data)
    (metrics,) = trainer.validate(model, data, verbose=False)
    mse = float(metrics["val/loss"])
    print(f"validation MSE after {trainer.global_step} steps: {mse:.4g} (always predicting 1.0 scores 0.167)")
    return mse


if __name__ == "__main__":
    main()
