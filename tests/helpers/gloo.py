"""What every spawned gloo worker of the tests shares (no Lightning import: the children load this file)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

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


def end_sharded_worker() -> NoReturn:
    """End a spawned FSDP2 / DTensor worker that succeeded: :func:`close_group`, then leave the process at once.

    Its results are saved before this. ``os._exit`` skips the interpreter's finalization, where threads of
    gloo and FSDP2 still alive can abort the process ("terminate called without an active exception") after
    it has done its work; the parent then reads a crash that says nothing about the code under test.
    """
    close_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
