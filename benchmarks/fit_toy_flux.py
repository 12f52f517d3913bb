"""Pretrain a toy FLUX.1 transformer into a base model that can draw but knows no panels.

The FLUX counterpart of fit_toy_base.py (read its docstring for the why): the known-answer
benchmark needs a base that already denoises toy images, so that an IC-LoRA on it only has
to learn how the panels relate. Fitted once here, on CPU:

    python benchmarks/fit_toy_flux.py                       # FLUX.1-dev layout (blend), ~10 min
    python benchmarks/fit_toy_flux.py --conditioning concat # FLUX.1-Fill layout, ~12 min
    python benchmarks/fit_toy_flux.py --steps 20            # a quick smoke run

The transformer is a small FluxTransformer2DModel (2 double + 4 single blocks, width 64,
no guidance embedding: nothing distils guidance here) over the toy VAE's 4 latent channels
(benchmarks/assets/toy_vae, fit_toy_vae.py), trained with the FLUX backend's own rectified
flow (`FluxBackend.noise_latents` / `predict`) on images whose four panels are independent
(any colour, any shape, anywhere), captions "" or the toy caption. The Fill layout gets the
FluxFillPipeline input (noisy latents, masked-image latents, mask) with a random subset of
panels masked, so it is an inpainting base that has never seen panels share an object.

The toy VAE was fitted for SDXL (no shift). FLUX pipelines compute (z - shift) * scale:
`vae_factors` measures both on independent-panel images, and `make_flux_base_model` writes
them into the base's VAE config.

Writes benchmarks/assets/toy_flux_transformer (or toy_flux_fill_transformer)/
{config.json, diffusion_pytorch_model.safetensors, fit_report.json}, float16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

from fit_toy_base import draw_batch, fit_all_weights  # noqa: E402
from fit_toy_vae import independent_panels  # noqa: E402

from iclora.panels import Grid, latent_mask, panel_mask  # noqa: E402
from iclora.toy import make_caption  # noqa: E402

TOY_VAE = HERE / "assets" / "toy_vae"
TOY_FLUX = {"blend": HERE / "assets" / "toy_flux_transformer", "concat": HERE / "assets" / "toy_flux_fill_transformer"}
TOY_FLUX["context"] = TOY_FLUX["blend"]  # a 4C-channel FLUX.1-dev layout, like blend
GRID = Grid(2, 2)


@torch.no_grad()
def vae_factors(vae, n: int = 256, seed: int = 0) -> dict[str, float]:
    """FLUX-style (shift, scale) for the toy VAE: latents' mean, and 1 / their std after it."""
    latents = vae.encode(independent_panels(n, np.random.default_rng(seed))).latent_dist.mode()
    return {"shift_factor": float(latents.mean()), "scaling_factor": float(1.0 / latents.std())}


def toy_transformer(in_channels: int, latent_channels: int, text_dim: int, pooled_dim: int,
                    blocks: tuple[int, int] = (2, 4)):
    """`blocks`: (double-stream, single-stream) block counts."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=4 * latent_channels, num_layers=blocks[0],
        num_single_layers=blocks[1], attention_head_dim=16, num_attention_heads=4, joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    )


def make_flux_base_model(folder: Path, conditioning: str = "blend", vae_dir: Path = TOY_VAE,
                         transformer_dir: Path | None = None, blocks: tuple[int, int] = (2, 4),
                         init_seed: int = 0) -> Path:
    """A diffusers FLUX.1 (blend) or FLUX.1-Fill (concat) folder: the tiny FLUX text encoders,
    tokenizers and scheduler, the toy VAE with FLUX shift/scale, and the toy transformer
    (fitted, from transformer_dir; or freshly initialised from `init_seed` with `blocks`
    (double, single) when transformer_dir is None)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from iclora.backends.tiny import save_tiny_model

    for path in [vae_dir] + ([transformer_dir] if transformer_dir else []):
        if not (Path(path) / "diffusion_pytorch_model.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no weights; run benchmarks/fit_toy_vae.py and fit_toy_flux.py first")
    save_tiny_model("tiny-flux-fill" if conditioning == "concat" else "tiny-flux", folder)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.register_to_config(**vae_factors(vae))
    shutil.rmtree(folder / "vae")
    vae.save_pretrained(folder / "vae")
    if transformer_dir:
        transformer = FluxTransformer2DModel.from_pretrained(transformer_dir, torch_dtype=torch.float32)
    else:
        text = json.loads((folder / "text_encoder_2" / "config.json").read_text())["d_model"]
        pooled = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
        c = vae.config.latent_channels
        in_channels = 4 * c + 4 * c + 4 * 8**2 if conditioning == "concat" else 4 * c
        torch.manual_seed(init_seed)
        transformer = toy_transformer(in_channels, c, text, pooled, tuple(blocks))
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(folder / "transformer")
    return folder


def fit(backend, images: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    embeds = {c: backend.encode_prompt([c]) for c in ["", make_caption((GRID.rows, GRID.cols))]}
    pool = torch.cat([backend.encode_image(images[i:i + 64]) for i in range(0, len(images), 64)])
    size = images.shape[-1]

    def step_loss() -> torch.Tensor:
        pick, flip, latents, prompt = draw_batch(pool, embeds, batch_size, generator)
        mask = masked = None
        if backend.conditioning == "concat":  # a random subset of panels (possibly none or all) to inpaint
            chosen = torch.rand(batch_size, 4, generator=generator) < 0.5
            pixel = torch.stack([panel_mask(torch.nonzero(c).flatten().tolist(), GRID, size, size) for c in chosen])
            pixels = torch.where(flip[:, None, None, None], images[pick].flip(-1), images[pick])
            masked = backend.masked_image_latents(pixels, pixel)
            mask = latent_mask(pixel, backend.vae_scale_factor)
        noise = torch.randn(latents.shape, generator=generator)
        noisy, timesteps, target = backend.noise_latents(latents, noise, generator)
        return F.mse_loss(backend.predict(noisy, timesteps, prompt, mask, masked, {}), target)

    return fit_all_weights(backend.transformer, steps, lr, step_loss)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conditioning", choices=["blend", "concat"], default="blend",
                        help="blend: FLUX.1-dev layout; concat: FLUX.1-Fill layout")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/assets/toy_flux[_fill]_transformer)")
    parser.add_argument("--vae", default=str(TOY_VAE), help="the fitted toy VAE")
    parser.add_argument("--steps", type=int, default=2000, help="AdamW steps")
    parser.add_argument("--pool", type=int, default=1024, help="distinct training images")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--work_dir", default=None, help="scratch folder (default: /tmp/toy_flux_<conditioning>)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else TOY_FLUX[args.conditioning]
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    from diffusers.utils import logging as diffusers_logging

    from iclora.backends.flux import FluxBackend

    diffusers_logging.set_verbosity_error()
    work = Path(args.work_dir or f"/tmp/toy_flux_{args.conditioning}")
    shutil.rmtree(work, ignore_errors=True)
    folder = make_flux_base_model(work / "base", args.conditioning, Path(args.vae))
    backend = FluxBackend.from_pretrained(str(folder), conditioning=args.conditioning)
    start = time.monotonic()
    images = independent_panels(args.pool, np.random.default_rng(args.seed))
    losses = fit(backend, images, args.steps, args.batch_size, args.lr, args.seed)
    seconds = time.monotonic() - start
    backend.transformer.to(torch.float16).save_pretrained(out)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "vae", "threads")}
    report = {"seconds": round(seconds, 1), "final_loss": float(np.mean(losses[-100:])), **settings}
    (out / "fit_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}: {json.dumps(report)}")
    return report


if __name__ == "__main__":
    main()
