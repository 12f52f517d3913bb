"""FLUX.2's latent codec: the VAE's 32-channel latents, patchified 2x2 into 128 channels and
normalised by the VAE's batch-norm statistics, as Flux2KleinPipeline feeds its transformer.

Latents cross the backend contract in that form, (B, 4C, H/16, W/16): one contract latent
pixel is one transformer token, so the backend's `vae_scale_factor` is 16 (2 x the VAE's 8)
and a panel boundary on a latent pixel is a token boundary. Only the transformer call
flattens them into a token sequence (`to_tokens`), which is a plain reshape here.

The reshapes and position ids are diffusers' own static helpers (Flux2KleinPipeline's
`_patchify_latents`, `_pack_latents`, `_prepare_latent_ids`, `_prepare_text_ids`); the
normalisation is the pipeline's `_encode_vae_image` / decode arithmetic.
"""

from __future__ import annotations

import torch
from diffusers import Flux2KleinPipeline

from .latents import LatentCodec

PATCH = 2  # latent pixels per token side


class Flux2Latents(LatentCodec):
    """FLUX.2's latent codec around `vae` (an AutoencoderKLFlux2): pixels <-> the normalised,
    patchified latents (B, 4C, H/16, W/16) the transformer reads; encoding, sampling and
    decoding are the shared codec's (iclora.backends.latents), the posterior on the VAE's own
    grid (B, 2C, H/8, W/8)."""

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm running mean and std (1, 4C, 1, 1), as the pipeline reads them."""
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latents (B, C, h, w) -> the transformer's (B, 4C, h/2, w/2)."""
        patched = Flux2KleinPipeline._patchify_latents(raw)  # (B, 4C, h/2, w/2)
        mean, std = self._statistics(patched)
        return (patched - mean) / std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalise`: (B, 4C, h/2, w/2) -> the VAE's raw latents (B, C, h, w)."""
        mean, std = self._statistics(latents)
        return Flux2KleinPipeline._unpatchify_latents(latents * std + mean)


def to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """(B, C', h, w) -> (B, h * w, C'), row-major."""
    return Flux2KleinPipeline._pack_latents(latents)


def from_tokens(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `to_tokens`: (B, h * w, C') -> (B, C', h, w)."""
    return tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], h, w)


def image_ids(latents: torch.Tensor, t: int = 0) -> torch.Tensor:
    """4-axis RoPE ids (t, h, w, l) of the grid (B, h * w, 4): the grid's own positions."""
    ids = Flux2KleinPipeline._prepare_latent_ids(latents)
    if t:
        ids = ids.clone()
        ids[..., 0] = t
    return ids.to(latents.device)


def text_ids(embeds: torch.Tensor) -> torch.Tensor:
    """RoPE ids of the text tokens (B, L, 4): position along l."""
    return Flux2KleinPipeline._prepare_text_ids(embeds).to(embeds.device)
