"""Host-side cost of our training step on the CPU: where a tiny SDXL step's time goes.

    python benchmarks/host_profile.py                          # blend, ~1 min on 2 cores
    python benchmarks/host_profile.py --conditioning context --steps 80

The real trainer (Trainer.setup / train, as train_sdxl_ic_lora.py runs it) on the tiny SDXL
with cached text embeddings and latents, batch 2, 128 px composites (data/sample), rank 8,
one CPU thread. Two runs of the same settings:

  1. unprofiled: the mean seconds per step from train_log.jsonl (warm-up steps dropped);
  2. under cProfile: each cost's cumulative time per step (all steps; the profiler's own
     overhead inflates Python-heavy code, so compare rows, not absolute times, with run 1).

The rows split the step into the denoiser's own work (UNet forward, backward, AdamW) and
what is ours around it: data loading, per-step RNG set-up, panel masks, cache reads, the
loss math, the denoiser's inputs, clipping and finite checks, the loop's bookkeeping.

At 128 px the host work that grows with the image is small; a last table times it at 1024 px,
batch 4, 2x2 panels: a batch's samples decoded (what a step with cached latents paid before
it stopped decoding them) or not, and the panel masks built at pixel size then area-averaged
(panel_mask + latent_mask, as before) or built at latent size (panel_masks, as now).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

if __package__ in (None, ""):  # run by path from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from _bootstrap import ensure_package

    sys.path.pop(0)
    ensure_package()

from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (row, [(file suffix, function)], [(file suffix, function)] subtracted): cumulative times.
ROWS = [
    ("UNet forward", [("unet_2d_condition.py", "forward")], []),
    ("backward", [("graph.py", "_engine_run_backward")], []),
    ("AdamW step", [("adam.py", "step")], []),
    ("data loading (dataset, collate)", [("iclora/data.py", "__getitem__"), ("iclora/data.py", "collate")], []),
    ("RNG set-up (step generator, global reseed)", [("trainer.py", "step_generator"), ("random.py", "manual_seed")], []),
    ("panel masks (sample, build, to latent size)", [("panels.py", "sample_masked_panels"), ("panels.py", "panel_mask"),
                                                    ("panels.py", "panel_masks"), ("panels.py", "latent_mask")], []),
    ("cache reads (text, latents)", [("cache.py", "batch"), ("cache.py", "latents"), ("cache.py", "masked_latents")], []),
    ("loss math (noise, timesteps, masked MSE)", [("trainer.py", "diffusion_loss")], [("sdxl.py", "predict")]),
    ("denoiser inputs (time ids, casts)", [("sdxl.py", "predict")], [("unet_2d_condition.py", "forward")]),
    ("clip + finite checks", [("accelerator.py", "clip_grad_norm_"), ("guards.py", "agree")], []),
    ("loop bookkeeping (loss log, progress bar, gather)", [("monitor.py", "step"), ("std.py", "update"),
                                                           ("std.py", "set_postfix"), ("accelerator.py", "gather")], []),
]


def trainer_for(args, out: Path):
    from iclora.cli import parse_config
    from iclora.training.config import TrainConfig
    from iclora.training.train_sdxl_ic_lora import DEFAULTS
    from iclora.training.trainer import Trainer

    argv = ["--data_dir", str(ROOT / "data" / "sample"), "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"),
            "--model_id", "tiny-sdxl", "--conditioning", args.conditioning, "--cache_text_embeddings", "--cache_latents",
            "--batch_size", "2", "--image_size", "128", "--lora_rank", "8", "--lora_alpha", "8",
            "--max_train_steps", str(args.warmup + args.steps), "--save_every", "100000", "--no_output_kohya_format"]
    trainer = Trainer(parse_config(TrainConfig, argv, prog="host_profile.py", defaults=DEFAULTS))
    trainer.setup()
    return trainer


def step_seconds(out: Path, warmup: int) -> float:
    seconds = [json.loads(line)["seconds"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    return (seconds[-1] - seconds[warmup - 1]) / (len(seconds) - warmup)  # (the log has ms resolution)


def cumulative(stats: pstats.Stats, suffix: str, function: str) -> float:
    return sum(ct for (file, _, name), (_, _, _, ct, _) in stats.stats.items()
               if name == function and file.endswith(suffix))


def full_size_costs(folder: Path) -> dict[str, float]:
    """Milliseconds per batch of 4 at 1024 px (see the module docstring)."""
    import numpy as np
    from PIL import Image

    from iclora.data import CompositeDataset, Record, collate
    from iclora.panels import Grid, latent_mask, panel_mask, panel_masks

    image = folder / "composite.png"
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).resize((1024, 1024), Image.Resampling.BICUBIC).save(image)  # photo-like PNG size
    records = [Record(image, "a caption", (1024, 1024), (1024, 1024))] * 4
    grid, subsets = Grid(2, 2), [(1, 2), (3,), (0, 1), (0, 1, 2, 3)]

    def ms(fn, repeat: int) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat * 1e3

    decoded, undecoded = CompositeDataset(records), CompositeDataset(records, pixels=False)
    return {
        "4 samples, decoded": ms(lambda: collate([decoded[i] for i in range(4)]), 5),
        "4 samples, not decoded": ms(lambda: collate([undecoded[i] for i in range(4)]), 50),
        "4 masks at 1024 px, area-averaged to 128": ms(
            lambda: latent_mask(torch.stack([panel_mask(list(s), grid, 1024, 1024) for s in subsets]), 8), 10),
        "4 masks at 128 px": ms(lambda: panel_masks(subsets, grid, 128, 128), 50),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditioning", choices=["blend", "context", "concat"], default="blend")
    parser.add_argument("--steps", type=int, default=60, help="steps measured (default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped from the unprofiled median (default 5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "plain"
        trainer_for(args, plain).train()
        mean = step_seconds(plain, args.warmup)
        trainer = trainer_for(args, Path(folder) / "profiled")
        profile = cProfile.Profile()
        profile.runcall(trainer.train)
        full = full_size_costs(Path(folder))
    stats = pstats.Stats(profile)
    steps = args.warmup + args.steps
    loop = cumulative(stats, "trainer.py", "_loop") / steps
    rows = {}
    for name, added, subtracted in ROWS:
        rows[name] = (sum(cumulative(stats, *f) for f in added) - sum(cumulative(stats, *f) for f in subtracted)) / steps
    rows["the rest of the loop (our Python, accelerate)"] = loop - sum(rows.values())
    print(f"tiny SDXL, --conditioning {args.conditioning}, cached text and latents, batch 2, 128 px, rank 8, 1 thread")
    print(f"unprofiled: {mean * 1e3:.1f} ms/step (mean of {args.steps} steps after {args.warmup})")
    print(f"profiled:   {loop * 1e3:.1f} ms/step in the loop\n")
    print("| cost | ms/step (profiled) | share |\n|---|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / loop:.1%} |")
    print("\n| at 1024 px, batch 4 | ms |\n|---|---:|")
    for name, ms in full.items():
        print(f"| {name} | {ms:.2f} |")
    return {"ms_per_step": mean * 1e3, "profiled_ms_per_step": loop * 1e3,
            "rows": {k: v * 1e3 for k, v in rows.items()}, "full_size_ms": full}


if __name__ == "__main__":
    main()
