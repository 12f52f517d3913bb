"""The inference estimate: peak GPU memory per phase of one inference run and its host RAM,
from the same model sizes and activation terms as training's estimate (prepare/memory.py),
for the models as inference's memory plan places them (inference/memory_plan.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .memory import (
    ALLOCATOR_OVERHEAD,
    Estimate,
    GIB,
    HOST_BASELINE,
    INT8_BYTES,
    ModelSizes,
    NF4_BYTES,
    SAMPLING_SHARE,
    Settings,
    VAE_BYTES_PER_PIXEL,
    _activations,
    _profile,
    _weights,
)


@dataclass
class InferSettings:
    """What the inference estimate reads: one pipeline call at the largest working size."""

    height: int
    width: int
    batch: int  # images in one pipeline call
    precision: str  # "fp16", "bf16", "no" (float32)
    quantize: str | None
    guidance_scale: float
    tiling: bool  # the VAE in tiles of at most VAE_TILE_PIXELS
    slicing: bool  # the VAE one image at a time
    cpu_offload: bool  # each model on the GPU only while it runs
    lora: int  # parameters of the LoRA file
    conditioning: str | None
    context_timestep: str | None


TEXT_ACTIVATIONS = 0.1  # GiB: encoding one prompt (as training's caching phase counts it)
VAE_TILE_PIXELS = 1024 * 1024  # the SDXL and FLUX.1 VAEs' sample_size squared (diffusers' tiles)


def inference_estimate(sizes: ModelSizes, s: InferSettings) -> Estimate:
    """Peak GPU memory per phase of one inference run, and its host RAM, as the memory plan
    places the models (inference/memory_plan.py): the text encoders alone while every
    prompt is encoded, then the denoiser and the VAE; with --cpu_offload each model only
    while it runs. The denoiser's activations are a sample sheet's (a forward, no gradients)."""
    half = 4 if s.precision == "no" else 2
    w = _weights(sizes, Settings(s.height, s.width, 1, 1, sizes.rank, s.precision, None, True, False, False,
                                 False, s.conditioning or "blend", s.context_timestep, False))
    if s.quantize:  # the unquantized leftovers compute in the 16-bit dtype at inference
        packed = NF4_BYTES if s.quantize == "nf4" else INT8_BYTES
        w["denoiser"] = (sizes.denoiser_linear * packed + (sizes.denoiser - sizes.denoiser_linear) * half) / GIB
    lora = s.lora * half / GIB
    # SDXL's classifier-free guidance runs the denoiser on twice the batch; FLUX.1's guidance
    # is distilled into one pass.
    batch = s.batch * (2 if _profile(sizes.backend).guidance_doubles_batch and s.guidance_scale > 1 else 1)
    step = Settings(s.height, s.width, batch, 1, sizes.rank, s.precision, s.quantize, True, False, True, True,
                    s.conditioning or "blend", s.context_timestep, True)
    denoise_act = _activations(sizes, step) * SAMPLING_SHARE
    pixels = min(s.height * s.width, VAE_TILE_PIXELS) if s.tiling else s.height * s.width
    vae_act = pixels * (1 if s.slicing else s.batch) * VAE_BYTES_PER_PIXEL * sizes.vae_scale * (w["vae_bytes"] / 4) / GIB
    if s.cpu_offload:
        # One model at a time: the larger text encoder, then the denoiser, then the VAE.
        gpu = {"text encoding": max(n * half for n in sizes.text_encoders) / GIB,
               "denoising": w["denoiser"] + lora + denoise_act, "VAE decode": w["vae"] + vae_act}
    else:
        # A quantized denoiser loads onto the GPU and leaves it while the prompts are encoded.
        resident = w["denoiser"] + lora + w["vae"]
        gpu = {"load": w["denoiser"] if s.quantize else 0.0, "text encoding": w["text_encoders"] + TEXT_ACTIVATIONS,
               "denoising": resident + denoise_act, "VAE decode": resident + vae_act}
    # The host holds every model but a quantized denoiser, and that one too while it waits
    # for the text encoding (not with --cpu_offload: it never leaves the GPU then).
    waits = s.quantize and not s.cpu_offload
    host = HOST_BASELINE + w["text_encoders"] + w["vae"] + lora + (0.0 if s.quantize and not waits else w["denoiser"])
    return Estimate({k: round(v + ALLOCATOR_OVERHEAD, 2) for k, v in gpu.items()}, host, _profile(sizes.backend).extrapolated)
