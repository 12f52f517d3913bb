"""How many threads a CPU run computes with, when the user has not said (OMP_NUM_THREADS).

torch starts one OpenMP thread per core. Threads that wait on each other spin, so on a
machine whose cores are busy with other work, or with the tiny test models whose ops are too
small to share out, more threads make a run many times slower: a 10-step tiny run on a busy
2-core machine took 2:54 with the default threads and 0:11 with one.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def cpu_threads(cores: int, busy: float, tiny: bool, default: int) -> int:
    """Threads for a CPU run: one for the tiny models; else torch's default (one per
    physical core), less the cores other work keeps busy (`busy`, the 1-minute load average)."""
    if tiny:
        return 1
    return max(1, min(default, cores - round(busy)))


def set_cpu_threads(model_id: str, device) -> None:
    """On a CPU run without OMP_NUM_THREADS, set torch's thread count and say so in one line."""
    import torch

    from .backends.tiny import is_tiny

    if str(device).split(":")[0] != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = cpu_threads(cores, busy, is_tiny(model_id), torch.get_num_threads())
    torch.set_num_threads(threads)
    why = "the tiny models gain nothing from more" if is_tiny(model_id) else f"{cores} cores, load {busy:.1f}"
    logger.info("CPU run: %d thread(s) (%s); set OMP_NUM_THREADS to choose", threads, why)
