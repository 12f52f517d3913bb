"""GPU memory and speed of our training step on full-size SDXL and FLUX.1, against diffusers.

    python benchmarks/train_memory.py                                # the target rows (GPU)
    python benchmarks/train_memory.py --preset full --models sdxl    # the SDXL matrix
    python benchmarks/train_memory.py --tiny                         # CPU smoke run, ~25 s

Per setting, in a fresh process (see --isolate), it
  1. builds the denoiser from its public config with random weights directly on the device
     (meta-device skeleton, then each tensor drawn in place; FLUX optionally NF4-quantized
     tensor by tensor, as diffusers' bitsandbytes loader does), no checkpoint needed;
  2. wraps it into our backend through the backend's own constructor, with the tiny in-code
     VAE and text encoders as stand-ins (never run: latents and text embeddings are random
     tensors of the real shapes, as the trainer's caches hold them);
  3. times N steps of the trainer's step: `diffusion_loss` + accelerator.backward + clip +
     optimizer step, under accelerate mixed precision, in the trainer's set-up order;
  4. does the same for a reference step written as diffusers' train_dreambooth_lora_sdxl.py /
     train_dreambooth_lora_flux.py write theirs, on the same architecture and settings;
  5. reports peak allocated/reserved memory, median s/step after warm-up, images/s, FLOPs per
     step (FlopCounterMode over one step) and MFU against a measured bf16 matmul peak.
Results are a markdown table (stdout, and --out FILE written atomically) with PASS/FAIL on the
target rows. GPU numbers go into benchmarks/RESULTS.md (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run by path from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from _bootstrap import ensure_package

    sys.path.pop(0)
    ensure_package()

from iclora.training.config import TrainConfig  # noqa: E402  (after the bootstrap above)

GIB = 2**30
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
LR, WEIGHT_DECAY, MAX_GRAD_NORM = (_TRAIN_DEFAULTS[k] for k in ("learning_rate", "weight_decay", "max_grad_norm"))
SEED = 0
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}

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

# Target rows: (what a row must match, peak reserved limit in GiB). Sizes match either way round.
TARGETS = [
    (dict(model="sdxl", size=(1024, 1024), batch_size=1, rank=64, checkpointing=True, adam8bit=True), 9.0),
    (dict(model="sdxl", size=(1024, 1024), batch_size=4, rank=64, checkpointing=True, adam8bit=True), 14.0),
    (dict(model="flux", size=(1024, 1024), batch_size=1, rank=16, nf4=True, checkpointing=True), 12.0),
    (dict(model="flux", size=(1024, 1536), batch_size=1, rank=16, nf4=True, checkpointing=True), 16.0),
]

AXES = ("sizes", "batch_sizes", "ranks", "checkpointing", "adam8bit", "precisions", "nf4")
PRESETS: dict[str, dict[str, dict[str, list]]] = {
    "targets": {
        "sdxl": dict(sizes=[(1024, 1024)], batch_sizes=[1, 4], ranks=[64], checkpointing=[True], adam8bit=[True],
                     precisions=["fp16"], nf4=[False]),
        "flux": dict(sizes=[(1024, 1024), (1024, 1536)], batch_sizes=[1], ranks=[16], checkpointing=[True],
                     adam8bit=[True], precisions=["bf16"], nf4=[True]),
    },
    "full": {
        "sdxl": dict(sizes=[(1024, 1024), (768, 768)], batch_sizes=[1, 2, 4], ranks=[16, 64],
                     checkpointing=[True, False], adam8bit=[True, False], precisions=["fp16", "bf16"], nf4=[False]),
        "flux": dict(sizes=[(1024, 1024), (768, 768), (1024, 1536)], batch_sizes=[1, 2, 4], ranks=[16, 64],
                     checkpointing=[True, False], adam8bit=[True, False], precisions=["bf16"], nf4=[True, False]),
    },
    "tiny": {
        "sdxl": dict(sizes=[(64, 64)], batch_sizes=[1, 2], ranks=[4], checkpointing=[True, False], adam8bit=[False],
                     precisions=["bf16"], nf4=[False]),
        "flux": dict(sizes=[(64, 64)], batch_sizes=[1], ranks=[4], checkpointing=[True, False], adam8bit=[True],
                     precisions=["bf16"], nf4=[True]),
    },
}


@dataclass(frozen=True)
class Setting:
    model: str  # sdxl | flux
    size: tuple[int, int]  # (width, height) in pixels
    batch_size: int
    rank: int
    checkpointing: bool
    adam8bit: bool
    precision: str  # fp16 | bf16 | no
    nf4: bool


@dataclass(frozen=True)
class RunOptions:
    """Everything besides the setting that decides what a worker runs."""

    tiny: bool
    device: str
    warmup: int
    steps: int
    lora_dropout: float
    compile: bool
    channels_last: bool
    reference: bool
    cpu_threads: int | None  # torch intra-op threads; None leaves torch's default


@contextlib.contextmanager
def process_state(cpu_threads: int | None):
    """Freeze the import-time heap (so the gc.collect between phases takes milliseconds, not
    half a second) and set torch's CPU threads. On exit both are restored and accelerate's
    process-wide state is cleared, since tests run this in-process."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# ---- building models ----------------------------------------------------------------------


def _random_(name: str, shape: torch.Size, dtype, device, generator) -> torch.Tensor:
    """Cheap init that keeps activations O(1): N(0, 1/fan_in) matrices, unit norm scales, zero biases."""
    if len(shape) >= 2:
        return torch.randn(shape, dtype=dtype, device=device, generator=generator) / math.sqrt(math.prod(shape[1:]))
    fill = 1.0 if name in ("weight", "scale") else 0.0
    return torch.full(shape, fill, dtype=dtype, device=device)


def build_on_device(model_cls, config: dict, device: torch.device, dtype: torch.dtype, quantization_config=None):
    """`model_cls` from `config` with random weights made directly on `device` (no host copy).

    With a bitsandbytes `quantization_config` it follows diffusers' from_pretrained: the
    quantizer swaps nn.Linear for bnb Linear4bit on the meta skeleton, then each weight is
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
        from iclora.backends.sdxl import LORA_TARGET_MODULES

        return LORA_TARGET_MODULES

    @staticmethod
    def reference_config(config: dict) -> dict:
        """Ours after SDXLBackend widened conv_in for concat conditioning."""
        from iclora.backends.sdxl import CONCAT_CHANNELS

        return {**config, "in_channels": CONCAT_CHANNELS}

    @staticmethod
    def latent_channels(config: dict) -> int:
        return config["out_channels"]

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
        from peft import prepare_model_for_kbit_training

        model = build_on_device(FluxTransformer2DModel, config, device, torch.bfloat16, QUANTIZE_CONFIGS["nf4"]())
        # As FluxBackend's loader (and diffusers' FLUX LoRA script) do after a quantized load.
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

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


FAMILIES = {"sdxl": SDXL, "flux": Flux}


def make_backend(family, denoiser):
    """Our backend around `denoiser`, through its own constructor. The VAE, text encoders,
    tokenizers and scheduler are the tiny in-code ones (a few MB on the CPU, never run); the
    VAE stand-in only answers config questions (scale factor, latent channels)."""
    from diffusers import AutoencoderKL

    components = family.stand_ins()
    latent_channels = family.latent_channels(dict(denoiser.config))
    if components["vae"].config.latent_channels != latent_channels:  # full-size FLUX: 16, tiny: 4
        components["vae"] = AutoencoderKL.from_config({**components["vae"].config, "latent_channels": latent_channels})
    components[family.denoiser_key] = denoiser
    return family.backend_cls()(components, f"random-init {family.name}", family.conditioning)


# ---- one phase: set up, time, count ---------------------------------------------------------


def fresh_accelerator(precision: str, device: torch.device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precisions fp16 needs a CUDA device (accelerate has no fp16 autocast on CPU): use bf16")
    AcceleratorState._reset_state(reset_partial_state=True)  # each setting has its own mixed precision
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")


def make_optimizer(params, adam8bit: bool):
    if adam8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=LR, weight_decay=WEIGHT_DECAY), "adamw8bit"
    try:
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True), "adamw-fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY), "adamw"


def make_inputs(family, config: dict, setting: Setting, device, dtype, masked_dtype) -> dict[str, Any]:
    """What the trainer hands `diffusion_loss`, at the real shapes: latents in the weight
    dtype, a 2x2 grid with three panels masked, cached text embeddings, the collated extras."""
    from iclora.panels import Grid, latent_mask, panel_mask

    width, height = setting.size
    b, f = setting.batch_size, 8
    latents = torch.randn(b, family.latent_channels(config), height // f, width // f, device=device, dtype=dtype)
    pixel_mask = torch.stack([panel_mask([1, 2, 3], Grid.parse("2x2"), height, width)] * b).to(device)  # (B, 1, H, W)
    return {
        "latents": latents,  # (B, C, h, w)
        "mask": latent_mask(pixel_mask, f).to(dtype),  # (B, 1, h, w)
        "masked_latents": torch.randn(latents.shape, device=device, dtype=masked_dtype),
        "prompt_embeds": family.prompt_embeds(config, b, device, dtype),
        "batch": {"original_size": torch.tensor([[height, width]] * b), "crop_top_left": torch.zeros(b, 2, dtype=torch.long)},
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flop_formulas() -> dict:
    """FLOP formulas FlopCounterMode lacks: the fused NF4 matmul bitsandbytes runs in its
    forward (`bitsandbytes::gemm_4bit`, on every device; its backward is a plain matmul) and
    PyTorch's CPU flash attention. Without them NF4 forwards count as zero."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def gemm_4bit(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(a_shape) * shape_b[0]  # A (..., K) @ W(N, K).T

    def cpu_sdpa(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    def cpu_sdpa_backward(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)

    return {
        torch.ops.bitsandbytes.gemm_4bit: gemm_4bit,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward,
    }


def measure(device, warmup: int, steps: int, step: Callable[[int], torch.Tensor],
            forward: Callable[[int], torch.Tensor], eager: Callable[[], Any]) -> dict[str, Any]:
    """Time warm-up + steps (synchronised, as the trainer's per-step loss.item() is), read the
    memory peaks, then count the FLOPs of one more step and of its forward alone (autograd
    on, so the same kernels run: bitsandbytes takes another path under no_grad). `eager()`
    swaps a compiled module back for the count: FlopCounterMode sees eager ops only."""
    from torch.utils.flop_counter import FlopCounterMode

    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        loss = step(i).detach().float().item()
        _sync(device)
        times.append(time.perf_counter() - start)
    result: dict[str, Any] = {"times": times, "s_per_step": statistics.median(times[warmup:]), "loss": loss}
    if device.type == "cuda":
        result["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    formulas = flop_formulas()
    with eager():
        with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
            step(warmup + steps)
        result["step_flops"] = counter.get_total_flops()
        with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
            forward(warmup + steps + 1)  # with autograd on: the step's own forward kernels
        result["forward_flops"] = counter.get_total_flops()
    return result


@contextlib.contextmanager
def _swapped(holder, attr: str, module):
    compiled = getattr(holder, attr)
    setattr(holder, attr, module)
    try:
        yield
    finally:
        setattr(holder, attr, compiled)


def maybe_compile(holder, attr: str, enabled: bool) -> Callable[[], Any]:
    """torch.compile holder.<attr> in place when enabled; returns the eager-swap context."""
    eager_module = getattr(holder, attr)
    if enabled:
        setattr(holder, attr, torch.compile(eager_module))
    return lambda: _swapped(holder, attr, eager_module)


def run_ours(setting: Setting, opts: RunOptions) -> dict[str, Any]:
    """The trainer's set-up (Trainer.setup order) and step (Trainer.train around diffusion_loss)."""
    from diffusers.optimization import get_scheduler

    from iclora.training.trainer import diffusion_loss, step_generator

    family, device = FAMILIES[setting.model], torch.device(opts.device)
    accelerator = fresh_accelerator(setting.precision, device)
    dtype = WEIGHT_DTYPES[setting.precision]
    config = family.config(opts.tiny)
    backend = make_backend(family, family.build(config, device, dtype, setting.nf4))
    backend.add_lora(setting.rank, setting.rank, opts.lora_dropout)
    if setting.checkpointing:
        backend.enable_gradient_checkpointing()
    backend.to(device, dtype)
    backend.release_text_encoders()  # as with --cache_text_embeddings
    if opts.channels_last:
        backend.denoiser.to(memory_format=torch.channels_last)
    optimizer, optimizer_name = make_optimizer(backend.trainable_parameters(), setting.adam8bit)
    lr_scheduler = get_scheduler("constant", optimizer)
    backend.denoiser, optimizer, lr_scheduler = accelerator.prepare(backend.denoiser, optimizer, lr_scheduler)
    eager = maybe_compile(backend, "denoiser", opts.compile)
    backend.denoiser.train()
    inputs = make_inputs(family, config, setting, device, dtype, backend.vae.dtype)
    skipped = 0

    def forward(i: int) -> torch.Tensor:
        return diffusion_loss(backend, inputs["latents"], inputs["mask"], inputs["masked_latents"],
                              inputs["prompt_embeds"], inputs["batch"], step_generator(SEED, i, 0), 0.0)

    def step(i: int) -> torch.Tensor:
        nonlocal skipped
        with accelerator.accumulate(backend.denoiser):
            loss = forward(i)
            accelerator.backward(loss)
            if accelerator.sync_gradients and MAX_GRAD_NORM > 0:
                accelerator.clip_grad_norm_(backend.trainable_parameters(), MAX_GRAD_NORM)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        skipped += int(accelerator.optimizer_step_was_skipped)
        return loss

    result = measure(device, opts.warmup, opts.steps, step, forward, eager)
    result.update(optimizer=optimizer_name, skipped_steps=skipped)
    accelerator.free_memory()
    return result


def run_reference(setting: Setting, opts: RunOptions) -> dict[str, Any]:
    """diffusers' dreambooth LoRA step at equal settings: the architecture ours trains (after
    our backend's changes), our LoRA targets, rank/alpha/dropout, optimizer, precision,
    checkpointing; LoRA weights in float32 (cast_training_params) as ours."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    family, device = FAMILIES[setting.model], torch.device(opts.device)
    accelerator = fresh_accelerator(setting.precision, device)
    dtype = WEIGHT_DTYPES[setting.precision]
    config = family.config(opts.tiny)
    scheduler = family.reference_scheduler(family.stand_ins()["scheduler"])  # the real model's config

    ref = types.SimpleNamespace(model=family.build(family.reference_config(config), device, dtype, setting.nf4))
    ref.model.requires_grad_(False)
    if setting.checkpointing:
        ref.model.enable_gradient_checkpointing()
    ref.model.add_adapter(LoraConfig(r=setting.rank, lora_alpha=setting.rank, lora_dropout=opts.lora_dropout,
                                     init_lora_weights="gaussian", target_modules=family.lora_targets()))
    cast_training_params(ref.model, dtype=torch.float32)
    if opts.channels_last:
        ref.model.to(memory_format=torch.channels_last)
    params = [p for p in ref.model.parameters() if p.requires_grad]
    optimizer, optimizer_name = make_optimizer(params, setting.adam8bit)
    lr_scheduler = get_scheduler("constant", optimizer)
    ref.model, optimizer, lr_scheduler = accelerator.prepare(ref.model, optimizer, lr_scheduler)
    eager = maybe_compile(ref, "model", opts.compile)
    ref.model.train()
    inputs = make_inputs(family, config, setting, device, dtype, torch.float32)  # (SDXL's VAE output dtype)
    skipped = 0

    def forward(i: int) -> torch.Tensor:
        return family.reference_loss(ref.model, scheduler, inputs, dtype)

    def step(i: int) -> torch.Tensor:
        nonlocal skipped
        loss = forward(i)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        skipped += int(accelerator.optimizer_step_was_skipped)
        return loss

    result = measure(device, opts.warmup, opts.steps, step, forward, eager)
    result.update(optimizer=optimizer_name, skipped_steps=skipped)
    accelerator.free_memory()
    return result


def _guard(phase: Callable[[], dict], device: torch.device) -> dict:
    """Run a phase; an out-of-memory becomes a result, and the memory is given back either way."""
    if device.type == "cuda" and torch.cuda.memory_allocated(device) > 64 * 2**20:
        print(f"warning: {torch.cuda.memory_allocated(device) / GIB:.2f} GiB still allocated from an earlier phase "
              "is counted in this one's peaks: use --isolate process", file=sys.stderr)
    try:
        return phase()
    except torch.cuda.OutOfMemoryError as error:
        return {"error": "OOM", "detail": str(error).splitlines()[0]}
    finally:
        _free(device)


def run_setting(setting: Setting, opts: RunOptions) -> dict[str, Any]:
    """Ours, then the reference, each from a freshly built model, in this process."""
    device = torch.device(opts.device)
    torch.manual_seed(SEED)
    result = {"setting": dataclasses.asdict(setting), "ours": _guard(lambda: run_ours(setting, opts), device)}
    if opts.reference:
        torch.manual_seed(SEED)
        result["reference"] = _guard(lambda: run_reference(setting, opts), device)
    return result


def matmul_peak(device: torch.device) -> dict[str, Any]:
    """Measured dense bf16 matmul throughput (FLOP/s): the MFU denominator. None off CUDA."""
    if device.type != "cuda":
        threads = torch.get_num_threads()
        name = f"CPU {platform.processor() or platform.machine()} ({threads} thread{'s' * (threads != 1)})"
        return {"peak_flops": None, "device_name": name}
    n, iters, best = 8192, 50, 0.0
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(5):
        torch.mm(a, b, out=out)
    for _ in range(5):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    del a, b, out
    _free(device)
    return {"peak_flops": best, "device_name": torch.cuda.get_device_name(device)}


# ---- isolation: one process per setting ---------------------------------------------------------


def _worker_call(job: dict, isolate: bool) -> dict:
    """Run a job here, or in a fresh interpreter: then no allocator state, compiled graph or
    leaked reference carries from one setting into the next, a crash costs one row, and
    `import diffusers` (~10 s) is the price. The worker's stderr streams through."""
    if not isolate:
        return _run_job(job)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_job", json.dumps(job), "--_result", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if proc.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
    error = {"error": f"worker died (exit {proc.returncode}; see its stderr)"}
    if job["kind"] == "peak":
        return {"peak_flops": None, "device_name": f"{job['options']['device']} (peak measurement failed)"}
    return {"setting": job["setting"], "ours": error, "reference": error}


def _run_job(job: dict) -> dict:
    opts = RunOptions(**job["options"])
    with process_state(opts.cpu_threads):
        if job["kind"] == "peak":
            return matmul_peak(torch.device(opts.device))
        setting = Setting(**{**job["setting"], "size": tuple(job["setting"]["size"])})
        return run_setting(setting, opts)


# ---- the matrix and the report ---------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() and int(p) % 64 == 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--sizes: expected WIDTHxHEIGHT in multiples of 64 (e.g. 1024x1536), got {text!r}")
    return int(parts[0]), int(parts[1])


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def _precision(text: str) -> str:
    if text not in WEIGHT_DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(WEIGHT_DTYPES)}, got {text!r}")
    return text


def _list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda text: [kind(part) for part in text.split(",") if part]


def settings_matrix(args) -> list[Setting]:
    preset = "tiny" if args.tiny else args.preset
    settings = []
    for model in args.models:
        axes = {axis: getattr(args, axis) or PRESETS[preset][model][axis] for axis in AXES}
        for size, bs, rank, ckpt, adam8, precision, nf4 in itertools.product(*(axes[a] for a in AXES)):
            settings.append(Setting(model, size, bs, rank, ckpt, adam8, precision, nf4))
    return settings


def target_limit(setting: Setting, tiny: bool) -> float | None:
    """The peak-reserved limit (GiB) of a target row, None for other rows."""
    if tiny:
        return None
    for match, limit in TARGETS:
        fields = dataclasses.asdict(setting)
        if all(sorted(fields[k]) == sorted(v) if k == "size" else fields[k] == v for k, v in match.items()):
            return limit
    return None


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


COLUMNS = ["model", "W×H", "bs", "rank", "ckpt", "optim", "prec", "nf4", "peak alloc GiB", "peak resv GiB",
           "s/step", "img/s", "TFLOP/step", "step/fwd FLOPs", "MFU", "ref s/step", "ref resv GiB",
           "time ×ref", "resv ×ref", "targets"]


def table_row(result: dict, peak_flops: float | None, tiny: bool) -> list[str]:
    s = Setting(**{**result["setting"], "size": tuple(result["setting"]["size"])})
    ours, ref = result["ours"], result.get("reference") or {}
    head = [s.model, f"{s.size[0]}×{s.size[1]}", str(s.batch_size), str(s.rank), "on" if s.checkpointing else "off",
            ours.get("optimizer", "adamw8bit" if s.adam8bit else "adamw"), s.precision, "on" if s.nf4 else "off"]
    limit = target_limit(s, tiny)
    targets = []
    if "error" in ours:
        cells = [ours["error"]] * 2 + ["-"] * 5
        if limit is not None:
            targets.append(f"resv ≤ {limit:g} GiB FAIL")
    else:
        sec, flops = ours["s_per_step"], ours["step_flops"]
        mfu = "n/a" if not peak_flops else f"{flops / sec / peak_flops:.1%}"
        cells = [_gib(ours.get("peak_allocated")), _gib(ours.get("peak_reserved")), f"{sec:.3f}",
                 f"{s.batch_size / sec:.2f}", f"{flops / 1e12:.3g}", _ratio(flops, ours["forward_flops"]), mfu]
        if limit is not None:
            peak = ours.get("peak_reserved")
            verdict = "n/a" if peak is None else ("PASS" if peak <= limit * GIB else "FAIL")
            targets.append(f"resv ≤ {limit:g} GiB {verdict}")
    if not ref:
        cells += ["-"] * 4
    elif "error" in ref or "error" in ours:
        cells += [ref.get("error", f"{ref.get('s_per_step', 0):.3f}"), _gib(ref.get("peak_reserved")), "-", "-"]
    else:
        time_ratio = ours["s_per_step"] / ref["s_per_step"]
        cells += [f"{ref['s_per_step']:.3f}", _gib(ref.get("peak_reserved")), f"{time_ratio:.3f}",
                  _ratio(ours.get("peak_reserved"), ref.get("peak_reserved"))]
        targets.append(f"time ≤ ref {'PASS' if time_ratio <= 1.0 else 'FAIL'}")
    skipped = ours.get("skipped_steps", 0) + ref.get("skipped_steps", 0)
    if skipped:
        targets.append(f"{skipped} fp16 steps skipped")
    return head + cells + ["; ".join(targets) or "-"]


def render(results: list[dict], peak: dict, command: str, args, notes: list[str]) -> str:
    import accelerate
    import bitsandbytes
    import diffusers
    import peft

    peak_flops = peak["peak_flops"]
    lines = [
        "# iclora training-step benchmark",
        "",
        f"- device: {peak['device_name']}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"accelerate {accelerate.__version__}, bitsandbytes {bitsandbytes.__version__}, python {platform.python_version()}",
        f"- command: `{command}`",
        f"- measured bf16 matmul peak: {'n/a' if not peak_flops else f'{peak_flops / 1e12:.0f} TFLOP/s'}",
        f"- {args.warmup} warm-up + {args.steps} timed steps per setting (median), LoRA alpha = rank, "
        f"dropout {args.lora_dropout}, compile {'on' if args.compile else 'off'}, "
        f"channels_last {'on' if args.channels_last else 'off'}, {'tiny configs' if args.tiny else 'full-size public configs'}",
        "- ours: the trainer's step (diffusion_loss + backward + clip + optimizer step) on cached latents/embeddings;"
        " ref: diffusers' dreambooth LoRA step at equal settings; ×ref = ours / ref",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(table_row(r, peak_flops, args.tiny)) + " |" for r in results]
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny in-code configs, a small matrix, CPU by default (smoke test)")
    p.add_argument("--preset", choices=["targets", "full"], default="targets",
                   help="default axes per model: the target rows, or the full matrix (ignored with --tiny)")
    p.add_argument("--models", type=_list(str), default=["sdxl", "flux"], help="comma list: sdxl,flux")
    p.add_argument("--sizes", type=_list(parse_size), help="comma list of WIDTHxHEIGHT (or one side), e.g. 1024,768,1024x1536")
    p.add_argument("--batch_sizes", type=_list(int), help="comma list, e.g. 1,2,4")
    p.add_argument("--ranks", type=_list(int), help="comma list of LoRA ranks, e.g. 16,64")
    p.add_argument("--checkpointing", type=_list(_on_off), help="gradient checkpointing: on,off")
    p.add_argument("--adam8bit", type=_list(_on_off), help="bitsandbytes AdamW8bit (else torch AdamW, fused): on,off")
    p.add_argument("--precisions", type=_list(_precision), help="accelerate mixed precision: fp16,bf16 (no = fp32)")
    p.add_argument("--nf4", type=_list(_on_off), help="FLUX transformer quantized to NF4 (bitsandbytes): on,off")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3, tiny 1; raise with --compile)")
    p.add_argument("--steps", type=int, help="timed steps (default 10, tiny 2)")
    p.add_argument("--lora_dropout", type=float, default=_TRAIN_DEFAULTS["lora_dropout"],
                   help="LoRA dropout, ours and the reference (default: TrainConfig's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (ours and reference)")
    p.add_argument("--channels_last", action="store_true", help="denoiser weights in channels_last (ours and reference)")
    p.add_argument("--no_reference", action="store_true", help="skip the diffusers reference step")
    p.add_argument("--device", choices=["cuda", "cpu"], help="cuda or cpu (default: cuda when available, cpu with --tiny)")
    p.add_argument("--cpu_threads", type=int, help="torch CPU threads (default: 1 with --tiny on CPU, else torch's)")
    p.add_argument("--isolate", choices=["auto", "process", "none"], default="auto",
                   help="a fresh process per setting (auto: on CUDA; none: all in this process)")
    p.add_argument("--out", type=Path, help="also write the markdown report here (atomically)")
    p.add_argument("--_job", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns one result dict per setting (the test reads them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args._job:  # a worker process
        result = _run_job(json.loads(args._job))
        from iclora.backends.lora_files import atomic_write_text

        atomic_write_text(json.dumps(result), args._result)
        return [result]

    unknown = [m for m in args.models if m not in FAMILIES]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)} (choose from sdxl, flux)")
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --tiny for a CPU run)")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be at least 1 and --warmup not negative")
    isolate = args.isolate == "process" or (args.isolate == "auto" and device.startswith("cuda"))
    # Tiny ops gain nothing from threads, and on a shared small CPU OpenMP spin-waits made a
    # tiny step 10-50x slower with 2 threads than with 1.
    threads = args.cpu_threads or (1 if args.tiny and device == "cpu" else None)
    options = dataclasses.asdict(RunOptions(args.tiny, device, args.warmup, args.steps, args.lora_dropout,
                                            args.compile, args.channels_last, not args.no_reference, threads))

    notes, settings = [], []
    for setting in settings_matrix(args):
        problem = _unsupported(setting)
        if problem and problem not in notes:
            notes.append(problem)
        if not problem:
            settings.append(setting)
    if device == "cpu" and any(s.precision == "fp16" for s in settings):
        raise SystemExit("--precisions fp16 needs CUDA (accelerate has no fp16 autocast on CPU): use bf16 or no")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    peak = _worker_call({"kind": "peak", "options": options}, isolate)
    results = []
    for i, setting in enumerate(settings, 1):
        print(f"[{i}/{len(settings)}] {setting}", file=sys.stderr, flush=True)
        job = {"kind": "setting", "setting": dataclasses.asdict(setting), "options": options}
        results.append(_worker_call(job, isolate))
    command = "python benchmarks/train_memory.py " + shlex.join(argv)
    report = render(results, peak, command.strip(), args, notes)
    print(report)
    if args.out:
        from iclora.backends.lora_files import atomic_write_text

        atomic_write_text(report, args.out)
    return results


def _unsupported(setting: Setting) -> str | None:
    """Why a setting cannot run here (printed as a note), or None."""
    if setting.model == "sdxl" and setting.nf4:
        return "SDXL rows with --nf4 on skipped: the SDXL backend has no quantized loading"
    if setting.model == "flux":
        try:
            Flux.backend_cls()
        except ImportError as error:
            return f"FLUX rows skipped: iclora.backends.flux.FluxBackend is not importable ({error})"
    return None


if __name__ == "__main__":
    main()
