"""A backend's latent codec: pixels <-> the normalised latents its denoiser sees.

Every place that encodes or decodes goes through its backend's codec: training's encoding
and the latent cache (a draw from the VAE posterior), the concat inputs, the context
pipelines and the visible resets (the posterior mean), and decoding. The normalisation (the
VAE config's scale, and shift where it has one) is written once per backend, here:

    codec = backend.codec                       # SDXLLatents / FluxLatents around the VAE
    params = codec.posterior(pixels)            # (B, 2C, h, w): mean, log-variance; unscaled
    latents = codec.sample(params)              # (B, C, h, w), normalised
    latents = codec.encode_mean(pixels)         # the posterior mean, normalised
    pixels = codec.decode(latents)              # (B, 3, H, W) in [-1, 1]

A codec holds the VAE it wraps and nothing else, so it is made where it is needed
(`SDXLLatents(pipe.vae)`): moving or tiling the VAE is seen by every codec of it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


class LatentCodec:
    """Encoding and decoding around `vae`; subclasses say how raw latents are normalised."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latents (B, C, h, w) as the denoiser sees them."""
        raise NotImplementedError

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalise`: what the VAE's decoder reads."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _vae_ready(self) -> Iterator[None]:
        """The VAE as it encodes and decodes (a subclass may change its dtype meanwhile)."""
        yield

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the posterior's parameters (B, 2C, h, w), unscaled: what
        the latent cache stores."""
        with self._vae_ready():
            return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.parameters

    def sample(self, parameters: torch.Tensor) -> torch.Tensor:
        """Normalised latents drawn from `posterior`'s parameters, on their device, from the
        global RNG (as the VAE's own sampling)."""
        return self.normalise(DiagonalGaussianDistribution(parameters).sample())

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents of a draw from the posterior (what training denoises)."""
        return self.sample(self.posterior(pixels))

    @torch.no_grad()
    def encode_mean(self, pixels: torch.Tensor, one_at_a_time: bool = False) -> torch.Tensor:
        """Normalised posterior mean (B, C, h, w), in the VAE's dtype: what pipelines take from
        an input image. `one_at_a_time`: one image per VAE call, as the stock pipelines
        encode a batch (the memory of one image)."""
        with self._vae_ready():
            pixels = pixels.to(self.vae.device, self.vae.dtype)
            if one_at_a_time:
                raw = torch.cat([self.vae.encode(pixels[i : i + 1]).latent_dist.mode() for i in range(len(pixels))])
            else:
                raw = self.vae.encode(pixels).latent_dist.mode()
        return self.normalise(raw)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> pixels (B, 3, H, W), about [-1, 1]."""
        with self._vae_ready():
            return self.vae.decode(self.denormalise(latents).to(self.vae.dtype), return_dict=False)[0]


class LatentMethods:
    """The Backend protocol's encode_image / latent_distribution / sample_latents, through the
    backend's `codec`, so that a backend writes its latent space once, as a codec."""

    codec: LatentCodec

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(pixels)

    def latent_distribution(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.codec.posterior(pixels)

    def sample_latents(self, parameters: torch.Tensor) -> torch.Tensor:
        return self.codec.sample(parameters)
