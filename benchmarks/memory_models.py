"""The denoisers train_memory.py measures: full-size public configs built on the device.

Per model family an adapter (`SDXL`, `Flux`, `Flux2`) answers what the benchmark asks of a model: its
public config (or the tiny in-code one), how to build it with random weights, our backend
around it, its text-embedding shapes and diffusers' reference loss. `build_on_device` makes
the weights directly on the device from a meta-device skeleton, NF4-quantized tensor by
tensor when asked; `make_backend` wraps a denoiser into our backend through its own
constructor. Imported by benchmarks/train_memory.py (benchmarks/ is no package).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch
import torch.nn.functional as F

SEED = 0

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json. in_channels stays the public 4:
# SDXLBackend widens conv_in to 9 (concat conditioning) itself, as it does for the real model.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# black-forest-labs/FLUX.1-dev, transformer/config.json (out_channels null -> in_channels).
FLUX_DEV_TRANSFORMER_CONFIG: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# FLUX.2 [klein] transformers: diffusers' scripts/convert_flux2_to_diffusers.py model types
# "klein-4b" (black-forest-labs/FLUX.2-klein-base-4B, Qwen3-4B: 3 x 2560 text width) and
# "klein-9b" (-base-9B, Qwen3-8B: 3 x 4096); 3.88 B and 9.08 B parameters.
FLUX2_KLEIN_4B_TRANSFORMER_CONFIG: dict[str, Any] = {
    "_class_name": "Flux2Transformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-06,
    "guidance_embeds": False,
    "in_channels": 128,
    "joint_attention_dim": 7680,
    "mlp_ratio": 3.0,
    "num_attention_heads": 24,
    "num_layers": 5,
    "num_single_layers": 20,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}
FLUX2_KLEIN_9B_TRANSFORMER_CONFIG: dict[str, Any] = {
    **FLUX2_KLEIN_4B_TRANSFORMER_CONFIG, "joint_attention_dim": 12288, "num_attention_heads": 32, "num_layers": 8,
    "num_single_layers": 24,
}


def _random_(name: str, shape: torch.Size, dtype, device, generator) -> torch.Tensor:
    """Cheap init that keeps activations O(1): N(0, 1/fan_in) matrices, unit norm scales, zero biases."""
    if len(shape) >= 2:
        return torch.randn(shape, dtype=dtype, device=device, generator=generator) / math.sqrt(math.prod(shape[1:]))
    fill = 1.0 if name in ("weight", "scale") else 0.0
    return torch.full(shape, fill, dtype=dtype, device=device)


def build_on_device(model_cls, config: dict, device: torch.device, dtype: torch.dtype, quantization_config=None):
    """`model_cls` from `config` with random weights made directly on `device` (no host copy).

    With a bitsandbytes `quantization_config` it follows diffusers' from_pretrained: the
    quantizer swaps nn.Linear for bnb Linear4bit (Linear8bitLt) on the meta skeleton, then each weight is
    drawn in bf16 on the device and quantized there, one tensor at a time (the full bf16
    model never exists)."""
    import bitsandbytes as bnb

    with torch.device("meta"):
        model = model_cls.from_config(config)
    quantizer = None
    if quantization_config is not None:
        from diffusers.quantizers import DiffusersAutoQuantizer

        quantizer = DiffusersAutoQuantizer.from_config(quantization_config, pre_quantized=False)
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        quantizer.preprocess_model(model=model, device_map=None, keep_in_fp32_modules=keep)
    generator = torch.Generator(device).manual_seed(SEED)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if isinstance(param, bnb.nn.Params4bit):
                value = _random_(name, param.shape, quantization_config.bnb_4bit_compute_dtype, device, generator)
                module._parameters[name] = bnb.nn.Params4bit(value, requires_grad=False, **param.__dict__).to(device)
            elif isinstance(param, bnb.nn.Int8Params):
                # LLM.int8(): bitsandbytes quantizes row-wise when the host tensor moves to the device.
                value = _random_(name, param.shape, torch.float16, device, generator)
                module._parameters[name] = bnb.nn.Int8Params(value.cpu(), requires_grad=False,
                                                             has_fp16_weights=False).to(device)
            else:
                module._parameters[name] = torch.nn.Parameter(_random_(name, param.shape, dtype, device, generator),
                                                              requires_grad=False)
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            raise ValueError(f"{type(module).__name__} has buffers that a meta-device build leaves empty")
    if quantizer is not None:
        quantizer.postprocess_model(model)
        model.hf_quantizer = quantizer  # what from_pretrained sets; FluxBackend reads it
    return model


@functools.cache
def _tiny_config_cached(family, key: str) -> str:
    return json.dumps(dict(family.stand_ins()[key].config))


def _tiny_config(family, key: str) -> dict:
    """The denoiser config of iclora.backends.tiny's model (built once per process)."""
    return json.loads(_tiny_config_cached(family, key))


class SDXL:
    """The SDXL adapter: public config, stand-ins, inputs, and diffusers' reference step."""

    name = "sdxl"
    denoiser_key = "unet"
    conditioning = "concat"  # the trainer's default for SDXL

    @staticmethod
    def reference_scheduler(stand_in):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(stand_in.config)  # as train_dreambooth_lora_sdxl.py

    @staticmethod
    def backend_cls():
        from iclora.backends.sdxl import SDXLBackend

        return SDXLBackend

    @staticmethod
    def stand_ins() -> dict[str, Any]:
        from iclora.backends.tiny import build_tiny_sdxl_components

        return build_tiny_sdxl_components()

    @classmethod
    def config(cls, tiny: bool) -> dict:
        return _tiny_config(cls, "unet") if tiny else dict(SDXL_UNET_CONFIG)

    @staticmethod
    def build(config: dict, device, dtype, nf4: bool):
        from diffusers import UNet2DConditionModel

        if nf4:
            raise ValueError("--nf4 on: the SDXL backend has no quantized loading (FLUX only)")
        return build_on_device(UNet2DConditionModel, config, device, dtype)

    @staticmethod
    def lora_targets():
        """The trainer's default: attention and feed-forward, and the ResNet convs (--lora_convs)."""
        from iclora.backends.sdxl_lora import SPEC, lora_targets

        return lora_targets(SPEC.lora_convs)

    @staticmethod
    def reference_config(config: dict) -> dict:
        """Ours after SDXLBackend widened conv_in for concat conditioning."""
        from iclora.backends.sdxl import CONCAT_CHANNELS

        return {**config, "in_channels": CONCAT_CHANNELS}

    @staticmethod
    def latent_channels(config: dict) -> int:
        return config["out_channels"]

    @classmethod
    def latent_shape(cls, config: dict, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents the backend's contract carries for an image of height x width."""
        return cls.latent_channels(config), height // 8, width // 8

    @staticmethod
    def prompt_embeds(config: dict, batch: int, device, dtype) -> dict[str, torch.Tensor]:
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        return {
            "prompt_embeds": torch.randn(batch, 77, config["cross_attention_dim"], device=device, dtype=dtype),
            "pooled_prompt_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
        }  # (B, 77, 2048), (B, 1280): both CLIPs' states, text_encoder_2's pooled projection

    @staticmethod
    def reference_loss(model, scheduler, inputs: dict, weight_dtype) -> torch.Tensor:
        """train_dreambooth_lora_sdxl.py's step; the 9-channel input as an inpainting UNet takes it."""
        latents = inputs["latents"]
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if model.config.in_channels != latents.shape[1]:
            noisy = torch.cat([noisy, inputs["mask"], inputs["masked_latents"].to(noisy.dtype)], dim=1)  # (B, 9, h, w)
        height, width = latents.shape[2] * 8, latents.shape[3] * 8
        time_ids = torch.cat([
            torch.tensor([[*s.tolist(), *c.tolist(), height, width]]).to(latents.device, dtype=weight_dtype)
            for s, c in zip(inputs["batch"]["original_size"], inputs["batch"]["crop_top_left"])
        ])  # (B, 6)
        embeds = inputs["prompt_embeds"]
        pred = model(
            noisy, timesteps, embeds["prompt_embeds"],
            added_cond_kwargs={"time_ids": time_ids, "text_embeds": embeds["pooled_prompt_embeds"]}, return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")


class Flux:
    """The FLUX.1 adapter (dev layout, `blend` conditioning)."""

    name = "flux"
    denoiser_key = "transformer"
    conditioning = "blend"  # FLUX.1-dev; concat needs a FLUX.1-Fill transformer

    @staticmethod
    def reference_scheduler(stand_in):
        return stand_in  # FlowMatchEulerDiscreteScheduler with FLUX.1-dev's config

    @staticmethod
    def backend_cls():
        from iclora.backends.flux import FluxBackend

        return FluxBackend

    @staticmethod
    def stand_ins() -> dict[str, Any]:
        from iclora.backends.tiny import build_tiny_flux_components

        return build_tiny_flux_components()

    @classmethod
    def config(cls, tiny: bool) -> dict:
        return _tiny_config(cls, "transformer") if tiny else dict(FLUX_DEV_TRANSFORMER_CONFIG)

    @staticmethod
    def build(config: dict, device, dtype, nf4: bool):
        from diffusers import FluxTransformer2DModel

        if not nf4:
            return build_on_device(FluxTransformer2DModel, config, device, dtype)
        from iclora.backends.flux import QUANTIZE_CONFIGS

        # As FluxBackend's loader leaves it; its add_lora prepares it for training.
        return build_on_device(FluxTransformer2DModel, config, device, torch.bfloat16, QUANTIZE_CONFIGS["nf4"]())

    @staticmethod
    def lora_targets():
        from iclora.backends.flux import LORA_TARGET_MODULES

        return LORA_TARGET_MODULES

    @staticmethod
    def reference_config(config: dict) -> dict:
        return config  # blend: FluxBackend keeps the transformer as it is

    @staticmethod
    def latent_channels(config: dict) -> int:
        return (config.get("out_channels") or config["in_channels"]) // 4

    @classmethod
    def latent_shape(cls, config: dict, height: int, width: int) -> tuple[int, int, int]:
        return cls.latent_channels(config), height // 8, width // 8  # packed inside the backend

    @staticmethod
    def prompt_embeds(config: dict, batch: int, device, dtype) -> dict[str, torch.Tensor]:
        from iclora.backends.flux import MAX_SEQUENCE_LENGTH

        return {
            "prompt_embeds": torch.randn(batch, MAX_SEQUENCE_LENGTH, config["joint_attention_dim"], device=device, dtype=dtype),
            "pooled_prompt_embeds": torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=dtype),
        }  # (B, 512, 4096) T5, (B, 768) CLIP pooled

    @staticmethod
    def reference_loss(model, scheduler, inputs: dict, weight_dtype) -> torch.Tensor:
        """train_dreambooth_lora_flux.py's step (weighting_scheme none, guidance 3.5)."""
        from diffusers import FluxPipeline
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        latents = inputs["latents"]
        device, dtype = latents.device, latents.dtype
        bsz, channels, h, w = latents.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, device, dtype)
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling("none", batch_size=bsz, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices].to(device=device)
        schedule = scheduler.timesteps.to(device)
        sigmas = scheduler.sigmas.to(device=device, dtype=dtype)[[(schedule == t).nonzero().item() for t in timesteps]]
        sigmas = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, h, w)  # (B, h/2 * w/2, 4C)
        embeds = inputs["prompt_embeds"]
        guidance = torch.tensor([3.5], device=device).expand(bsz) if model.config.guidance_embeds else None
        pred = model(
            hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
            pooled_projections=embeds["pooled_prompt_embeds"], encoder_hidden_states=embeds["prompt_embeds"],
            txt_ids=torch.zeros(embeds["prompt_embeds"].shape[1], 3, device=device, dtype=dtype), img_ids=img_ids,
            return_dict=False,
        )[0]
        pred = FluxPipeline._unpack_latents(pred, h * 8, w * 8, 8)  # (B, C, h, w)
        weighting = compute_loss_weighting_for_sd3("none", sigmas=sigmas)
        target = noise - latents
        return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()


class Flux2:
    """The FLUX.2 [klein] base-4B adapter (`context` conditioning, the backend's default: per-token
    timestep-0 modulation); bf16, or NF4 with --nf4 on."""

    name = "flux2"
    denoiser_key = "transformer"
    conditioning = "context"
    public_config = FLUX2_KLEIN_4B_TRANSFORMER_CONFIG
    int8 = False

    @staticmethod
    def reference_scheduler(stand_in):
        return stand_in

    @staticmethod
    def backend_cls():
        from iclora.backends.flux2 import Flux2Backend

        return Flux2Backend

    @staticmethod
    def stand_ins() -> dict[str, Any]:
        from iclora.backends.tiny_flux2 import build_tiny_flux2_components

        return build_tiny_flux2_components()

    @classmethod
    def config(cls, tiny: bool) -> dict:
        return _tiny_config(cls, "transformer") if tiny else dict(cls.public_config)

    @classmethod
    def build(cls, config: dict, device, dtype, nf4: bool):
        from diffusers import Flux2Transformer2DModel

        from iclora.backends.flux2_loading import QUANTIZE_CONFIGS

        if cls.int8 and nf4:
            raise ValueError("--nf4 on: this FLUX.2 row is the 8-bit one")
        kind = "int8" if cls.int8 else ("nf4" if nf4 else None)
        if kind is None:
            return build_on_device(Flux2Transformer2DModel, config, device, dtype)
        # As Flux2Backend's loader leaves it (bf16 around the quantized weights).
        return build_on_device(Flux2Transformer2DModel, config, device, torch.bfloat16, QUANTIZE_CONFIGS[kind]())

    @staticmethod
    def lora_targets():
        from iclora.backends.flux2 import LORA_TARGET_MODULES

        return LORA_TARGET_MODULES

    @staticmethod
    def reference_config(config: dict) -> dict:
        return config

    @staticmethod
    def latent_channels(config: dict) -> int:
        return config["in_channels"] // 4  # the VAE's (32): 2x2 patches make the transformer's 128

    @staticmethod
    def latent_shape(config: dict, height: int, width: int) -> tuple[int, int, int]:
        return config["in_channels"], height // 16, width // 16  # patchified, normalised (flux2_latents.py)

    @staticmethod
    def prompt_embeds(config: dict, batch: int, device, dtype) -> dict[str, torch.Tensor]:
        from iclora.backends.flux2_spec import MAX_SEQUENCE_LENGTH

        return {"prompt_embeds": torch.randn(batch, MAX_SEQUENCE_LENGTH, config["joint_attention_dim"], device=device,
                                             dtype=dtype)}  # (B, 512, 3 x Qwen3 width)

    @staticmethod
    def reference_loss(model, scheduler, inputs: dict, weight_dtype) -> torch.Tensor:
        """The stock FLUX.2 LoRA step: uniform sigma, velocity target, no guidance, every
        token noisy (the stock forward, one modulation for all tokens)."""
        from diffusers import Flux2KleinPipeline

        latents = inputs["latents"]  # (B, 128, h, w), normalised
        device, dtype = latents.device, latents.dtype
        bsz, _, h, w = latents.shape
        noise = torch.randn_like(latents)
        sigmas = torch.rand(bsz, device=device, dtype=dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        text = inputs["prompt_embeds"]["prompt_embeds"]
        pred = model(
            hidden_states=Flux2KleinPipeline._pack_latents(noisy), timestep=sigmas.flatten(), guidance=None,
            encoder_hidden_states=text, txt_ids=Flux2KleinPipeline._prepare_text_ids(text).to(device),
            img_ids=Flux2KleinPipeline._prepare_latent_ids(latents).to(device), return_dict=False,
        )[0]  # (B, h * w, 128)
        pred = pred.permute(0, 2, 1).reshape(latents.shape)
        return F.mse_loss(pred.float(), (noise - latents).float(), reduction="mean")


class Flux2Int8(Flux2):
    """FLUX.2 [klein] base-9B with its transformer in 8-bit (bitsandbytes LLM.int8())."""

    name = "flux2-9b-int8"
    public_config = FLUX2_KLEIN_9B_TRANSFORMER_CONFIG
    int8 = True


FAMILIES = {"sdxl": SDXL, "flux": Flux, "flux2": Flux2, "flux2-9b-int8": Flux2Int8}


def make_backend(family, denoiser):
    """Our backend around `denoiser`, through its own constructor. The VAE, text encoders,
    tokenizers and scheduler are the tiny in-code ones (a few MB on the CPU, never run); the
    VAE stand-in only answers config questions (scale factor, latent channels)."""
    components = family.stand_ins()
    latent_channels = family.latent_channels(dict(denoiser.config))
    if components["vae"].config.latent_channels != latent_channels:  # full-size FLUX: 16 (FLUX.2: 32), tiny: 4
        vae_cls = type(components["vae"])
        components["vae"] = vae_cls.from_config({**components["vae"].config, "latent_channels": latent_channels})
    components[family.denoiser_key] = denoiser
    return family.backend_cls()(components, f"random-init {family.name}", family.conditioning)
