"""FLUX.1's LoRA: the transformer layers it trains, and its files: saved as diffusers'
FluxPipeline saves them (plus a ComfyUI copy with `.alpha` keys), loaded from ours or from
foreign trainers' formats, refusing any that would not be applied in full."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict

from .lora_files import load_transformer_lora, save_transformer_lora
from .lora_formats import flux_comfyui_state, peft_modules

# diffusers' train_dreambooth_lora_flux.py default targets (attention and feed-forward of
# the double-stream blocks; the suffixes also catch the single blocks' to_q/to_k/to_v),
# plus the single blocks' MLP in and out. A regex (PEFT full-matches it against module
# names) because a bare "proj_out" would also catch the transformer's final projection.
_SUFFIXES = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]
LORA_TARGET_MODULES = (
    r"(?:.*\.(?:" + "|".join(s.replace(".", r"\.") for s in _SUFFIXES) + r"))"
    r"|(?:single_transformer_blocks\.\d+\.(?:proj_mlp|proj_out))"
)


def save_lora(transformer, directory: Path, compat: bool = True, dtype: torch.dtype = torch.float16) -> None:
    """The trained LoRA as diffusers' FluxPipeline saves it, and with `compat` the ComfyUI file beside it."""
    save_transformer_lora(FluxPipeline, transformer, directory, comfyui_state, compat, dtype)


def comfyui_state(transformer) -> dict[str, torch.Tensor]:
    """The trained LoRA with `.alpha` keys: ComfyUI reads a FLUX LoRA's scale only from
    them (metadata ignored: scale 1.0), and diffusers refuses `.alpha` keys beside adapter
    metadata, so this is a second file."""
    lora = get_peft_model_state_dict(transformer)
    config = transformer.peft_config["default"]
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    return flux_comfyui_state(peft_modules({f"transformer.{k}": v for k, v in lora.items()}, "transformer"), scale)


def load_lora(pipe, transformer, path: Path, conditioning: str) -> None:
    """Ours (a final_model/ or checkpoint folder, or one of its files), or foreign FLUX
    LoRAs (kohya, ai-toolkit / official IC-LoRA, xlabs: diffusers converts the keys);
    refuses one that would not be applied in full."""
    load_transformer_lora(pipe, transformer, path, conditioning, "FLUX transformer")
