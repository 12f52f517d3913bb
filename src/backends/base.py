"""The contract every model backend (SDXL, FLUX.1) fulfils.

The shared trainer and the shared inference code talk to a backend only through these
methods. Tensors crossing the contract are plain image-space layouts:

    pixels        (B, 3, H, W)  in [-1, 1]
    pixel masks   (B, 1, H, W)  1 = masked (to generate), 0 = visible
    latents       (B, C, h, w)  scaled latents, h = H / vae_scale_factor
    latent masks  (B, 1, h, w)

Anything model-specific (FLUX's packed 2x2 patches and image ids, SDXL's time ids, the
noise schedule) stays inside the backend.

Conditioning on the visible panels ("conditioning" attribute):

    concat  The denoiser input is [noisy latent, mask, masked-image latent] on the channel
            axis (SDXL inpainting / FLUX.1-Fill layout). A sample with no masked panel is
            trained as every panel masked (text -> image set).
    blend   The denoiser input is the noisy latent of the whole composite: the visible
            panels are their clean latents noised to the current timestep with the same
            noise as everything else. Inference gives the model exactly that by latent
            blending (diffusers' inpaint pipelines: after each step the visible region is
            reset to the input latents noised to the next timestep), so training and
            inference see the same thing. The loss is taken on the masked panels.
    context The denoiser input is the noisy latent where panels are masked and the *clean*
            latent where they are visible (`with_clean_context`); the loss is on the masked
            panels. Inference keeps the visible panels clean at every step, never
            re-noised. 4-channel bases, LoRA only. How the clean tokens are modulated
            (`context_timestep`: the shared t, or timestep 0 per token) is the backend's.
    reference  The whole composite is noisy; the masked-image latents (the composite with
            its masked panels blanked, as for concat) enter as separate reference tokens
            beside it, as editing models take reference images (FLUX.2 [klein]); the loss is
            on the masked panels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:  # the codec module imports diffusers
    from .latents import LatentCodec


CONDITIONINGS = ("concat", "blend", "context", "reference")


def with_clean_context(noisy: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """'context' conditioning's denoiser input: `noisy` where the latent mask (B, 1, h, w) is
    1 (masked), `clean` where it is 0 (visible)."""
    return torch.where(mask > 0.5, noisy, clean)


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TimestepSampling:
    """How training draws each sample's noise level u in [0, 1) (1 = pure noise): uniform, or
    sigmoid of a normal (SD3's logit-normal). A positive `logit_mean` spends more steps at
    high noise, where a composite's layout and colours are decided; the backend maps u to
    its own timesteps (SDXL: DDPM's t = u * 1000; FLUX: the flow sigma itself). `shift`
    'resolution' (FLUX): the backend then moves u as its scheduler moves inference's
    schedule for the composite's size; 'none': u is used as drawn."""

    scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: str = "none"

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size,) noise levels, on the CPU, from `generator` alone."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        return compute_density_for_timestep_sampling(
            "logit_normal" if self.scheme == "logit_normal" else "none", batch_size=batch_size,
            logit_mean=self.logit_mean, logit_std=self.logit_std, generator=generator,
        )


def repeat_to_batch(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """(b, ...) -> (batch, ...): one input shared by every image, or one input per image
    (as diffusers' pipelines repeat their image and mask latents). A tensor already of the
    batch comes back as it is: a copy would change its strides, and with them the kernels
    that later ops pick, and so the last bits of a one-image result."""
    if tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise ValueError(f"{tensor.shape[0]} {what} cannot be shared out over a batch of {batch} images")
    return tensor.repeat(batch // tensor.shape[0], *[1] * (tensor.dim() - 1))


def visible_reset_callback(clean: torch.Tensor, noise: torch.Tensor, masked: torch.Tensor, renoise) -> dict[str, Any]:
    """A pipeline's step-end callback (and its kwargs) that resets the visible region of the
    latents to `clean` noised to the next timestep by `renoise(clean, noise, t)` (the
    scheduler's own forward process), and to `clean` itself after the last step, through the
    soft mask `masked` (1 = generated): what diffusers' 4-channel inpaint pipelines do."""

    def reset(pipe, i, t, tensors):
        timesteps = pipe.scheduler.timesteps
        index = int((timesteps == t).nonzero()[0])
        target = clean
        if index + 1 < len(timesteps):
            target = renoise(pipe.scheduler, clean, noise, timesteps[index + 1 : index + 2])
        return {"latents": masked * tensors["latents"] + (1 - masked) * target}

    return {"callback_on_step_end": reset, "callback_on_step_end_tensor_inputs": ["latents"]}


class Backend(Protocol):
    name: str
    """Short name: 'sdxl' or 'flux'."""
    base_model: str
    """The model id or folder the backend was loaded from (recorded with the LoRA)."""
    conditioning: str
    """'concat', 'blend' or 'context' (see the module docstring)."""
    context_timestep: str | None
    """With 'context': how the clean tokens are modulated ('shared' t, or 'zero' per token);
    None otherwise. Recorded with the LoRA, so inference uses what training used."""
    vae_scale_factor: int
    """Pixels per latent pixel."""
    pixel_quantum: int
    """Every panel boundary must fall on a multiple of this many pixels (a latent pixel for
    SDXL, a packed 2x2 latent patch for FLUX)."""
    native_image_size: int
    """The longer side, in pixels, the base model generates at by default (SDXL, FLUX.1: 1024):
    inference's working size when no image_size is recorded with the LoRA."""
    preferred_mixed_precision: str
    """Mixed precision used on CUDA when --mixed_precision is not given ('fp16' or 'bf16')."""
    quantized: bool
    """Whether the denoiser's frozen weights are bitsandbytes 4/8-bit (they keep their own
    dtype and device: callers must not cast it)."""
    max_token_length: int
    """CLIP tokens read from a prompt, the same in training and inference (SDXL: 75, 150 or
    225, kohya's chunked encoding; FLUX: 75); recorded with the LoRA."""
    timestep_sampling: TimestepSampling
    """How `noise_latents` draws noise levels; the backend's own default until the trainer
    sets the one of --timestep_sampling."""
    denoiser: torch.nn.Module
    """The module that is trained (UNet / transformer). The trainer may replace it by its
    distributed wrapper; the backend must call it through this attribute."""
    compiled: Any
    """What `compile_blocks` compiled (iclora.compiling.CompiledBlocks); None: all eager."""

    def add_lora(self, rank: int, alpha: float, dropout: float, convs: bool = False) -> None:
        """Freeze the base model and add a PEFT LoRA to the denoiser's attention and
        feed-forward layers, with `convs` also to its conv layers (the spec's
        lora_conv_targets), plus whatever the conditioning needs trained fully."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Everything the optimizer updates; nothing of the VAE or the text encoders."""

    def fully_trained_parameters(self) -> list[torch.nn.Parameter]:
        """The part of `trainable_parameters` that is trained in full, not as a LoRA (SDXL
        concat: the widened conv_in); --conv_in_learning_rate applies to it."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations of the denoiser's blocks in the backward pass."""

    def shard_units(self) -> list[torch.nn.Module]:
        """--distributed fsdp: the denoiser's repeated blocks, each sharded as one FSDP2 unit
        (training/distributed.py; the rest of the denoiser is sharded as one more). FSDP2
        gathers a unit's weights around its `forward`; a unit the backend runs through another
        method names it in its `fsdp_forward_methods` attribute."""

    def compile_blocks(self, **options: Any) -> Any:
        """--compile: torch.compile the denoiser's repeated blocks where they actually run
        (regional compilation, iclora.compiling), `options` passed to torch.compile; after
        `add_lora` / `load_lora` and `enable_gradient_checkpointing`. Parameter names stay as
        they are. Returns and keeps (`compiled`) the blocks compiled, counted by class."""

    def to(self, device: torch.device, dtype: torch.dtype, parts: tuple[str, ...] = ...) -> None:
        """Make `device` the training device, cast the frozen weights to `dtype` (the VAE and
        fp16 T5 layers as the model needs) and the trainable ones to float32 where they lie,
        then move `parts` ('denoiser', 'text_encoders', 'vae'; default all) onto `device`."""

    def place(self, part: str, on_device: bool) -> None:
        """Move one part onto the training device or to the host (placement.py)."""

    def is_placed(self, part: str) -> bool:
        """Whether `part` is on the training device."""

    def placement(self) -> dict[str, dict]:
        """Where each model is and in which dtype, as recorded by `to` / `place`."""

    def release_text_encoders(self) -> None:
        """Move the text encoders off the accelerator (after prompts are cached)."""

    def release_vae(self) -> None:
        """Move the VAE off the accelerator (after latents are cached)."""

    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text embeddings for a batch of prompts, each tensor batch-first, so they can be
        cached per caption and stacked again."""

    def unconditional_prompt(self) -> dict[str, torch.Tensor]:
        """What inference's unconditional branch is fed when no negative prompt is given, as
        `encode_prompt` of one prompt (SDXL: zeros where the pipeline zeroes empty prompts,
        force_zeros_for_empty_prompt; FLUX: the encoding of ""). Caption dropout trains on it."""

    @property
    def codec(self) -> LatentCodec:
        """The backend's latent codec around its VAE (iclora.backends.latents): pixels <->
        the normalised latents the denoiser sees. Training, the latent cache, the context
        pipelines and the visible resets encode and decode through it."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, h, w): `codec.encode`
        (latents.LatentMethods gives this and the next two from the codec)."""

    def latent_distribution(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (B, 2C, h, w): mean and log-variance, unscaled:
        `codec.posterior`. What the latent cache stores."""

    def sample_latents(self, parameters: torch.Tensor) -> torch.Tensor:
        """Draw scaled latents (B, C, h, w) from `latent_distribution`'s parameters, on their
        device, from the global RNG (as the VAE's own sampling): `codec.sample`."""

    def masked_image_latents(self, pixels: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor | None:
        """Latents of the image with the masked panels blanked, for 'concat'; None for
        'blend'."""

    def noise_latents(
        self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw a training timestep per sample: (noisy latents, timesteps, loss target)."""

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: dict[str, torch.Tensor],
        mask: torch.Tensor,
        masked_latents: torch.Tensor | None,
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """The denoiser's prediction (B, C, h, w), comparable to the loss target. `batch`
        carries per-sample extras (SDXL micro-conditioning: original size, crop; FLUX.1's
        distilled guidance at inference). Training calls it, and so does inference's context
        loop (context_loop.complete_in_context), which runs the model exactly as trained."""

    def save_lora(self, directory: Path, compat: bool = True, dtype: torch.dtype = torch.float16) -> None:
        """Write the trained weights into `directory`, in `dtype` (lora_files.cast_lora):
        pytorch_lora_weights.safetensors (diffusers format, alpha in its metadata), whatever
        the conditioning needs beside it (SDXL concat: conv_in.safetensors) and, with `compat`,
        pytorch_lora_weights_comfyui.safetensors (`comfyui_state`)."""

    def comfyui_state(self) -> dict[str, torch.Tensor]:
        """The trained LoRA as ComfyUI, A1111/Forge and kohya load it in full at the trained
        scale (see lora_formats.py for the key layout per model)."""

    def load_lora(self, path: Path) -> None:
        """Load a LoRA folder (ours: final_model/ or a checkpoint) or a single .safetensors
        file (ours or foreign). Raises ValueError when none of its layers lands in the
        denoiser or when it needs a conditioning other than the backend's (a concat LoRA
        without its trained conv_in); warns when only some of its layers land."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """All trainable tensors, for checkpoints."""

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of trainable_state_dict."""

    def pipeline_prompt(self, prompt: str, negative_prompt: str | None, guidance_scale: float) -> dict[str, Any]:
        """The prompt arguments for `inpaint_pipeline()`, encoded as training encodes them
        (text, or precomputed embeddings where the pipeline's own encoding would differ)."""

    def encoded_pipeline_prompt(self, prompt: str, negative_prompt: str | None, guidance_scale: float) -> dict[str, Any]:
        """`pipeline_prompt`'s arguments with every text encoded already (tensors only): sample
        sheets pass them so that no text encoder returns to the device during training."""

    def inpaint_pipeline(self) -> Any:
        """A diffusers pipeline for panel inpainting built from the loaded components."""

    def visible_reset(self, pipe: Any, images: list, masks: torch.Tensor, seeds: list[int]) -> dict[str, Any]:
        """The extra arguments of an `inpaint_pipeline()` call that keep the visible panels on
        the input's noised trajectory ('concat': a step-end callback; {} where the pipeline
        does it itself). `images` (PIL, at the call's size) and `masks` (b, 1, H, W): one for
        every seed of the call, or one per seed."""
