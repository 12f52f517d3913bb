"""Each backend's latent codec (pixels <-> the latents its denoiser sees) gives what the
code before it gave, for fixed seeds on the tiny models.

tests/data/latent_codec_reference.safetensors holds those outputs. It was written by
`python tests/test_latent_codec.py --write` on the code before the codec existed (scaling,
shift and packing written out in each backend, its context pipeline and its visible reset;
torch 2.13 CPU, float32), and checked bit for bit against the same command on each change
since (the codec; the context pipelines' shared loop). It is not to be rewritten by the
code under test: a change that moves these outputs must say why. Float outputs; compared at float32 rounding, so that another
CPU's summation order does not fail the test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REFERENCE = Path(__file__).parent / "data" / "latent_codec_reference.safetensors"
SIZE = (64, 32)  # (width, height): a 2x2 grid of 32x16 panels, 8x4 and 4x2 latent panels


def _image() -> Image.Image:
    generator = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (SIZE[1], SIZE[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, SIZE[1], SIZE[0])  # (1, 1, H, W), 1 = regenerate
    mask[..., SIZE[1] // 2 :, :] = 1.0  # the bottom row of panels
    return mask


def _pixels() -> torch.Tensor:
    pixels = torch.from_numpy(np.array(_image())).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    return pixels * 2 - 1  # in [-1, 1]


def reference_outputs() -> dict[str, torch.Tensor]:
    """What the tests compare: every place a latent is encoded or decoded, once per backend."""
    from iclora.backends import load_backend

    out: dict[str, torch.Tensor] = {}
    width, height = SIZE
    call = dict(prompt="a set", height=height, width=width, num_inference_steps=3, output_type="np")
    for name, model, guidance in (("sdxl", "tiny-sdxl", 5.0), ("flux", "tiny-flux", 3.5)):
        backend = load_backend(name, model, "context")
        pipe = backend.inpaint_pipeline()
        # The latent cache: the posterior's parameters, and a sample drawn from them.
        posterior = backend.latent_distribution(_pixels())
        out[f"{name}_posterior"] = posterior
        torch.manual_seed(11)
        out[f"{name}_sample"] = backend.sample_latents(posterior)
        torch.manual_seed(11)
        out[f"{name}_encode_image"] = backend.encode_image(_pixels())
        # Context inference: the clean input encoded, the result decoded.
        out[f"{name}_context_image"] = torch.from_numpy(pipe(
            image=_image(), mask_image=_mask(), guidance_scale=guidance,
            generator=torch.Generator().manual_seed(3), **call).images)
        out[f"{name}_context_latents"] = pipe(
            image=_image(), mask_image=_mask(), guidance_scale=guidance, generator=torch.Generator().manual_seed(3),
            **{**call, "output_type": "latent"}).images
        # Part way (SDEdit), two images of one call; SDXL without guidance, FLUX with the shared timestep.
        if name == "flux":
            backend = load_backend(name, model, "context", context_timestep="shared")
            pipe = backend.inpaint_pipeline()
        out[f"{name}_context_strength"] = pipe(
            image=_image(), mask_image=_mask(), guidance_scale=1.0 if name == "sdxl" else guidance, strength=0.6,
            num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (4, 9)],
            **{**call, "num_inference_steps": 5, "output_type": "latent"}).images
    for name, model, guidance in (("sdxl", "tiny-sdxl-inpaint", 5.0), ("flux", "tiny-flux-fill", 30.0)):
        backend = load_backend(name, model, "concat")
        pipe = backend.inpaint_pipeline()
        out[f"{name}_masked_latents"] = backend.masked_image_latents(_pixels(), _mask())
        # Concat inference with the visible panels reset every step (the input encoded there too).
        reset = backend.visible_reset(pipe, [_image()], _mask(), [5])
        out[f"{name}_concat_image"] = torch.from_numpy(pipe(
            image=_image(), mask_image=_mask(), guidance_scale=guidance, generator=torch.Generator().manual_seed(5),
            **call, **reset).images)
    return {key: value.detach().float().contiguous() for key, value in out.items()}


@pytest.fixture(scope="module")
def outputs() -> dict[str, torch.Tensor]:
    return reference_outputs()


@pytest.mark.parametrize("key", [
    "sdxl_posterior", "sdxl_sample", "sdxl_encode_image", "sdxl_context_image", "sdxl_context_latents",
    "sdxl_context_strength",
    "flux_posterior", "flux_sample", "flux_encode_image", "flux_context_image", "flux_context_latents",
    "flux_context_strength",
    "sdxl_masked_latents", "sdxl_concat_image", "flux_masked_latents", "flux_concat_image",
])
def test_latents_and_images_are_the_earlier_codes(outputs, key):
    from safetensors.torch import load_file

    expected = load_file(REFERENCE)[key]
    assert outputs[key].shape == expected.shape
    assert outputs[key].abs().max() > 0  # something was computed
    torch.testing.assert_close(outputs[key], expected, rtol=1e-4, atol=1e-5)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    from safetensors.torch import save_file

    REFERENCE.parent.mkdir(exist_ok=True)
    save_file(reference_outputs(), str(REFERENCE))
    print(f"wrote {REFERENCE}")
