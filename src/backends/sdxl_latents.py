"""SDXL's latent codec: the VAE's latents times its config's scaling_factor, encoded and
decoded in float32 (SDXL's VAE overflows in fp16; training keeps it float32 throughout)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .latents import LatentCodec


class SDXLLatents(LatentCodec):
    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return raw * self.vae.config.scaling_factor

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float() / self.vae.config.scaling_factor

    @contextlib.contextmanager
    def _vae_ready(self) -> Iterator[None]:
        dtype = self.vae.dtype
        if dtype == torch.float32:  # training's VAE, a float32 pipeline's: nothing to move
            yield
            return
        self.vae.to(torch.float32)
        try:
            yield
        finally:
            self.vae.to(dtype)
