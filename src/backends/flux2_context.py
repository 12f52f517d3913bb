"""FLUX.2 with clean context tokens: visible panels enter the transformer as their clean
latents, modulated as timestep 0 per token; masked panels as noisy latents at t.

FLUX.2 computes its adaLN modulation once per forward for all blocks
(`double_stream_modulation_img`, `single_stream_modulation`: (B, kD) from the timestep
embedding) and its blocks broadcast whatever they are given, so per-token modulation
(B, N, kD) needs no copy of the forward: `ContextDenoiser` computes the timestep-0
modulations and, for the one stock forward call, hooks the two modulation modules so that
their output is the timestep-0 one at the clean image tokens (`torch.where`). The text
stream keeps t, as in diffusers' own reference-token path (`kv_cache_mode="extract"`,
`ref_fixed_timestep=0.0`, which allows one count of prepended tokens per batch; here each
sample has its own mask and its panels stay in place, at the grid's own positions).
`norm_out` is left at t: it acts per token after the last attention, so it changes only
the clean tokens' outputs, which no loss reads and inference discards. With no clean token
the forward is the stock one exactly; the compiled blocks (--compile) are the stock ones.

`context_timestep` 'shared' feeds the clean tokens with the shared t (the stock forward).

`Flux2ContextPipeline` is the inference side: Flux2KleinPipeline's components and prompt
handling, denoising that calls the backend's training `predict`, so training and inference
run the same model math by construction. The visible tokens stay clean at every step
('context': the loop every backend's context completion shares, context_loop.py), or are reset to the input noised to the next sigma after every step
('blend', as diffusers' inpaint pipelines); with every panel masked the loop is the stock
text -> image loop (the same noise, sigmas, mu and CFG).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..panels import latent_mask
from . import flux2_latents as codec
from .base import repeat_to_batch
from .context_loop import Schedule, complete_in_context

CONTEXT_TIMESTEPS = ("zero", "shared")


def clean_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """Latent mask (B, 1, h, w), 1 = masked -> (B, h * w, 1) bool, True where visible. A FLUX.2
    contract latent pixel is one token (flux2_latents.py)."""
    return codec.to_tokens(mask) < 0.5


def _per_token(clean: torch.Tensor, at_zero: torch.Tensor, at_t: torch.Tensor) -> torch.Tensor:
    """(B, N, 1) bool, (B, kD), (B, kD) -> (B, N, kD): timestep-0 modulation where clean."""
    return torch.where(clean, at_zero[:, None], at_t[:, None])


class ContextDenoiser(torch.nn.Module):
    """The trained module in 'zero' mode: the transformer behind a forward that also takes
    the clean-token mask (B, N, 1), so a distributed wrapper sees (and syncs) every call."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, clean_tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        transformer = self.transformer
        if not bool(clean_tokens.any()):
            return transformer(**kwargs, return_dict=False)
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        guidance = kwargs.get("guidance")
        # As the forward embeds its timestep: in the input's dtype, on the 0..1000 scale.
        zero = torch.zeros(hidden.shape[0], device=hidden.device, dtype=hidden.dtype)
        temb_zero = transformer.time_guidance_embed(zero, None if guidance is None else guidance.to(hidden.dtype) * 1000)
        image_zero = transformer.double_stream_modulation_img(temb_zero)  # (B, 6D)
        single_zero = transformer.single_stream_modulation(temb_zero)  # (B, 3D)
        # Single blocks run on [text, image]: the text tokens keep t.
        single_clean = torch.cat([clean_tokens.new_zeros(clean_tokens.shape[0], text.shape[1], 1), clean_tokens], dim=1)
        hooks = [
            transformer.double_stream_modulation_img.register_forward_hook(
                lambda module, args, out: _per_token(clean_tokens, image_zero, out)),  # (B, N, 6D)
            transformer.single_stream_modulation.register_forward_hook(
                lambda module, args, out: _per_token(single_clean, single_zero, out)),  # (B, T + N, 3D)
        ]
        try:
            return transformer(**kwargs, return_dict=False)
        finally:
            for hook in hooks:
                hook.remove()


class Flux2ContextPipeline(Flux2KleinPipeline):
    """Panel completion: `image` (PIL, one or one per image), `mask_image` (b, 1, H, W), 1 =
    generate. Batches as the stock pipeline: `num_images_per_prompt` images per prompt, one
    generator per image (each draws its image's noise as a one-image call does)."""

    predict: Callable | None = None  # the backend's training prediction (set by the backend)
    conditioning: str = "context"
    max_sequence_length: int = 512

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, is_distilled: bool = False):
        super().__init__(scheduler, vae, text_encoder, tokenizer, transformer, is_distilled)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=2 * self.vae_scale_factor, do_normalize=False,
                                                do_binarize=False, do_convert_grayscale=True)

    def _embeds(self, prompt, prompt_embeds, device) -> torch.Tensor:
        if prompt_embeds is None:
            prompt_embeds = self._get_qwen3_prompt_embeds(self.text_encoder, self.tokenizer, prompt, device=device,
                                                          max_sequence_length=self.max_sequence_length)
        return prompt_embeds.to(device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        height: int = 1024,
        width: int = 1024,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> Flux2PipelineOutput:
        device, dtype = self._execution_device, self.transformer.dtype
        embeds = self._embeds(prompt, prompt_embeds, device).repeat_interleave(num_images_per_prompt, 0)  # (B, L, D)
        batch = embeds.shape[0]
        cfg = guidance_scale > 1 and not self.config.is_distilled
        if cfg:
            negative = self._embeds([""] * (batch // num_images_per_prompt), negative_prompt_embeds, device)
            negative = repeat_to_batch(negative.repeat_interleave(num_images_per_prompt, 0), batch, "negative prompts")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch} images")
        f = 2 * self.vae_scale_factor  # pixels per token
        h, w = height // f, width // f
        channels = self.transformer.config.in_channels

        pixels = self.image_processor.preprocess(image, height=height, width=width).to(device, self.vae.dtype)
        # One input at a time, as the stock pipeline encodes its references: the posterior mean.
        clean = codec.Flux2Latents(self.vae).encode_mean(pixels, one_at_a_time=True).to(dtype)
        clean = repeat_to_batch(clean, batch, "images")  # (B, 4C, h, w)
        pixel_mask = self.mask_processor.preprocess(mask_image, height=height, width=width).to(device)  # (b, 1, H, W)
        mask = repeat_to_batch((latent_mask(pixel_mask, f) >= 0.5).to(dtype), batch, "masks")  # (B, 1, h, w)
        reference = None
        if self.conditioning == "reference":  # the masked panels blanked, as training's masked-image latents
            blanked = pixels * repeat_to_batch(pixel_mask < 0.5, len(pixels), "masks").to(pixels.dtype)
            reference = codec.Flux2Latents(self.vae).encode_mean(blanked, one_at_a_time=True).to(dtype)
            reference = repeat_to_batch(reference, batch, "images")  # (B, 4C, h, w)

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=num_inference_steps)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        timesteps = timesteps[start:]
        self.scheduler.set_begin_index(start)

        # The stock pipeline's draw: (B, 4C, h, w), one row per generator.
        noise = randn_tensor((batch, channels, h, w), generator=generator, device=device, dtype=dtype)
        prompt, unconditional = {"prompt_embeds": embeds}, ({"prompt_embeds": negative} if cfg else None)
        schedule = Schedule(
            timesteps,
            noised=lambda x, n, t: self.scheduler.scale_noise(x, t, n),
            step=lambda velocity, t, x: self.scheduler.step(velocity, t, x, return_dict=False)[0],
        )
        if self.conditioning == "context":  # the loop every backend's context completion shares
            latents = complete_in_context(self.predict, schedule, clean, mask, noise, prompt, unconditional,
                                          guidance_scale, strength=strength, progress=self.progress_bar)
        else:
            latents = self._denoise_whole(schedule, clean, mask, noise, prompt, unconditional, guidance_scale,
                                          strength, reference)
        if output_type == "latent":
            return Flux2PipelineOutput(images=latents)
        decoded = codec.Flux2Latents(self.vae).decode(latents)
        self.maybe_free_model_hooks()
        return Flux2PipelineOutput(images=self.image_processor.postprocess(decoded, output_type=output_type))

    def _denoise_whole(self, schedule, clean, mask, noise, prompt, unconditional, guidance_scale, strength, reference):
        """'blend' and 'reference': the whole composite is denoised, through the backend's
        `predict` (with the reference latents as its masked-image input). 'blend' resets the
        visible region to the input noised to the next sigma after every step (diffusers'
        inpaint pipelines); both end with the input's own latents where it is kept."""
        timesteps, visible = schedule.timesteps, mask < 0.5
        latents = schedule.noised(clean, noise, timesteps[:1].repeat(len(clean))) if strength < 1.0 else noise
        for i, t in enumerate(self.progress_bar(timesteps)):
            step = t.expand(len(latents)).to(latents.dtype)
            velocity = self.predict(latents, step, prompt, mask, reference, {})
            if unconditional is not None:
                uncond = self.predict(latents, step, unconditional, mask, reference, {})
                velocity = uncond + guidance_scale * (velocity - uncond)
            latents = schedule.step(velocity, t, latents)
            if self.conditioning == "blend" and i + 1 < len(timesteps):
                latents = torch.where(visible, schedule.noised(clean, noise, timesteps[i + 1 : i + 2]), latents)
        return torch.where(visible, clean, latents)


__all__ = ["CONTEXT_TIMESTEPS", "ContextDenoiser", "Flux2ContextPipeline", "clean_token_mask"]
