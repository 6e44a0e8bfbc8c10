"""What every spawned gloo worker of the tests shares (no Lightning import: the children load this file)."""

from __future__ import annotations

import torch.distributed as dist


def close_group() -> None:
    """End a worker that succeeded: a barrier, then ``destroy_process_group`` (nothing if no group is set up).

    Without the barrier a rank could tear down its gloo pairs while a peer's last collective, or gloo's
    worker threads, still use them; left to the interpreter's exit (Lightning's ``atexit`` handler), gloo's
    threads can outlive the objects they hold. Either way the process aborts at exit ("terminate called
    without an active exception"), seen with FSDP2 on gloo.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
