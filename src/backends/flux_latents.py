"""FLUX.1's latent layout: its codec (the VAE's shift and scale), the transformer's token
sequence of 2x2 latent patches, and FLUX.1-Fill's mask channels.

The backend passes latents as (B, C, h, w); only the transformer's input and output are
packed, one token per 2x2 patch with 4C channels (diffusers' `_pack_latents`).
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from .latents import LatentCodec


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): one token per 2x2 patch, row-major."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int, vae_scale_factor: int) -> torch.Tensor:
    """Inverse of `pack`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    return FluxPipeline._unpack_latents(tokens, h * vae_scale_factor, w * vae_scale_factor, vae_scale_factor)


def scale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The VAE's raw latents as the transformer sees them (FLUX's VAE has a shift as well as a scale)."""
    return (latents - vae_config.shift_factor) * vae_config.scaling_factor


class FluxLatents(LatentCodec):
    """FLUX.1's codec: shift and scale from the VAE's config; `pack` / `unpack` for the
    transformer's token layout."""

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return scale_latents(raw, self.vae.config)

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.vae.config.scaling_factor + self.vae.config.shift_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        return pack(latents)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h/2 * w/2, 4C) -> (B, C, h, w), h and w in latent pixels."""
        return unpack(tokens, h, w, self.vae_scale_factor)


def fill_mask_channels(pixel_mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """FLUX.1-Fill's mask input before packing: (B, 1, H, W) -> (B, f*f, h, w), each latent
    pixel's f x f pixel block laid out on the channel axis (FluxFillPipeline.prepare_mask_latents)."""
    f = vae_scale_factor
    b, _, height, width = pixel_mask.shape
    mask = pixel_mask[:, 0].view(b, height // f, f, width // f, f)  # (B, h, f, w, f)
    return mask.permute(0, 2, 4, 1, 3).reshape(b, f * f, height // f, width // f)  # (B, f*f, h, w)
