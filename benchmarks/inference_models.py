"""The pipelines inference_speed.py times: a diffusers folder that our inference and the stock
pipeline both load, and a LoRA for it.

    tiny   iclora.backends.tiny's in-code models (a few MB, CPU)
    full   every component at its public size: the denoiser from memory_models.py's public
           config, the VAE and text encoders from the public configs below, all with random
           weights made directly on the device; the tiny tokenizers (their ids fit the real
           vocabularies, and prompts are padded to the real lengths) and schedulers

Random weights run as fast as trained ones, and saving them as a pipeline folder lets both
sides load the way a user does (our `load_pipeline`, diffusers' `from_pretrained`), so the
load times are real too. Imported by benchmarks/inference_speed.py (benchmarks/ is no package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memory_models import FAMILIES, FLUX_DEV_TRANSFORMER_CONFIG, SDXL_UNET_CONFIG, build_on_device

from iclora.backends.registry import backend_spec

CONDITIONING = "blend"  # the one mode whose LoRA the stock inpaint pipelines load and run as ours do

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json.
SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# black-forest-labs/FLUX.1-dev, vae/config.json: 16 latent channels, shifted, no quant convs.
FLUX_VAE_CONFIG: dict[str, Any] = {
    **SDXL_VAE_CONFIG,
    "latent_channels": 16,
    "mid_block_add_attention": True,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# The text encoders' sizes (text_encoder*/config.json); ids and the rest come from the tiny configs.
CLIP_L_SIZES = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    projection_dim=768, hidden_act="quick_gelu", vocab_size=49408)  # SDXL and FLUX text_encoder
CLIP_BIG_G_SIZES = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                        projection_dim=1280, hidden_act="gelu", vocab_size=49408)  # SDXL text_encoder_2
T5_XXL_SIZES = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, vocab_size=32128)  # FLUX text_encoder_2 (T5 v1.1 XXL)
PUBLIC = {
    "sdxl": {"vae": SDXL_VAE_CONFIG, "text_encoder": CLIP_L_SIZES, "text_encoder_2": CLIP_BIG_G_SIZES},
    "flux": {"vae": FLUX_VAE_CONFIG, "text_encoder": CLIP_L_SIZES, "text_encoder_2": T5_XXL_SIZES},
}
DENOISER_CONFIGS = {"sdxl": SDXL_UNET_CONFIG, "flux": FLUX_DEV_TRANSFORMER_CONFIG}


def pipeline_components(model: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The components of `model`'s text-to-image pipeline: the tiny in-code ones, or every
    model at its public size with random weights on `device` in `dtype`."""
    from diffusers import AutoencoderKL

    family = FAMILIES[model]
    components = family.stand_ins()  # tokenizers and scheduler always; the tiny models when tiny
    if tiny:
        return components
    components[family.denoiser_key] = family.build(dict(DENOISER_CONFIGS[model]), device, dtype, nf4=False)
    components["vae"] = build_on_device(AutoencoderKL, PUBLIC[model]["vae"], device, dtype)
    for key in ("text_encoder", "text_encoder_2"):
        tiny_model = components[key]
        config = type(tiny_model.config).from_dict({**tiny_model.config.to_dict(), **PUBLIC[model][key]})
        with torch.device(device):  # transformers' own init, on the device: T5-XXL never passes through host memory
            components[key] = type(tiny_model)(config).to(dtype).eval()
    return components


def save_base(model: str, components: dict[str, Any], folder: Path) -> None:
    """A diffusers pipeline folder, as one downloaded from the hub."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    pipeline = {"sdxl": StableDiffusionXLPipeline, "flux": FluxPipeline}[model]
    pipeline(**components).save_pretrained(folder)


def save_lora(model: str, components: dict[str, Any], folder: Path, rank: int) -> None:
    """A LoRA of `rank` (alpha = rank) made by our backend on these components, saved as our
    training saves it (pytorch_lora_weights.safetensors, diffusers format). Its lora_B are
    drawn nonzero so that neither side could skip the layers as a no-op."""
    backend = FAMILIES[model].backend_cls()(components, f"random-init {model}", CONDITIONING)
    backend.add_lora(rank, rank, 0.0, convs=backend_spec(backend.name).lora_convs)  # as training writes it by default
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in backend.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).mul_(1e-3))
    backend.save_lora(folder, compat=False)


def stock_pipeline(model: str, folder: Path, lora: Path, device: torch.device, dtype: torch.dtype):
    """The stock diffusers inpaint pipeline loaded the stock way: from_pretrained, then
    load_lora_weights, then to the device."""
    from diffusers import FluxInpaintPipeline, StableDiffusionXLInpaintPipeline

    from iclora.backends.lora_files import LORA_WEIGHT_NAME

    cls = {"sdxl": StableDiffusionXLInpaintPipeline, "flux": FluxInpaintPipeline}[model]
    pipe = cls.from_pretrained(folder, torch_dtype=dtype)
    pipe.load_lora_weights(lora, weight_name=LORA_WEIGHT_NAME)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
