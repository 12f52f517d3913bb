"""Pretrain the tiny SDXL UNet into a toy *base model*: one that can draw, but knows no panels.

An IC-LoRA adapts a base that already denoises images; the LoRA only has to learn how the
panels relate. The in-code tiny SDXL UNet is random, and a LoRA on it does not become a
denoiser (measured: after 1000 LoRA steps its samples are still the initial noise),
likely because the LoRA adapts attention only and this UNet's full-resolution blocks have
none. So the known-answer benchmark starts from this base instead, fitted once here:

    python benchmarks/fit_toy_base.py               # ~10 minutes on 2 CPU cores
    python benchmarks/fit_toy_base.py --steps 20    # a quick smoke run

It trains every UNet weight of iclora.backends.tiny's SDXL (same architecture, same seed-0
init) on images whose four panels are *independent* toy panels: any colour, any shape, any
of the toy's nine layouts, each panel drawn separately. So the base can draw every colour
and shape anywhere, but has never seen a composite whose panels share an object: that
relation is what the LoRA must learn. Captions are "" or the toy caption, half each, so
the base does not depend on either.

The base is a v-prediction model (its scheduler config says so; the trainer and the
pipelines follow it). With epsilon prediction the sampler multiplies the error of the noise
estimate by sigma (up to ~15 for SDXL's schedule) when it forms its image estimate, so a
model trained for minutes needs a far more exact estimate than with v-prediction. Only the
LoRA-on-random-UNet case was measured with epsilon (its samples never left the initial
noise); this base was not tried with epsilon.

Writes benchmarks/assets/toy_sdxl_unet/{config.json, diffusion_pytorch_model.safetensors}
(float16 to keep the file small; make_base_model loads it back as float32).
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

from fit_toy_vae import PANEL_SIZE, independent_panels  # noqa: E402

# make_base_model lives in the package: scripts/demo.sh builds the same base.
from iclora.toy import TOY_PREDICTION_TYPE as PREDICTION_TYPE  # noqa: E402
from iclora.toy import TOY_UNET, TOY_VAE, make_base_model, make_caption  # noqa: E402


@torch.no_grad()
def latent_pool(backend, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n independent-panel images, encoded once: drawing and encoding cost more than a step."""
    chunks = [backend.encode_image(independent_panels(min(64, n - i), rng)) for i in range(0, n, 64)]
    return torch.cat(chunks)  # (n, 4, 16, 16)


def draw_batch(pool: torch.Tensor, embeds: dict[str, dict], batch_size: int, generator: torch.Generator):
    """Random pool entries, half of them mirrored (still valid toy-like images), each with a
    random caption of `embeds`. Returns (picked indices, mirrored flags, latents, prompt)."""
    pick = torch.randint(len(pool), (batch_size,), generator=generator)
    flip = torch.rand(batch_size, generator=generator) < 0.5
    latents = torch.where(flip[:, None, None, None], pool[pick].flip(-1), pool[pick])  # (B, C, h, w)
    captions = list(embeds)
    which = torch.randint(len(captions), (batch_size,), generator=generator).tolist()
    prompt = {k: torch.cat([embeds[captions[i]][k] for i in which]) for k in embeds[captions[0]]}
    return pick, flip, latents, prompt


def fit_all_weights(model: torch.nn.Module, steps: int, lr: float, step_loss) -> list[float]:
    """Train every weight of `model`: AdamW without decay, cosine to zero, gradients clipped at
    1. `step_loss()` draws a batch and returns its loss. Prints the mean loss every 250 steps."""
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    losses = []
    for step in range(1, steps + 1):
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 250 == 0:
            print(f"step {step}  loss {np.mean(losses[-250:]):.4f}", flush=True)
    model.eval()
    model.requires_grad_(False)
    return losses


def fit(backend, pool: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    embeds = {c: backend.encode_prompt([c]) for c in ["", make_caption((2, 2))]}
    size = torch.tensor([[2 * PANEL_SIZE, 2 * PANEL_SIZE]])
    micro = {"original_size": size.expand(batch_size, 2),  # SDXL time ids, as the trainer's batches
             "crop_top_left": torch.zeros(batch_size, 2, dtype=torch.long)}

    def step_loss() -> torch.Tensor:
        _, _, latents, prompt = draw_batch(pool, embeds, batch_size, generator)
        noise = torch.randn(latents.shape, generator=generator)
        noisy, timesteps, target = backend.noise_latents(latents, noise, generator)
        return F.mse_loss(backend.predict(noisy, timesteps, prompt, None, None, micro), target)

    return fit_all_weights(backend.unet, steps, lr, step_loss)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(TOY_UNET), help="output folder (diffusers UNet2DConditionModel)")
    parser.add_argument("--vae", default=str(TOY_VAE), help="the fitted toy VAE")
    parser.add_argument("--steps", type=int, default=4000, help="AdamW steps (~10 minutes on 2 CPU cores)")
    parser.add_argument("--pool", type=int, default=1024, help="distinct training images")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="/tmp/toy_base_work")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    from diffusers.utils import logging as diffusers_logging

    from iclora.backends.sdxl import SDXLBackend

    diffusers_logging.set_verbosity_error()
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    folder = make_base_model(work / "base", Path(args.vae), unet_dir=None)
    backend = SDXLBackend.from_pretrained(str(folder), conditioning="blend")
    start = time.monotonic()
    pool = latent_pool(backend, args.pool, np.random.default_rng(args.seed))
    print(f"encoded {len(pool)} images in {time.monotonic() - start:.0f} s", flush=True)
    losses = fit(backend, pool, args.steps, args.batch_size, args.lr, args.seed)
    seconds = time.monotonic() - start
    backend.unet.to(torch.float16).save_pretrained(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "vae")}
    report = {"seconds": round(seconds, 1), "final_loss": float(np.mean(losses[-100:])),
              "prediction_type": PREDICTION_TYPE, **settings}
    (Path(args.out) / "fit_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out}: {json.dumps(report)}")
    return report


if __name__ == "__main__":
    main()
