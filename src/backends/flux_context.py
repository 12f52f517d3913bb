"""FLUX.1 with clean context tokens: the visible panels' tokens enter the transformer as
their clean latents, the masked panels' tokens as noisy latents at sigma.

Two ways to tell the transformer which tokens are clean (`context_timestep`):

    shared  every token is modulated with the one global timestep (FLUX.1 Kontext feeds its
            clean context tokens this way): the stock forward, unchanged.
    zero    clean tokens are modulated as timestep 0, noisy ones at t, per token
            (OminiControl's token integration; LTX-2's per-token timesteps). Only the adaLN
            modulation of the double blocks, the single blocks and `norm_out` changes:
            sequence length, RoPE ids and attention are the stock ones, so it costs no
            extra compute. `context_forward` mirrors diffusers' FluxTransformer2DModel
            .forward block for block; with no clean token it reproduces it exactly.

`FluxContextPipeline` is the inference side: the visible tokens stay clean at every step
(never re-noised), the masked ones are denoised by the model's own flow-matching scheduler,
in the backends' shared loop (context_loop.py) that calls the backend's training `predict`:
training and inference run the same transformer call (in `zero` mode through `ContextDenoiser`).

--compile (iclora.compiling) in `zero` mode: `context_forward` runs each block through
`_double_block` / `_single_block`, never through the block's own forward, which is what
`compile_repeated_blocks` compiles; `ContextDenoiser.compile_blocks` compiles those two
functions instead. The block is an argument and its weights graph inputs, so one compiled
graph serves every block of a kind, as with `compile_repeated_blocks`.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_flux_inpaint import FluxInpaintPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..panels import latent_mask
from .base import repeat_to_batch
from .context_loop import Schedule, complete_in_context
from .flux_latents import FluxLatents, pack

CONTEXT_TIMESTEPS = ("zero", "shared")


def shift_mu(scheduler_config, image_seq_len: int) -> float:
    """mu of the scheduler's resolution-dependent shift for an image of `image_seq_len` packed
    tokens, as every FLUX pipeline computes it (`calculate_shift` with the scheduler's config)."""
    return calculate_shift(
        image_seq_len, scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15),
    )


def clean_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """Latent mask (B, 1, h, w), 1 = masked -> (B, h/2 * w/2, 1) bool, True where a whole
    2x2 patch is visible (a token with any masked latent pixel is denoised)."""
    tokens = pack(mask)  # (B, N, 4)
    return tokens.amax(dim=-1, keepdim=True) < 0.5


def _per_token(clean: torch.Tensor, at_zero: torch.Tensor, at_t: torch.Tensor) -> torch.Tensor:
    """(B, N, 1) bool, (B, D), (B, D) -> (B, N, D): the clean tokens' modulation or the noisy ones'."""
    return torch.where(clean, at_zero[:, None], at_t[:, None])


def _modulations(norm: torch.nn.Module, temb_zero: torch.Tensor, temb: torch.Tensor, chunks: int, clean: torch.Tensor):
    zero = norm.linear(norm.silu(temb_zero)).chunk(chunks, dim=1)
    at_t = norm.linear(norm.silu(temb)).chunk(chunks, dim=1)
    return [_per_token(clean, z, t) for z, t in zip(zero, at_t)]


def _double_block(block, hidden, context, temb, temb_zero, clean, rotary):
    """FluxTransformerBlock.forward with per-token modulation of the image stream (the text
    stream keeps the global timestep)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulations(block.norm1, temb_zero, temb, 6, clean)
    norm_hidden = block.norm1.norm(hidden) * (1 + scale_msa) + shift_msa
    norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(context, emb=temb)
    attn_output, context_attn_output = block.attn(
        hidden_states=norm_hidden, encoder_hidden_states=norm_context, image_rotary_emb=rotary
    )[:2]

    hidden = hidden + gate_msa * attn_output
    norm_hidden = block.norm2(hidden) * (1 + scale_mlp) + shift_mlp
    hidden = hidden + gate_mlp * block.ff(norm_hidden)

    context = context + c_gate_msa.unsqueeze(1) * context_attn_output
    norm_context = block.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    context = context + c_gate_mlp.unsqueeze(1) * block.ff_context(norm_context)
    if context.dtype == torch.float16:
        context = context.clip(-65504, 65504)
    return context, hidden


def _single_block(block, hidden, context, temb, temb_zero, clean, rotary):
    """FluxSingleTransformerBlock.forward with per-token modulation (text tokens: global t)."""
    text_len = context.shape[1]
    x = torch.cat([context, hidden], dim=1)  # (B, T + N, D)
    clean_all = torch.cat([clean.new_zeros(clean.shape[0], text_len, 1), clean], dim=1)  # (B, T + N, 1)
    shift, scale, gate = _modulations(block.norm, temb_zero, temb, 3, clean_all)
    norm_x = block.norm.norm(x) * (1 + scale) + shift
    mlp = block.act_mlp(block.proj_mlp(norm_x))
    attn_output = block.attn(hidden_states=norm_x, image_rotary_emb=rotary)
    x = x + gate * block.proj_out(torch.cat([attn_output, mlp], dim=2))
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :text_len], x[:, text_len:]


BLOCK_FORWARDS = (_double_block, _single_block)  # per-token forwards of the double and single blocks


def context_forward(
    transformer,
    clean_tokens: torch.Tensor,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    pooled_projections: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    txt_ids: torch.Tensor,
    img_ids: torch.Tensor,
    guidance: torch.Tensor | None = None,
    blocks: tuple = BLOCK_FORWARDS,
) -> torch.Tensor:
    """FluxTransformer2DModel.forward (same arguments, return_dict=False's first output)
    with the image tokens where `clean_tokens` (B, N, 1) is True modulated as timestep 0.
    `blocks`: the double and single blocks' forwards (BLOCK_FORWARDS, or compiled ones)."""
    hidden = transformer.x_embedder(hidden_states)
    timestep = timestep.to(hidden.dtype) * 1000
    zero = torch.zeros_like(timestep)
    if guidance is None:
        temb = transformer.time_text_embed(timestep, pooled_projections)
        temb_zero = transformer.time_text_embed(zero, pooled_projections)
    else:
        guidance = guidance.to(hidden.dtype) * 1000
        temb = transformer.time_text_embed(timestep, guidance, pooled_projections)
        temb_zero = transformer.time_text_embed(zero, guidance, pooled_projections)
    context = transformer.context_embedder(encoder_hidden_states)
    rotary = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

    checkpointing = torch.is_grad_enabled() and transformer.gradient_checkpointing
    double, single = blocks
    for stack, fn in ((transformer.transformer_blocks, double), (transformer.single_transformer_blocks, single)):
        for block in stack:
            step = getattr(block, "per_token_forward", None) or functools.partial(fn, block)
            if checkpointing:
                context, hidden = transformer._gradient_checkpointing_func(step, hidden, context, temb, temb_zero, clean_tokens, rotary)
            else:
                context, hidden = step(hidden, context, temb, temb_zero, clean_tokens, rotary)

    norm = transformer.norm_out
    scale, shift = (
        _per_token(clean_tokens, z, t)
        for z, t in zip(
            norm.linear(norm.silu(temb_zero).to(hidden.dtype)).chunk(2, dim=1),
            norm.linear(norm.silu(temb).to(hidden.dtype)).chunk(2, dim=1),
        )
    )
    hidden = norm.norm(hidden) * (1 + scale) + shift
    return transformer.proj_out(hidden)


class ContextDenoiser(torch.nn.Module):
    """The trained module in `zero` mode: the transformer behind a forward that takes the
    clean-token mask, so a distributed wrapper sees (and syncs) every call."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.blocks = BLOCK_FORWARDS

    def compile_blocks(self, **options: Any) -> None:
        """torch.compile the per-token block forwards (see the module docstring)."""
        self.blocks = tuple(torch.compile(fn, **options) for fn in BLOCK_FORWARDS)

    def per_token_methods(self) -> None:
        """Give every block its per-token forward as a method (`per_token_forward`), which
        `context_forward` then calls, and name it in `fsdp_forward_methods`: FSDP2 gathers a
        sharded block's weights around its `forward` only, which this forward never calls
        (training/distributed.py registers the method with it)."""
        transformer = self.transformer
        for stack, fn in ((transformer.transformer_blocks, _double_block), (transformer.single_transformer_blocks, _single_block)):
            for block in stack:
                block.per_token_forward = types.MethodType(fn, block)
                block.fsdp_forward_methods = ("per_token_forward",)

    def forward(self, clean_tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        return (context_forward(self.transformer, clean_tokens, blocks=self.blocks, **kwargs),)  # as return_dict=False


class FluxContextPipeline(FluxInpaintPipeline):
    """Panel completion with clean context: FluxInpaintPipeline's components and helpers,
    a denoising loop that feeds the visible tokens clean at every step.

    Batches as the stock pipeline does: `num_images_per_prompt` images per prompt, one
    generator per image (each draws its image's noise, in a one-image call's order), and
    `image` / `mask_image` either one for every image or one per image."""

    context_timestep: str = "zero"
    predict: Callable | None = None  # the backend's training prediction (set by the backend)
    context_denoiser: ContextDenoiser | None = None  # what `predict` runs in 'zero' mode: the backend's denoiser

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        height: int = 1024,
        width: int = 1024,
        strength: float = 1.0,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> FluxPipelineOutput:
        device = self._execution_device
        dtype = self.transformer.dtype
        prompt_embeds, pooled, _ = self.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=512, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        )
        batch = prompt_embeds.shape[0]  # prompts x num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch} images")
        channels = self.transformer.config.in_channels // 4
        h, w = 2 * (height // (self.vae_scale_factor * 2)), 2 * (width // (self.vae_scale_factor * 2))

        codec = FluxLatents(self.vae)
        pixels = self.image_processor.preprocess(image, height=height, width=width).to(device, self.vae.dtype)
        # The posterior mean, one input at a time as the stock pipeline encodes a batch: the same memory as one image.
        clean = codec.encode_mean(pixels, one_at_a_time=True).to(dtype)
        clean = repeat_to_batch(clean, batch, "images")  # (B, C, h, w)
        pixel_mask = self.mask_processor.preprocess(mask_image, height=height, width=width).to(device)  # (b, 1, H, W)
        mask = (latent_mask(pixel_mask, self.vae_scale_factor) >= 0.5).to(dtype)  # (b, 1, h, w), 1 = masked
        mask = repeat_to_batch(mask, batch, "masks")  # (B, 1, h, w)

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = shift_mu(self.scheduler.config, h * w // 4)
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, device)
        # One row per generator: image i draws what a one-image call with its generator draws.
        noise = randn_tensor((batch, channels, h, w), generator=generator, device=device, dtype=dtype)
        schedule = Schedule(
            timesteps,
            noised=lambda x, n, t: self.scheduler.scale_noise(x, t, n),
            step=lambda velocity, t, x: self.scheduler.step(velocity, t, x, return_dict=False)[0],
        )
        conditions = {}
        if self.transformer.config.guidance_embeds:  # FLUX.1-dev's distilled guidance
            conditions["guidance"] = guidance_scale
        if self.context_timestep == "zero":
            hook = getattr(self.transformer, "_hf_hook", None)
            if hook is not None:
                # Model CPU offload moves the transformer when its forward is called, which the
                # per-token forward bypasses (it calls the blocks): move it here instead.
                hook.pre_forward(self.transformer)
        prompt = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        # A token is denoised when any of its 2x2 latent pixels is masked (clean_token_mask).
        context = F.max_pool2d(mask, 2).repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # (B, 1, h, w)
        latents = complete_in_context(self.predict, schedule, clean, mask, noise, prompt, conditions=conditions,
                                      strength=strength, context=context, progress=self.progress_bar)
        if output_type == "latent":
            return FluxPipelineOutput(images=latents)
        decoded = codec.decode(latents)
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=self.image_processor.postprocess(decoded, output_type=output_type))


__all__ = ["BLOCK_FORWARDS", "CONTEXT_TIMESTEPS", "clean_token_mask", "context_forward", "ContextDenoiser",
           "FluxContextPipeline"]
