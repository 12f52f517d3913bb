"""The in-code tiny models: deterministic, runnable in the real diffusers pipelines, and
saveable/loadable offline like a downloaded checkpoint.

    pytest tests/test_tiny_models.py
"""

import os

# Before diffusers/huggingface_hub are imported: they read it once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import (
    FluxFillPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTokenizer, T5Tokenizer

from iclora.backends.tiny import (
    TINY_MODELS,
    build_tiny_flux_components,
    build_tiny_sdxl_components,
    is_tiny,
    save_tiny_model,
)

# Longer than CLIP's 77 tokens once split into bytes: exercises truncation and padding.
LONG_PROMPT = (
    "[TOP-LEFT] a red square on a white background [TOP-RIGHT] the same red square, rotated "
    "[BOTTOM-LEFT] a blue circle [BOTTOM-RIGHT] the blue circle, smaller and to the left"
)
PIPELINES = {
    "tiny-sdxl": StableDiffusionXLPipeline,
    "tiny-sdxl-inpaint": StableDiffusionXLInpaintPipeline,
    "tiny-flux": FluxPipeline,
    "tiny-flux-fill": FluxFillPipeline,
}


def _state_dicts(components: dict) -> dict[str, dict[str, torch.Tensor]]:
    return {k: v.state_dict() for k, v in components.items() if isinstance(v, torch.nn.Module)}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _panel_inputs(size: int) -> tuple[Image.Image, Image.Image]:
    """A 2x2 composite with its bottom-right panel masked (white = repaint)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 2 :, size // 2 :] = 255
    return image, Image.fromarray(mask)


def _generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_build_is_deterministic_and_seeded(name):
    first, second = _state_dicts(TINY_MODELS[name]()), _state_dicts(TINY_MODELS[name]())
    for component in first:
        _assert_same_weights(first[component], second[component])
    other = _state_dicts(TINY_MODELS[name](seed=1))
    denoiser = "unet" if "sdxl" in name else "transformer"
    assert not all(torch.equal(first[denoiser][k], other[denoiser][k]) for k in first[denoiser])


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sdxl_components()
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("size", [128, 256])
def test_sdxl_pipeline_runs(size):
    pipe = StableDiffusionXLPipeline(**build_tiny_sdxl_components())
    out = pipe(
        "a red square", height=size, width=size, num_inference_steps=2, output_type="np",
        generator=_generator(),
    )
    assert out.images.shape == (1, size, size, 3)
    assert np.isfinite(out.images).all()


def test_sdxl_inpaint_pipeline_runs_with_9_channel_unet():
    components = build_tiny_sdxl_components(in_channels=9)
    assert components["unet"].config.in_channels == 9
    pipe = StableDiffusionXLInpaintPipeline(**components)
    image, mask = _panel_inputs(128)
    out = pipe(
        LONG_PROMPT, image=image, mask_image=mask, height=128, width=128, strength=1.0,
        num_inference_steps=2, output_type="latent", generator=_generator(),
    )
    assert out.images.shape == (1, 4, 16, 16)  # (B, C, h, w): the VAE downsamples by 8


def test_flux_pipeline_runs():
    pipe = FluxPipeline(**build_tiny_flux_components())
    out = pipe(
        "a red square", height=128, width=128, num_inference_steps=2, guidance_scale=3.5,
        output_type="np", generator=_generator(),
    )
    assert out.images.shape == (1, 128, 128, 3)
    assert np.isfinite(out.images).all()


def test_flux_fill_pipeline_runs():
    components = build_tiny_flux_components(fill=True)
    # packed latents (16) + packed masked-image latents (16) + packed 8x8 mask (256)
    assert components["transformer"].config.in_channels == 288
    pipe = FluxFillPipeline(**components)
    image, mask = _panel_inputs(128)
    out = pipe(
        LONG_PROMPT, image=image, mask_image=mask, height=128, width=128,
        num_inference_steps=2, output_type="np", generator=_generator(),
    )
    assert out.images.shape == (1, 128, 128, 3)


def test_is_tiny():
    assert all(is_tiny(name) for name in TINY_MODELS)
    assert not is_tiny("stabilityai/stable-diffusion-xl-base-1.0")
    with pytest.raises(ValueError, match="unknown tiny model"):
        save_tiny_model("tiny-sd3", "unused")


def _tokenize(tokenizer, max_length: int) -> list[int]:
    # As the pipelines tokenize: pad to max_length, truncate.
    encoded = tokenizer(LONG_PROMPT, padding="max_length", max_length=max_length, truncation=True)
    return encoded.input_ids


@pytest.mark.parametrize("name", sorted(PIPELINES))  # FLUX.2's one tokenizer: test_flux2_tiny.py
def test_save_and_load_round_trip(name, tmp_path):
    save_tiny_model(name, tmp_path)
    built = TINY_MODELS[name]()
    loaded = PIPELINES[name].from_pretrained(tmp_path).components

    for component, weights in _state_dicts(built).items():
        _assert_same_weights(weights, loaded[component].state_dict())
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded["scheduler"].config) == public(built["scheduler"].config)

    ids = _tokenize(built["tokenizer"], 77)
    assert len(ids) == 77 and ids[0] == built["tokenizer"].bos_token_id
    assert ids[-1] == built["tokenizer"].eos_token_id  # truncation keeps the eos CLIP pools at
    assert _tokenize(loaded["tokenizer"], 77) == ids
    assert _tokenize(loaded["tokenizer_2"], 256) == _tokenize(built["tokenizer_2"], 256)
    for tokenizer in (built["tokenizer"], built["tokenizer_2"]):
        # Every character has a token: an unknown one would be CLIP's eos (= unk), so CLIP
        # would pool there, mid-prompt.
        ids = tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids


def test_subfolders_load_individually(tmp_path):
    save_tiny_model("tiny-sdxl", tmp_path / "sdxl")
    save_tiny_model("tiny-flux", tmp_path / "flux")
    built_sdxl, built_flux = build_tiny_sdxl_components(), build_tiny_flux_components()

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "sdxl", subfolder="unet")
    _assert_same_weights(built_sdxl["unet"].state_dict(), unet.state_dict())
    transformer = FluxTransformer2DModel.from_pretrained(tmp_path / "flux", subfolder="transformer")
    _assert_same_weights(built_flux["transformer"].state_dict(), transformer.state_dict())

    clip = CLIPTokenizer.from_pretrained(tmp_path / "sdxl", subfolder="tokenizer_2")
    assert _tokenize(clip, 77) == _tokenize(built_sdxl["tokenizer_2"], 77)
    t5 = T5Tokenizer.from_pretrained(tmp_path / "flux", subfolder="tokenizer_2")
    assert _tokenize(t5, 256) == _tokenize(built_flux["tokenizer_2"], 256)


@pytest.mark.parametrize("name, denoiser", [("tiny-sdxl", "unet"), ("tiny-flux", "transformer")])
def test_backends_load_frozen_weights_in_the_asked_dtype(name, denoiser, tmp_path):
    """No float32 copy first: FLUX.1-dev and its T5 would take ~67 GB of host memory."""
    from iclora.backends import load_backend

    save_tiny_model(name, tmp_path)
    backend = load_backend(name.split("-")[1], str(tmp_path), None, dtype=torch.bfloat16)
    assert getattr(backend, denoiser).dtype == torch.bfloat16
    assert backend.text_encoder.dtype == backend.text_encoder_2.dtype == torch.bfloat16
    if name == "tiny-sdxl":
        assert backend.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16
    plain = load_backend(name.split("-")[1], str(tmp_path), None)
    assert getattr(plain, denoiser).dtype == torch.float32
