"""SDXL concat LoRAs as a full UNet (`iclora convert --export_unet`): ComfyUI's Load
Diffusion Model and StableDiffusionXLInpaintPipeline take the 9-channel UNet, which no LoRA
file can widen."""

from __future__ import annotations

from pathlib import Path

import torch

from .lora_files import atomic_directory


def export_unet(lora_path: str, base: str, folder: Path, dtype: torch.dtype) -> Path:
    """<folder>/unet/: the base UNet with the LoRA merged in and the trained 9-channel
    conv_in, a diffusers UNet folder with in_channels 9."""
    from .sdxl import SDXLBackend

    backend = SDXLBackend.from_pretrained(base, conditioning="concat")
    backend.load_lora(Path(lora_path))
    pipe = backend.inpaint_pipeline()
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    with atomic_directory(folder / "unet") as tmp:
        backend.unet.to(dtype).save_pretrained(tmp)
    return folder / "unet"
