"""The one denoising loop of panel completion in context, shared by the backends' context
pipelines: the visible panels' latents enter every step clean, the masked ones are
denoised, and the denoiser is called through the backend's training `predict`, so
inference runs the model math training runs. Each backend brings its own sampler
(`Schedule`: its timesteps and its scheduler's steps) and its per-sample conditions.

    latents = complete_in_context(backend.predict, schedule, clean, mask, noise, prompt)

Latents are (B, C, h, w) throughout, as the backend contract has them; the backend packs
them for its denoiser inside `predict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .base import with_clean_context

Tensor = torch.Tensor


def _as_is(latents: Tensor, t: Tensor) -> Tensor:
    return latents


@dataclass
class Schedule:
    """A backend's sampler for one call."""

    timesteps: Tensor
    """The steps to run, on the scheduler's scale (after --strength)."""
    noised: Callable[[Tensor, Tensor, Tensor], Tensor]
    """(clean, noise, t (B,)) -> clean noised to t by the scheduler's forward process."""
    step: Callable[[Tensor, Tensor, Tensor], Tensor]
    """(prediction, t, latents) -> the latents of the next step (the scheduler's own step)."""
    model_input: Callable[[Tensor, Tensor], Tensor] = _as_is
    """(latents, t) -> what the denoiser is fed (SDXL: the scheduler's scale_model_input)."""
    init_noise_sigma: float = 1.0
    """The scale of pure noise at the first step (strength 1)."""


def _doubled(values: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in values.items()}


@torch.no_grad()
def complete_in_context(
    predict: Callable[..., Tensor],
    schedule: Schedule,
    clean: Tensor,
    mask: Tensor,
    noise: Tensor,
    prompt: dict[str, Tensor],
    negative: dict[str, Tensor] | None = None,
    guidance_scale: float = 1.0,
    conditions: dict[str, Any] | None = None,
    strength: float = 1.0,
    context: Tensor | None = None,
    progress: Callable[[Iterable], Iterable] = iter,
) -> Tensor:
    """The completed latents (B, C, h, w).

    clean     (B, C, h, w) the input's normalised latents (the posterior mean)
    mask      (B, 1, h, w) 1 = masked (generated), 0 = visible: what `predict` is given
    noise     (B, C, h, w) each image's own draw
    prompt    `predict`'s prompt embeddings, batch-first; `negative` too for classifier-free
              guidance (one denoiser call on [negative; prompt], as the stock pipelines)
    conditions  `predict`'s per-sample conditions (its `batch` argument)
    context   (B, 1, h, w) where the latents are denoised rather than kept clean (default:
              `mask`; FLUX.1: whole 2x2 patches, its token)
    """
    context = mask if context is None else context
    if strength < 1.0:  # SDEdit: the masked region starts from the noised input
        latents = schedule.noised(clean, noise, schedule.timesteps[:1].repeat(len(clean)))
    else:
        latents = noise * schedule.init_noise_sigma
    conditions = conditions or {}
    guided = negative is not None
    if guided:
        prompt = {k: torch.cat([negative[k], prompt[k]]) for k in prompt}
        mask, conditions = torch.cat([mask, mask]), _doubled(conditions)
    for t in progress(schedule.timesteps):
        x = with_clean_context(schedule.model_input(latents, t), clean, context)
        x = torch.cat([x, x]) if guided else x
        prediction = predict(x, t.expand(len(x)), prompt, mask, None, conditions)
        if guided:
            uncond, text = prediction.chunk(2)
            prediction = uncond + guidance_scale * (text - uncond)
        latents = schedule.step(prediction, t, latents)
    return with_clean_context(latents, clean, context)
