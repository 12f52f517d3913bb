"""The GPU suite's multi-GPU rows (gpu_suite.py): DDP against FSDP2 (--distributed fsdp) on
every GPU of the machine, each run launched by torchrun as a user's `accelerate launch` would,
its step time from train_log.jsonl and its rank-0 memory per phase from memory_phases.json.

    SDXL concat bs 1 per GPU, 1024²    DDP and FSDP2: the step-time price of sharding a LoRA
                                       whose base fits one card
    FLUX.1-dev bf16 (unquantized),     DDP and FSDP2: what sharding saves per GPU on the
    context shared, 1024²              base that does not fit a 16 GB card

Run only with two GPUs or more (else the report says why none ran); `--tiny --processes 2`
runs the same launches with the tiny models on two CPU processes (gloo), as the test does.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # the first step (allocation, the first gathers) is left out of the step time


def runs(tiny: bool) -> list[dict]:
    side = "64" if tiny else "1024"
    common = ["--grid", "2x2", "--image_size", side, "--batch_size", "1", "--gradient_checkpointing",
              "--cache_text_embeddings", "--cache_latents", "--max_train_steps", str(STEPS), "--save_every", str(STEPS),
              "--lr_warmup_steps", "0"]
    bf16 = [] if tiny else ["--mixed_precision", "bf16"]  # the same precision for both: FSDP refuses fp16
    sdxl = [*common, *bf16, "--conditioning", "concat", "--lora_rank", "64"]
    flux = [*common, *bf16, "--conditioning", "context", "--context_timestep", "shared", "--lora_rank", "16"]
    return [{"name": f"{model} {mode}", "model": model, "flags": [*flags, "--distributed", mode]}
            for model, flags in (("sdxl", sdxl), ("flux", flux)) for mode in ("ddp", "fsdp")]


def run_one(spec: dict, folders: dict, data: Path, work: Path, processes: int, tiny: bool) -> dict:
    out = work / "multi" / spec["name"].replace(" ", "_")
    argv = ["--data_dir", str(data), "--output_dir", str(out), "--overwrite_output_dir", "--backend", spec["model"],
            "--model_id", str(folders[spec["model"]]), *spec["flags"]]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(ROOT / "src" / "training" / f"train_{spec['model']}_ic_lora.py"), *argv]
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "1"} if tiny else {})}
    print(f"[{spec['name']} x{processes}] {' '.join(command[2:])}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    row = {"name": spec["name"], "processes": processes, "argv": argv}
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        row["error"] = (errors or done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return row
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    times = [b["seconds"] - a["seconds"] for a, b in zip(log[1:], log[2:])]
    row["s_per_step"] = round(statistics.median(times), 4) if times else None
    phases = json.loads((out / "memory_phases.json").read_text())
    peaks = [r["gpu_peak_reserved_gib"] for r in phases if "gpu_peak_reserved_gib" in r]
    row["rank0_gpu_peak_reserved_gib"] = max(peaks) if peaks else None
    row["rank0_host_peak_rss_gib"] = max(r["host_peak_rss_gib"] for r in phases)
    return row


def measure(folders: dict, data: Path, work: Path, processes: int, tiny: bool, only: list[str] | None = None) -> dict:
    """Every run of `runs` (those whose name holds a word of `only`) on `processes` processes,
    or why none ran."""
    if processes < 2:
        return {"skipped": f"{processes} GPU(s): DDP and FSDP2 need two or more", "rows": []}
    specs = [s for s in runs(tiny) if not only or any(word in s["name"] for word in only)]
    return {"rows": [run_one(spec, folders, data, work, processes, tiny) for spec in specs]}


def render(section: dict) -> list[str]:
    if "skipped" in section:
        return ["", f"multi-GPU rows: not run ({section['skipped']})"]
    lines = ["", "| multi-GPU run | processes | s/step | rank 0 GPU peak resv GiB | rank 0 host peak GiB |",
             "|---|---|---|---|---|"]
    for row in section["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['processes']} | error: {row['error']} | | |")
            continue
        gpu = row["rank0_gpu_peak_reserved_gib"]
        lines.append(f"| {row['name']} | {row['processes']} | {row['s_per_step']} | {'—' if gpu is None else gpu} | "
                     f"{row['rank0_host_peak_rss_gib']} |")
    return lines
