"""The run's memory, phase by phase: output_dir/memory_phases.json.

    load          the models loaded, the LoRA added, every weight in its run dtype
    caching       text embeddings / latents encoded (the encoders on the device only if
                  entries were missing; the denoiser off it meanwhile)
    first step    the first optimizer step of this process
    train         the steps since the last record
    sample sheet  one sheet rendered (recorded while the models it needs are on the device)
    checkpoint    one checkpoint written
    final save    final_model/ written

Each record holds where every model is (on the training device or the host) and in which
dtype, as the backend reports it (backends/placement.py), the peak reserved and allocated
GPU memory since the record before (CUDA only), and the process's resident host memory now
and at its peak so far. The file is rewritten at each record (temp name, rename), so a run
stopped by an out-of-memory error still leaves what came before.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from ..backends.lora_files import atomic_write_text

LOG_NAME = "memory_phases.json"
GIB = 2**30


def host_rss() -> tuple[float, float]:
    """(resident now, peak resident so far) of this process, in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # no /proc (macOS): the peak is what there is
        now = peak
    return now / GIB, max(now, peak) / GIB


class MemoryLog:
    def __init__(self, output_dir: Path, device: torch.device, main: bool):
        self.path = Path(output_dir) / LOG_NAME
        self.cuda = torch.device(device).type == "cuda"
        self.main = main
        self.records: list[dict] = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def record(self, phase: str, backend, step: int) -> dict:
        now, peak = host_rss()
        entry = {"phase": phase, "step": step, "models": backend.placement(),
                 "host_rss_gib": round(now, 3), "host_peak_rss_gib": round(peak, 3)}
        if self.cuda:
            entry["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
            entry["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            torch.cuda.reset_peak_memory_stats()
        self.records.append(entry)
        if self.main:
            atomic_write_text(json.dumps(self.records, indent=1), self.path)
        return entry
