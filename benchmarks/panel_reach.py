"""How far a toy base's denoiser reaches across panels: of the input-gradient of its output
on the hidden panels, which share comes from the other (visible) panels?

    python benchmarks/panel_reach.py                                  # the cached SDXL and FLUX bases
    python benchmarks/panel_reach.py --only sdxl-hard --panel_sizes 64,128

Completion can only copy a colour from the visible panels if the denoiser's output on a
hidden panel depends on them. Per base and panel size (2x2 grid, panels 2 3 "hidden"), for
random latents noised to a few timesteps, it takes the gradient of a random projection of
the output on panels 2 3 with respect to the noisy input, and reports the share of its
absolute mass on panels 0 1 (0: the hidden panels are denoised from themselves alone; with
four equal panels, 0.5 would be as much from the visible panels as from the hidden ones).
No training: seconds per base on a CPU. The bases are known_answer_dist.py's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

from fit_toy_base import TOY_VAE, make_base_model  # noqa: E402
from fit_toy_flux import make_flux_base_model  # noqa: E402
from hard_toy import Toy, caption, composite, toy_arguments, toy_from_args  # noqa: E402
from known_answer_dist import ASSETS, BASES, weights  # noqa: E402

from iclora.panels import Grid, panel_box, panel_mask  # noqa: E402

GRID = Grid(2, 2)
HIDDEN, VISIBLE = [2, 3], [0, 1]


def panel_masks(size: int) -> dict[str, torch.Tensor]:
    """(1, 1, h, w) latent masks of the hidden and visible panels (8 px per latent pixel)."""
    side = 2 * size // 8
    masks = {}
    for name, panels in (("hidden", HIDDEN), ("visible", VISIBLE)):
        mask = torch.zeros(1, 1, side, side)
        for k in panels:
            left, top, right, bottom = panel_box(k, GRID, side, side)
            mask[..., top:bottom, left:right] = 1
        masks[name] = mask
    return masks


def reach(backend, toy: Toy, size: int, timesteps: list[float], samples: int, seed: int) -> dict[float, dict]:
    """Per noise level t in [0, 1], on toy composites (`toy` at panel `size`) noised to t:
    "noisy": the visible panels' share of the input-gradient mass of the hidden output in
    the noisy latents; with concat conditioning also "clean": the share of the whole
    gradient mass (noisy + masked-image channels) that flows through the masked-image
    channels, which show the visible panels clean."""
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    masks = panel_masks(size)
    prompt = backend.encode_prompt([caption(GRID)])
    micro = {"original_size": torch.tensor([[2 * size, 2 * size]]), "crop_top_left": torch.zeros(1, 2, dtype=torch.long)}
    toy = replace(toy, panel_size=size)
    images = [composite(rng, GRID, toy)[0] for _ in range(samples)]
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images])
    concat = backend.conditioning == "concat"
    with torch.no_grad():
        latents = backend.encode_image(pixels)
        if concat:
            pixel_mask = panel_mask(HIDDEN, GRID, 2 * size, 2 * size)[None].expand(samples, 1, -1, -1)
            masked_latents = backend.masked_image_latents(pixels, pixel_mask)
    out = {}
    for t in timesteps:
        shares = {"noisy": [], "clean": []}
        for i, clean in enumerate(latents[:, None]):
            noise = torch.randn(clean.shape, generator=generator)
            if backend.name == "flux":  # rectified flow, timesteps on the 0..1000 scale
                steps, noisy = torch.full((1,), 1000.0 * t), (1 - t) * clean + t * noise
            else:
                steps = torch.full((1,), int(round(999 * t)), dtype=torch.long)
                noisy = backend.noise_scheduler.add_noise(clean, noise, steps)
            noisy = noisy.detach().requires_grad_(True)
            inputs = [noisy]
            mask = context = None
            if concat:
                mask, context = masks["hidden"], masked_latents[i:i + 1].detach().requires_grad_(True)
                inputs.append(context)
            pred = backend.predict(noisy, steps, prompt, mask, context, micro)
            direction = torch.randn(pred.shape, generator=generator) * masks["hidden"]
            grads = torch.autograd.grad((pred * direction).sum(), inputs)
            mass = [g.abs().sum(1, keepdim=True) for g in grads]
            shares["noisy"].append(float((mass[0] * masks["visible"]).sum() / mass[0].sum()))
            if concat:
                shares["clean"].append(float(mass[1].sum() / (mass[0].sum() + mass[1].sum())))
        out[t] = {k: float(np.mean(v)) for k, v in shares.items() if v}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma list of known_answer_dist.py base names")
    parser.add_argument("--assets", default=str(ASSETS))
    parser.add_argument("--model", default=None, help="instead of the bases: one diffusers base folder "
                        "(e.g. known_answer_hard.py --work_dir's base/), with --backend, --conditioning, --lora")
    parser.add_argument("--backend", choices=["sdxl", "flux"], default="sdxl")
    parser.add_argument("--conditioning", choices=["blend", "concat"], default="blend")
    parser.add_argument("--lora", default=None, help="a trained LoRA folder (with --model)")
    parser.add_argument("--panel_sizes", default="64,128")
    parser.add_argument("--timesteps", default="0.3,0.6,0.9", help="noise levels in (0, 1)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    toy_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    from diffusers.utils import logging as diffusers_logging

    from iclora.backends import load_backend

    diffusers_logging.set_verbosity_error()
    sizes = [int(s) for s in args.panel_sizes.split(",")]
    timesteps = [float(t) for t in args.timesteps.split(",")]
    rows = {}

    def measure(name: str, backend, toy: Toy) -> None:
        backend.denoiser.eval().requires_grad_(False)
        for size in sizes:
            rows[(name, size)] = reach(backend, toy, size, timesteps, args.samples, args.seed)
            print(f"{name} {size} px: {rows[(name, size)]}", flush=True)

    if args.model:
        backend = load_backend(args.backend, args.model, args.conditioning)
        if args.lora:
            backend.load_lora(Path(args.lora))
        measure(Path(args.lora).parent.name if args.lora else Path(args.model).name, backend, toy_from_args(parser, args))
    else:
        wanted = set(args.only.split(",")) if args.only else None
        bases = [b for b in BASES if (wanted is None or b.name in wanted) and weights(b, Path(args.assets)).is_file()]
        with tempfile.TemporaryDirectory(prefix="panel_reach_") as work:
            for base in bases:
                folder = Path(args.assets) / base.folder
                model = (make_flux_base_model(Path(work) / base.name, "blend", TOY_VAE, folder) if base.backend == "flux"
                         else make_base_model(Path(work) / base.name, TOY_VAE, folder))
                measure(base.name, load_backend(base.backend, str(model), "blend"), base.data_toy)
    concat = any("clean" in v for shares in rows.values() for v in shares.values())
    lines = ["| model | panel | " + " | ".join(f"t = {t:g}" for t in timesteps) + " |",
             "|---|---:|" + "---:|" * len(timesteps)]
    for (name, size), shares in rows.items():
        cells = [f"{shares[t]['noisy']:.1%}" + (f" / {shares[t]['clean']:.1%}" if concat else "") for t in timesteps]
        lines.append(f"| {name} | {size} px ({size // 8}x{size // 8} latents) | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return {"rows": {f"{n} {s}": v for (n, s), v in rows.items()}, "table": "\n".join(lines)}


if __name__ == "__main__":
    main()
