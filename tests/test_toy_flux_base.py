"""The toy FLUX.1 bases of the known-answer benchmark (benchmarks/fit_toy_flux.py): the
folders it builds load through the FLUX backend in the right layout, the toy VAE gets FLUX
shift/scale, the shipped fitted transformers denoise toy images, and the fit script runs.

    pytest tests/test_toy_flux_base.py        (~20 s)
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iclora.panels import latent_mask

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark modules import each other by name
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


fit_toy_flux = _load("fit_toy_flux")
fit_toy_vae = _load("fit_toy_vae")


def _flow_loss(backend, images, seed=0):
    """Mean rectified-flow loss of the backend's transformer on `images` (fixed noise/sigmas)."""
    g = torch.Generator().manual_seed(seed)
    latents = backend.encode_image(images)
    prompt = {k: v.expand(len(images), *v.shape[1:]) for k, v in backend.encode_prompt([""]).items()}
    mask = masked = None
    if backend.conditioning == "concat":  # the bottom panels masked, as in the benchmark
        size = images.shape[-1]
        pixel = torch.zeros(len(images), 1, size, size)
        pixel[:, :, size // 2:] = 1
        masked = backend.masked_image_latents(images, pixel)
        mask = latent_mask(pixel, backend.vae_scale_factor)
    noise = torch.randn(latents.shape, generator=g)
    noisy, timesteps, target = backend.noise_latents(latents, noise, g)
    with torch.no_grad():
        return F.mse_loss(backend.predict(noisy, timesteps, prompt, mask, masked, {}), target).item()


@pytest.mark.parametrize("conditioning", ["blend", "concat"])
def test_fitted_toy_flux_base_loads_in_its_layout_and_denoises(tmp_path, conditioning):
    from iclora.backends.flux import FluxBackend

    fitted = fit_toy_flux.make_flux_base_model(tmp_path / "fitted", conditioning,
                                               transformer_dir=fit_toy_flux.TOY_FLUX[conditioning])
    random = fit_toy_flux.make_flux_base_model(tmp_path / "random", conditioning)
    backend = FluxBackend.from_pretrained(str(fitted), conditioning=None)  # the layout picks the mode
    assert backend.conditioning == conditioning

    images = fit_toy_vae.independent_panels(8, np.random.default_rng(123))  # unseen draws
    latents = backend.encode_image(images)
    assert abs(float(latents.mean())) < 0.15 and 0.7 < float(latents.std()) < 1.4  # FLUX shift/scale applied
    vae_config = json.loads((fitted / "vae" / "config.json").read_text())
    assert vae_config["shift_factor"] is not None

    trained = _flow_loss(backend, images)
    untrained = _flow_loss(FluxBackend.from_pretrained(str(random), conditioning=conditioning), images)
    assert trained < 0.5 * untrained, (trained, untrained)


def test_fit_script_writes_a_loadable_transformer(tmp_path):
    from diffusers import FluxTransformer2DModel

    out = tmp_path / "out"
    report = fit_toy_flux.main(["--steps", "2", "--pool", "8", "--batch_size", "2", "--threads", "1",
                                "--out", str(out), "--work_dir", str(tmp_path / "work")])
    assert report["steps"] == 2 and np.isfinite(report["final_loss"])
    model = FluxTransformer2DModel.from_pretrained(out)
    assert model.config.in_channels == 16 and not model.config.guidance_embeds
    assert json.loads((out / "fit_report.json").read_text())["conditioning"] == "blend"
