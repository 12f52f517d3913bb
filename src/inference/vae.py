"""The VAE at inference: which one (--pretrained_vae) and how it bounds its memory (--vae_tiling).

Tiling and slicing are diffusers' own (`AutoencoderKL.enable_tiling` / `enable_slicing`):
tiling encodes and decodes an image in overlapping tiles of the VAE's `sample_size` (1024
px for the SDXL and FLUX.1 VAEs) blended at their seams, so its result differs from the
untiled one a little near the seams; slicing runs a batch one image at a time, the same
result up to float rounding. With `auto` (the default) the choice is made per pipeline call
from its size and batch, by the same rule on every device, so a seed gives the same image
on a GPU and a CPU:

    tiling   one image has more than AUTO_TILE_PIXELS (2 x 1024x1024: 1536x1536 tiles,
             1024x2048 does not); below that the VAE's working memory is what a plain
             1024x1024 generation needs
    slicing  a call of several images whose pixels together exceed AUTO_SLICE_PIXELS
             (1024x1024): SDXL's VAE upcasts to float32, and a batch of four 1024x1024
             images decoded at once needs four times one image's activations

Measured on a CPU (the SDXL VAE's architecture in float32, host memory above the model's):
a 1024x1024 decode peaks 3.8 GiB higher, a 512x512 one 1.0 GiB (memory grows with pixels).
"""

from __future__ import annotations

import re
from pathlib import Path

AUTO_TILE_PIXELS = 2 * 1024 * 1024
AUTO_SLICE_PIXELS = 1024 * 1024
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name


def memory_settings(mode: str, width: int, height: int, batch: int) -> dict[str, bool]:
    """{'tiling': ..., 'slicing': ...} for a call of `batch` images of width x height."""
    if mode != "auto":
        return {"tiling": mode == "on", "slicing": mode == "on"}
    pixels = width * height
    return {"tiling": pixels > AUTO_TILE_PIXELS, "slicing": batch > 1 and batch * pixels > AUTO_SLICE_PIXELS}


def apply_memory_settings(vae, settings: dict[str, bool]) -> None:
    """Switch the VAE's tiling and slicing on or off for the next call."""
    vae.enable_tiling() if settings["tiling"] else vae.disable_tiling()
    vae.enable_slicing() if settings["slicing"] else vae.disable_slicing()


def memory_record(cfg, size: tuple[int, int]) -> dict:
    """--vae_tiling and what it chose for calls of `size` with --batch_size images (the JSON's)."""
    batch = min(cfg.batch_size, cfg.num_images)
    return {"mode": cfg.vae_tiling, **memory_settings(cfg.vae_tiling, *size, batch)}


def resolve_vae(flag: str | None, meta: dict, lora_path: str) -> str | None:
    """The VAE folder or hub id to load instead of the base model's: --pretrained_vae, else
    the one training used (recorded with the LoRA); None for the base model's own."""
    recorded = (meta.get("training_args") or {}).get("pretrained_vae")
    vae = flag if flag is not None else recorded
    if vae is None or vae.strip().lower() == "none":
        return None
    if not Path(vae).is_dir() and (Path(vae).exists() or not HUB_ID.fullmatch(vae)):
        if flag is not None:
            raise ValueError(f"--pretrained_vae {vae}: no such folder (a diffusers VAE folder or a hub id owner/name)")
        raise ValueError(f"--lora_path {lora_path}: its training used --pretrained_vae {vae}, which is not a folder "
                         "here; pass --pretrained_vae FOLDER, or --pretrained_vae none for the base model's VAE")
    return vae
