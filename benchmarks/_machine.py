"""What the benchmark scripts share about the machine: its one-line description and a free local port."""

from __future__ import annotations

import os
import platform
import socket


def machine() -> str:
    """nproc, CPU model, torch/Lightning/Python versions and OS."""
    import lightning
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"nproc={os.cpu_count()}, CPU: {cpu}, torch {torch.__version__}, lightning {lightning.__version__}, "
            f"Python {platform.python_version()}, {platform.system()}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a gloo process group's ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
