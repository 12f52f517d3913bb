"""SDXL with clean context: panel completion where the visible panels reach the UNet as
their clean latents at every step.

The UNet has one global timestep, so the clean panels are modulated with the current t
(FLUX.1 Kontext's way). In the UNet's input space (DDPM's x_t, what
`scheduler.scale_model_input` returns for every scheduler) a clean latent is x_0 itself, so
the model input is `where(masked, scale_model_input(latents, t), clean)`: exactly what
training feeds (iclora.backends.base.with_clean_context). The loop is the backends' shared
one (context_loop.py), calling the backend's training `predict`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..panels import latent_mask
from .base import repeat_to_batch
from .context_loop import Schedule, complete_in_context
from .sdxl_latents import SDXLLatents


class SDXLContextPipeline(StableDiffusionXLInpaintPipeline):
    """StableDiffusionXLInpaintPipeline's components and helpers with a denoising loop that
    never re-noises the visible panels (4-channel UNets).

    Batches as the stock pipeline does: `num_images_per_prompt` images per prompt, one
    generator per image (each draws its image's noise, in a one-image call's order), and
    `image` / `mask_image` either one for every image or one per image."""

    predict: Callable | None = None  # the backend's training prediction (set by the backend)

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
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
    ) -> StableDiffusionXLPipelineOutput:
        device = self._execution_device
        dtype = self.unet.dtype
        cfg = guidance_scale > 1.0
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt, device=device, num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )
        batch = embeds.shape[0]  # prompts x num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch} images")
        size = torch.tensor([[height, width]], device=device).repeat(batch, 1)  # (B, 2)
        conditions = {"original_size": size, "crop_top_left": torch.zeros_like(size)}  # SDXL's micro-conditioning

        codec = SDXLLatents(self.vae)
        pixels = self.image_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
        # The posterior mean, one input at a time as the stock pipeline encodes a batch: the same memory as one image.
        clean = codec.encode_mean(pixels, one_at_a_time=True)
        clean = repeat_to_batch(clean.to(dtype), batch, "images")  # (B, 4, h, w)
        pixel_mask = self.mask_processor.preprocess(mask_image, height=height, width=width).to(device)  # (b, 1, H, W)
        mask = (latent_mask(pixel_mask, self.vae_scale_factor) >= 0.5).to(dtype)  # (b, 1, h, w), 1 = masked
        mask = repeat_to_batch(mask, batch, "masks")  # (B, 1, h, w)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, device)
        noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=dtype)  # a row per generator
        step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)
        schedule = Schedule(
            timesteps,
            noised=self.scheduler.add_noise,
            step=lambda prediction, t, x: self.scheduler.step(prediction, t, x, **step_kwargs, return_dict=False)[0],
            model_input=self.scheduler.scale_model_input,
            init_noise_sigma=self.scheduler.init_noise_sigma,
        )
        prompt = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        uncond = {"prompt_embeds": negative, "pooled_prompt_embeds": negative_pooled} if cfg else None
        latents = complete_in_context(self.predict, schedule, clean, mask, noise, prompt, uncond, guidance_scale,
                                      conditions, strength, progress=self.progress_bar)
        if output_type == "latent":
            return StableDiffusionXLPipelineOutput(images=latents)
        decoded = codec.decode(latents)
        self.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=self.image_processor.postprocess(decoded, output_type=output_type))
