"""What every spawned gloo worker of the tests shares (no Lightning import: the children load this file)."""

from __future__ import annotations

import torch.distributed as dist


def close_group() -> None:
    """End a worker that succeeded: a barrier, then ``destroy_process_group``.

    Without the barrier a rank could tear down its gloo pairs while a peer's last collective, or gloo's
    worker threads, still use them; the process then aborts at exit ("terminate called without an active
    exception").
    """
    dist.barrier()
    dist.destroy_process_group()
