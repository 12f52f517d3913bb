"""The FLUX.2 toy base for the known-answer benchmarks (benchmarks/fit_toy_flux2.py): the
toy VAE moved into an AutoencoderKLFlux2 encodes as before, and its measured batch-norm
statistics normalise toy latents to about zero mean and unit variance.

    pytest tests/test_flux2_toy.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from conftest import load_benchmark


def test_toy_base_folder_loads_in_the_stock_pipeline_with_the_toy_vae(tmp_path):
    from diffusers import AutoencoderKL, Flux2KleinPipeline

    from iclora.backends.flux2_latents import Flux2Latents

    toy = load_benchmark("fit_toy_flux2")
    vae_test = load_benchmark("fit_toy_vae")
    folder = toy.make_flux2_base_model(tmp_path / "base")
    pipe = Flux2KleinPipeline.from_pretrained(folder)
    images = vae_test.independent_panels(32, np.random.default_rng(1))  # other images than the statistics'
    with torch.no_grad():
        source = AutoencoderKL.from_pretrained(toy.TOY_VAE).encode(images).latent_dist.mode()
        raw = pipe.vae.encode(images).latent_dist.mode()
        torch.testing.assert_close(raw, source)
        latents = Flux2Latents(pipe.vae).normalise(raw)  # (32, 16, 8, 8)
    assert latents.mean().abs() < 0.1 and 0.8 < latents.std() < 1.2
    assert pipe.transformer.config.in_channels == latents.shape[1] and not pipe.transformer.config.guidance_embeds
