"""benchmarks/gpu.py runs on a CPU-only machine: its CPU-runnable checks pass, its CUDA-only ones say they skipped."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of the GPU script")
def test_gpu_script_sections_on_cpu():
    rows = gpu.sync_check(30) + gpu.precision_check(4) + gpu.overhead(60_000, (30,), 2) + \
        gpu.percentile_backend(50, 5) + gpu.fsdp1(2)
    results = {check: result for _, check, result in rows}
    reads = [r for c, r in results.items() if "host reads per non-logging step" in c]
    assert len(reads) == 2 and all(r.endswith(" ok") for r in reads), reads  # one read with the guard, none without
    assert results["bf16-mixed: weights finite; max |ours - gradient_clip_val|"].endswith(" ok")
    skipped = [c for c, r in results.items() if r == gpu.NO_CUDA]
    assert any("16-mixed" in c for c in skipped) and any("FSDP1" in c or "fsdp" in c for c in skipped)
    assert any("CUDA syncs" in c for c in skipped)
    assert any(c.startswith("30 tensors") and "x" in results[c] for c in results)
    assert sum("device backend, history" in c for c in results) == 2
