"""Pretrain toy base denoisers for the harder known-answer toy (benchmarks/hard_toy.py).

    python benchmarks/fit_hard_toy.py --backend sdxl     # ~10 min on 2 CPU cores
    python benchmarks/fit_hard_toy.py --backend flux     # ~15 min
    python benchmarks/fit_hard_toy.py --backend flux2    # FLUX.2 [klein] layout (fit_toy_flux2.py)
    python benchmarks/fit_hard_toy.py --backend sdxl --steps 20 --out /tmp/x   # smoke run
    python benchmarks/fit_hard_toy.py --backend sdxl --layers_per_block 2 --seed 1 \
        --background per_composite --object_scale 0.2,0.5 --out /tmp/y    # another base

known_answer_dist.py fits a whole distribution of such bases through `main`.

As fit_toy_base.py / fit_toy_flux.py (same architectures, the same toy VAE, every weight
trained), but on composites of *independent* hard-toy panels (any RGB colour, shape, size
and place per panel), half of the batches 2x2 (128 x 128) and half 1x3 (64 x 192), so the
base draws any object anywhere in either layout and knows no relation between panels.
The FLUX base has the FLUX.1-dev layout (blend and context conditioning); the FLUX.2 base the
[klein] base layout (32 -> here 4 latent channels patchified 2x2, batch-norm normalised by the
toy VAE's measured statistics, the tiny Qwen3's stacked hidden states as text).

Writes benchmarks/assets/toy_{sdxl_unet,flux_transformer,flux2_transformer}_hard/ (float16 weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

from fit_toy_base import TOY_VAE, draw_batch, fit_all_weights, make_base_model  # noqa: E402
from fit_toy_flux import make_flux_base_model  # noqa: E402
from fit_toy_flux2 import make_flux2_base_model  # noqa: E402
from hard_toy import caption, independent_pool, toy_arguments, toy_from_args  # noqa: E402

from iclora.panels import Grid  # noqa: E402

HARD_BASES = {"sdxl": HERE / "assets" / "toy_sdxl_unet_hard", "flux": HERE / "assets" / "toy_flux_transformer_hard",
              "flux2": HERE / "assets" / "toy_flux2_transformer_hard"}
GRIDS = (Grid(2, 2), Grid(1, 3))
DEFAULT_STEPS = {"sdxl": 4000, "flux": 2000, "flux2": 2000}
DEFAULT_BATCH = {"sdxl": 16, "flux": 8, "flux2": 8}


def fit(backend, pools: list[tuple[torch.Tensor, Grid]], steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Alternate batches between the layouts' latent pools."""
    generator = torch.Generator().manual_seed(seed)
    latent_pools = []
    for images, grid in pools:
        latents = torch.cat([backend.encode_image(images[i:i + 64]) for i in range(0, len(images), 64)])
        embeds = {c: backend.encode_prompt([c]) for c in ["", caption(grid)]}
        height, width = images.shape[-2:]
        micro = {"original_size": torch.tensor([[height, width]]).expand(batch_size, 2),  # SDXL time ids
                 "crop_top_left": torch.zeros(batch_size, 2, dtype=torch.long)}
        latent_pools.append((latents, embeds, micro))
    step = iter(range(10**9))

    def step_loss() -> torch.Tensor:
        latents_pool, embeds, micro = latent_pools[next(step) % len(latent_pools)]
        _, _, latents, prompt = draw_batch(latents_pool, embeds, batch_size, generator)
        noise = torch.randn(latents.shape, generator=generator)
        noisy, timesteps, target = backend.noise_latents(latents, noise, generator)
        return F.mse_loss(backend.predict(noisy, timesteps, prompt, None, None, micro), target)

    return fit_all_weights(backend.denoiser, steps, lr, step_loss)


def make_sdxl_variant(folder: Path, layers_per_block: int, init_seed: int) -> None:
    """Replace the random UNet of a base folder by one with `layers_per_block` ResNet blocks
    per stage (the tiny SDXL has 1), initialised from `init_seed`. The defaults (1, 0) keep
    the tiny SDXL's own UNet, so the shipped hard base refits as it was."""
    if (layers_per_block, init_seed) == (1, 0):
        return
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(folder / "unet"), layers_per_block=layers_per_block)
    torch.manual_seed(init_seed)
    unet = UNet2DConditionModel.from_config(config)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sdxl", "flux", "flux2"], required=True)
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/assets/toy_*_hard)")
    parser.add_argument("--vae", default=str(TOY_VAE))
    parser.add_argument("--steps", type=int, default=None, help=f"AdamW steps (default: {DEFAULT_STEPS})")
    parser.add_argument("--pool", type=int, default=1024, help="distinct training images per layout")
    parser.add_argument("--batch_size", type=int, default=None, help=f"default: {DEFAULT_BATCH}")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--layers_per_block", type=int, default=1, help="SDXL: ResNet blocks per UNet stage")
    parser.add_argument("--flux_blocks", default="2,4", help="FLUX / FLUX.2: DOUBLE,SINGLE transformer block counts")
    toy_arguments(parser)
    args = parser.parse_args(argv)
    toy = toy_from_args(parser, args)
    try:
        blocks = tuple(int(x) for x in args.flux_blocks.split(","))
        assert len(blocks) == 2 and min(blocks) >= 0 and sum(blocks) > 0
    except (ValueError, AssertionError):
        parser.error(f"--flux_blocks must be DOUBLE,SINGLE block counts, got {args.flux_blocks!r}")
    if args.layers_per_block < 1:
        parser.error(f"--layers_per_block must be at least 1, got {args.layers_per_block}")
    steps = args.steps or DEFAULT_STEPS[args.backend]
    batch_size = args.batch_size or DEFAULT_BATCH[args.backend]
    out = Path(args.out) if args.out else HARD_BASES[args.backend]
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    from diffusers.utils import logging as diffusers_logging

    from iclora.backends import load_backend

    diffusers_logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="fit_hard_toy_"))
    try:
        if args.backend == "flux":
            folder = make_flux_base_model(work / "base", "blend", Path(args.vae), blocks=blocks, init_seed=args.seed)
        elif args.backend == "flux2":
            folder = make_flux2_base_model(work / "base", Path(args.vae), blocks=blocks, init_seed=args.seed)
        else:
            folder = make_base_model(work / "base", Path(args.vae), unet_dir=None)
            make_sdxl_variant(folder, args.layers_per_block, args.seed)
        backend = load_backend(args.backend, str(folder), "blend")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # every component is in memory now
    start = time.monotonic()
    rng = np.random.default_rng(args.seed)
    pools = [(independent_pool(args.pool, rng, grid, toy), grid) for grid in GRIDS]
    losses = fit(backend, pools, steps, batch_size, args.lr, args.seed)
    seconds = time.monotonic() - start
    report = {"seconds": round(seconds, 1), "final_loss": float(np.mean(losses[-100:])), "steps": steps,
              "batch_size": batch_size, "pool": args.pool, "lr": args.lr, "seed": args.seed,
              "grids": [str(g) for g in GRIDS], "toy": asdict(toy),
              **({"layers_per_block": args.layers_per_block} if args.backend == "sdxl" else {"flux_blocks": list(blocks)})}
    # Written under a temporary name, then renamed: a fit cut short leaves no half base behind.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    backend.denoiser.to(torch.float16).save_pretrained(partial)
    (partial / "fit_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    print(f"saved {out}: {json.dumps(report)}")
    return report


if __name__ == "__main__":
    main()
