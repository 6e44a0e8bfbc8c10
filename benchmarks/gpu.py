"""The CUDA paths, checked and timed on a GPU: one script, one table.

Sections (each row of the table says ``ok``, a measurement, or why it was skipped):

1. **Sync check.** ``GradientNormMonitor(per_parameter=True)`` + ``GradientClipping(PercentileThreshold(
   backend="device"))`` + ``NonFiniteGradientGuard("skip")`` in a real ``Trainer`` for 50 steps. A callback
   placed first and one placed last bracket the stack's ``on_before_optimizer_step``; inside the bracket
   ``torch.cuda.set_sync_debug_mode("warn")`` reports every host-device synchronisation. Expected: none on
   non-logging steps except the guard's one documented read (and none at all without the guard). On any
   device the bracket also counts host reads (``.item()``/``.tolist()``/``bool()``) with a ``TorchFunctionMode``.
2. **Precision.** ``bf16-mixed`` and ``16-mixed`` (GradScaler): weights finite, and ``GradientClipping(0.5)``
   gives the weights of Lightning's ``Trainer(gradient_clip_val=0.5)``.
3. **Overhead.** The stack's per-step work (one gradient pass, the percentile policy, the clip, the guard's
   read) against ``torch.nn.utils.clip_grad_norm_(foreach=True)`` at ~1B fp32 parameters in ~300 and ~3000
   tensors, interleaved rounds, medians. Target: at most 1.05x.
4. **Device percentile backend.** Microseconds per ``PercentileThreshold(backend="device")`` call at history
   10 and 1e5.
5. **ARC comm hook on CUDA tensors.** ``ddp_arc``'s hook in 2 processes on the one GPU over gloo, and over NCCL
   with world size 1: the futures complete and the averaged gradients equal the same run on CPU tensors.
6. **FSDP1** (Lightning ``strategy="fsdp"``, world size 1): ``GradientClipping(0.5)`` gives the weights of
   Lightning's own ``gradient_clip_val=0.5`` under FSDP.

Without CUDA the CUDA-only rows are skipped with a clear message and the rest run on CPU at small sizes
(so the script itself is tested on every machine).

Usage (from the repository root)::

    python -m benchmarks.gpu            # on a GPU machine: the full sizes (~1B parameters)
    python -m benchmarks.gpu --quick    # small sizes, a smoke run (CPU or GPU)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from benchmarks.common import (
    ARCConfig,
    ARCHookState,
    add_output_arguments,
    arc_hook,
    clip_grads_with_norm_,
    command_line,
    gradient_stats,
    machine,
    md_table,
    output_dir,
    run_ranks,
    write_results,
)

CUDA = torch.cuda.is_available()
NO_CUDA = "skipped: CUDA is not available on this machine"
Row = tuple[str, str, str]  # (section, check, result)
Precision = Literal["bf16-mixed", "16-mixed"]  # the Trainer precisions section 2 compares


def _device() -> torch.device:
    return torch.device("cuda", 0) if CUDA else torch.device("cpu")


# ------------------------------------------------------------------------------------------- 1. sync check


class _Reads(torch.overrides.TorchFunctionMode):
    NAMES = {"item", "tolist", "__bool__", "__float__", "__int__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model(device: torch.device, width: int = 64) -> Any:
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                     nn.Linear(width, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x).float(), y)
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)  # logged, not read here
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Net()


def _loader(n: int = 512) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = x[:, :4].sum(dim=1, keepdim=True) ** 2
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def sync_check(steps: int) -> list[Row]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_clip import GradientClipping, GradientNormMonitor, NonFiniteGradientGuard, PercentileThreshold

    rows: list[Row] = []
    for with_guard in (True, False):
        per_step: list[tuple[int, int, bool]] = []  # (host reads, syncs, logging step)

        class Open(pl.Callback):
            def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
                self.reads = _Reads()
                self.reads.__enter__()
                self.caught = warnings.catch_warnings(record=True)
                self.log = self.caught.__enter__()
                warnings.simplefilter("always")
                if CUDA:
                    torch.cuda.set_sync_debug_mode("warn")

        class Close(pl.Callback):
            def __init__(self, opened: Open, per_step: list[tuple[int, int, bool]]) -> None:
                self.opened, self.per_step = opened, per_step

            def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
                if CUDA:
                    torch.cuda.set_sync_debug_mode("default")
                self.opened.caught.__exit__(None, None, None)
                self.opened.reads.__exit__(None, None, None)
                syncs = sum("synchroniz" in str(w.message) for w in self.opened.log)
                logging = bool(trainer._logger_connector.should_update_logs)
                self.per_step.append((self.opened.reads.count, syncs, logging))

        opened = Open()
        stack = [GradientNormMonitor(per_parameter=True),
                 GradientClipping(PercentileThreshold(warmup_steps=5, backend="device"))]
        if with_guard:
            stack.append(NonFiniteGradientGuard("skip"))
        out = Path(os.environ.get("GPU_BENCH_TMP", "/tmp")) / "lightning_clip_gpu_logs"
        trainer = pl.Trainer(accelerator="gpu" if CUDA else "cpu", devices=1, max_steps=steps,
                             log_every_n_steps=25, logger=CSVLogger(str(out)), callbacks=[opened, *stack,
                                                                                           Close(opened, per_step)],
                             enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(_model(_device()), _loader())
        plain = [(r, s) for r, s, logging in per_step if not logging]
        logged = [(r, s) for r, s, logging in per_step if logging]
        label = "stack with guard" if with_guard else "stack without guard"
        expected = 1 if with_guard else 0
        reads = sorted({r for r, _ in plain})
        syncs = sorted({s for _, s in plain})
        verdict_reads = "ok" if reads == [expected] else "UNEXPECTED"
        rows.append(("1 sync", f"{label}: host reads per non-logging step ({len(plain)} steps)",
                     f"{reads} (expected [{expected}]{': the guard' + chr(39) + 's one read' if with_guard else ''}) "
                     f"{verdict_reads}"))
        if CUDA:
            verdict = "ok" if syncs == [expected] else "UNEXPECTED"
            rows.append(("1 sync", f"{label}: CUDA syncs per non-logging step", f"{syncs} (expected [{expected}]) "
                         f"{verdict}"))
            rows.append(("1 sync", f"{label}: CUDA syncs per logging step ({len(logged)} steps)",
                         f"{sorted({s for _, s in logged})} (logging reads the values once)"))
        else:
            rows.append(("1 sync", f"{label}: CUDA syncs", NO_CUDA))
    return rows


# ------------------------------------------------------------------------------------------- 2. precision


def _fit_weights(precision: Precision, clip: str, steps: int) -> torch.Tensor:
    import lightning.pytorch as pl

    from lightning_clip import GradientClipping

    pl.seed_everything(0, verbose=False)
    callbacks: list[pl.Callback] = [GradientClipping(0.5)] if clip == "ours" else []
    trainer = pl.Trainer(accelerator="gpu" if CUDA else "cpu", devices=1, max_steps=steps, precision=precision,
                         gradient_clip_val=0.5 if clip == "lightning" else None, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    model = _model(_device())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, _loader())
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])


def precision_check(steps: int) -> list[Row]:
    rows: list[Row] = []
    precisions: tuple[Precision, ...] = ("bf16-mixed", "16-mixed")
    for precision in precisions:
        if precision == "16-mixed" and not CUDA:
            rows.append(("2 precision", "16-mixed (GradScaler)", NO_CUDA))
            continue
        ours, theirs = _fit_weights(precision, "ours", steps), _fit_weights(precision, "lightning", steps)
        finite = bool(torch.isfinite(ours).all())
        diff = float((ours - theirs).abs().max())
        rows.append(("2 precision", f"{precision}: weights finite; max |ours - gradient_clip_val|",
                     f"{finite}; {diff:.3g} {'ok' if finite and diff <= 1e-6 else 'DIFFERS'}"))
    return rows


# ------------------------------------------------------------------------------------------- 3. overhead


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _time_stack(n: int, numel: int, rounds: int) -> tuple[float, float]:
    """Medians (s) of torch's clip_grad_norm_ and of the stack's per-step work on ``n`` gradients of ``numel``."""
    from lightning_clip import PercentileThreshold

    device = _device()
    params = [nn.Parameter(torch.empty(numel, device=device)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(numel, device=device)
    grads = [p.grad for p in params if p.grad is not None]
    policy = PercentileThreshold(warmup_steps=0, backend="device")

    def ours() -> None:
        stats = gradient_stats(grads)
        threshold = policy(stats.total_norm)
        clip_grads_with_norm_(grads, threshold, stats.total_norm)
        bool(stats.finite)  # the guard's one read

    def torch_clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1e30, foreach=True)

    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for r in range(rounds + 2):  # interleaved, alternating order; the first two rounds warm up
        order = (("ours", ours), ("torch", torch_clip)) if r % 2 else (("torch", torch_clip), ("ours", ours))
        for name, fn in order:
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            if r >= 2:
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["torch"]), statistics.median(times["ours"])


def overhead(total: int, counts: tuple[int, ...], rounds: int) -> list[Row]:
    rows: list[Row] = []
    for n in counts:
        numel = total // n
        t_torch, t_ours = _time_stack(n, numel, rounds)
        if CUDA:
            torch.cuda.empty_cache()
        rows.append(("3 overhead", f"{n} tensors x {numel:,} ({n * numel / 1e9:.3g}B params): torch clip_grad_norm_ "
                     f"/ full stack [ms]", f"{1e3 * t_torch:.2f} / {1e3 * t_ours:.2f} = {t_ours / t_torch:.3f}x "
                     f"({'ok' if t_ours / t_torch <= 1.05 else 'above 1.05x'}; {'GPU' if CUDA else 'CPU'})"))
    return rows


# ------------------------------------------------------------------------------------------- 4. device percentile


def percentile_backend(big: int, calls: int) -> list[Row]:
    from lightning_clip import PercentileThreshold

    device = _device()
    rows: list[Row] = []
    g = torch.Generator().manual_seed(0)
    for history in (10, big):
        policy = PercentileThreshold(warmup_steps=0, backend="device")
        norms = (torch.rand(history + calls, generator=g) + 0.5).to(device)
        for i in range(history):  # fill the history through the policy itself
            policy(norms[i])
        _sync()
        start = time.perf_counter()
        for i in range(history, history + calls):
            policy(norms[i])
        _sync()
        us = 1e6 * (time.perf_counter() - start) / calls
        rows.append(("4 percentile", f"device backend, history {history:,}: us per call",
                     f"{us:.1f} ({'GPU' if CUDA else 'CPU'})"))
    return rows


# ------------------------------------------------------------------------------------------- 5. comm hook


def _hook_worker(rank: int, world: int, device_type: str) -> torch.Tensor:
    """One backward through ``ddp_arc``'s hook; this rank's averaged gradients (on the CPU)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(device)
    model = DDP(net, device_ids=[0] if device_type == "cuda" else None)
    state = ARCHookState(ARCConfig(num_byzantine=0 if world < 3 else 1, static_clip=0.5))
    model.register_comm_hook(state, arc_hook)
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(4, 8, generator=g).to(device), torch.randn(4, 1, generator=g).to(device)
    nn.functional.mse_loss(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1).cpu() for p in net.parameters() if p.grad is not None])


def comm_hook() -> list[Row]:
    rows: list[Row] = []
    cpu = run_ranks(_hook_worker, 2, ("cpu",), threads=None)
    rows.append(("5 comm hook", "gloo, 2 processes, CPU tensors: ranks agree", str(torch.equal(cpu[0], cpu[1]))))
    if not CUDA:
        rows.append(("5 comm hook", "gloo, 2 processes on one GPU; NCCL world size 1", NO_CUDA))
        return rows
    gpu = run_ranks(_hook_worker, 2, ("cuda",), threads=None)
    diff = max(float((a - b).abs().max()) for a, b in zip(gpu, cpu))
    rows.append(("5 comm hook", "gloo, 2 processes on one GPU: futures complete; max |GPU - CPU|",
                 f"yes; {diff:.3g} {'ok' if diff <= 1e-5 else 'DIFFERS'}"))
    (a,) = run_ranks(_hook_worker, 1, ("cuda",), backend="nccl", threads=None)
    (b,) = run_ranks(_hook_worker, 1, ("cpu",), threads=None)
    diff = float((a - b).abs().max())
    rows.append(("5 comm hook", "NCCL, world size 1: futures complete; max |GPU - CPU|",
                 f"yes; {diff:.3g} {'ok' if diff <= 1e-5 else 'DIFFERS'}"))
    return rows


# ------------------------------------------------------------------------------------------- 6. FSDP1


def fsdp1(steps: int) -> list[Row]:
    if not CUDA:
        return [("6 FSDP1", "strategy='fsdp', world size 1", NO_CUDA)]
    import lightning.pytorch as pl

    from lightning_clip import GradientClipping

    weights = {}
    for clip in ("ours", "lightning"):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(accelerator="gpu", devices=1, strategy="fsdp", max_steps=steps, logger=False,
                             gradient_clip_val=0.5 if clip == "lightning" else None,
                             callbacks=[GradientClipping(0.5)] if clip == "ours" else [],
                             enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
        model = _model(_device())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, _loader())
        weights[clip] = torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])
    diff = float((weights["ours"] - weights["lightning"]).abs().max())
    return [("6 FSDP1", "strategy='fsdp', world size 1: max |ours - gradient_clip_val| after "
             f"{steps} steps", f"{diff:.3g} {'ok' if diff <= 1e-6 else 'DIFFERS'}")]


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser, "small sizes (a smoke run; CPU or GPU)")
    args = parser.parse_args(argv)
    out = output_dir(args.out, args.quick, "gpu")
    os.environ.setdefault("GPU_BENCH_TMP", out)
    big = args.quick or not CUDA
    device_name = torch.cuda.get_device_name(0) if CUDA else "none (CPU only)"
    print(f"machine: {machine()}; GPU: {device_name}", flush=True)
    if not CUDA:
        print("CUDA is not available: the CUDA-only checks are skipped; the others run on CPU at small sizes.",
              flush=True)
    start = time.perf_counter()
    rows: list[Row] = []
    sections = [
        lambda: sync_check(50),
        lambda: precision_check(20),
        lambda: overhead(3_000_000 if big else 1_000_000_000, (300, 3000), 5 if big else 20),
        lambda: percentile_backend(1000 if big else 100_000, 200 if big else 1000),
        comm_hook,
        lambda: fsdp1(20),
    ]
    for section in sections:
        try:
            rows += section()
        except Exception as exc:  # noqa: BLE001 - one failing section must not hide the others' numbers
            rows.append(("error", type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else ""))
        print(rows[-1], flush=True)
    lines = [
        "# lightning_clip on GPU: sync check, precision, overhead, device percentile, comm hook, FSDP1",
        "",
        f"Command: `{command_line('gpu', argv)}`",
        "",
        f"Machine: {machine()}; GPU: {device_name}. Wall time {time.perf_counter() - start:.0f} s.",
        "",
        md_table(["section", "check", "result"], rows),
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    path = os.path.join(out, "gpu.md")
    write_results(path, text)
    print(f"wrote {path}", flush=True)
    return rows


if __name__ == "__main__":
    main()
