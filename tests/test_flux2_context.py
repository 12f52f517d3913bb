"""FLUX.2's context conditioning on the tiny model: the latent codec against the pipeline's
own encoding, per-token timestep-0 modulation (what the blocks receive, per sample), and the
inference loop against the stock Flux2KleinPipeline.

    pytest tests/test_flux2_context.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from iclora.backends import flux2_latents as codec
from iclora.backends.flux2 import Flux2Backend
from iclora.backends.flux2_context import ContextDenoiser, clean_token_mask


@pytest.fixture(scope="module")
def backend():
    return Flux2Backend.from_pretrained("tiny-flux2", conditioning="context")


def _inputs(backend, b=2, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, backend.transformer.config.in_channels, h, w, generator=g)
    embeds = backend.encode_prompt(["a red square", "a blue circle"][:b])
    masks = torch.ones(b, 1, h, w)
    masks[0, :, : h // 2] = 0  # sample 0: top half visible
    if b > 1:
        masks[1, :, :, : w // 3] = 0  # sample 1: left third visible
    return latents, torch.tensor([700.0, 300.0][:b]), embeds, masks


def test_codec_matches_the_pipelines_reference_encoding(backend):
    pixels = torch.rand(1, 3, 64, 96) * 2 - 1
    pipe = Flux2KleinPipeline(**backend._components())
    expected = pipe._encode_vae_image(pixels, generator=None)  # (1, 4C, 4, 6), normalised
    latents = backend.codec.encode_mean(pixels)
    torch.testing.assert_close(latents, expected)
    raw = backend.codec.denormalise(latents)
    assert raw.shape == (1, backend.vae.config.latent_channels, 8, 12)
    torch.testing.assert_close(backend.codec.normalise(raw), latents, rtol=1e-5, atol=1e-5)
    tokens = codec.to_tokens(latents)
    assert torch.equal(codec.from_tokens(tokens, 4, 6), latents)


def test_without_clean_tokens_the_stock_forward_runs_exactly(backend):
    latents, t, embeds, _ = _inputs(backend)
    masked = torch.ones(2, 1, 4, 6)
    shared = Flux2Backend.from_pretrained("tiny-flux2", conditioning="context", context_timestep="shared")
    assert torch.equal(backend.predict(latents, t, embeds, masked, None, {}),
                       shared.predict(latents, t, embeds, masked, None, {}))


def test_blocks_receive_timestep_zero_modulation_at_clean_tokens_per_sample(backend):
    latents, t, embeds, masks = _inputs(backend)
    transformer = backend.transformer
    seen = {}
    hooks = [transformer.transformer_blocks[0].register_forward_pre_hook(
                 lambda m, args, kwargs: seen.__setitem__("double", kwargs["temb_mod_img"]), with_kwargs=True),
             transformer.single_transformer_blocks[0].register_forward_pre_hook(
                 lambda m, args, kwargs: seen.__setitem__("single", kwargs["temb_mod"]), with_kwargs=True)]
    try:
        backend.predict(latents, t, embeds, masks, None, {})
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        at = {name: transformer.time_guidance_embed(ts, None)
              for name, ts in (("zero", torch.zeros(2)), ("t", t / 1000 * 1000))}
        double = {k: transformer.double_stream_modulation_img(v) for k, v in at.items()}  # (B, 6D)
        single = {k: transformer.single_stream_modulation(v) for k, v in at.items()}
    clean = clean_token_mask(masks)[..., 0]  # (B, N)
    text_len = embeds["prompt_embeds"].shape[1]
    assert seen["double"].shape[:2] == (2, clean.shape[1]) and seen["single"].shape[1] == text_len + clean.shape[1]
    for i in range(2):
        assert clean[i].any() and not clean[i].all()
        torch.testing.assert_close(seen["double"][i][clean[i]], double["zero"][i].expand(int(clean[i].sum()), -1))
        torch.testing.assert_close(seen["double"][i][~clean[i]], double["t"][i].expand(int((~clean[i]).sum()), -1))
        image = seen["single"][i, text_len:]
        torch.testing.assert_close(image[clean[i]], single["zero"][i].expand(int(clean[i].sum()), -1))
        torch.testing.assert_close(seen["single"][i, :text_len], single["t"][i].expand(text_len, -1))  # text at t


def test_each_sample_is_predicted_as_alone(backend):
    latents, t, embeds, masks = _inputs(backend)
    both = backend.predict(latents, t, embeds, masks, None, {})
    for i in range(2):
        alone = backend.predict(latents[i : i + 1], t[i : i + 1], {"prompt_embeds": embeds["prompt_embeds"][i : i + 1]},
                                masks[i : i + 1], None, {})
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    # And the clean tokens' modulation matters: the stock (shared t) forward differs.
    assert isinstance(backend.denoiser, ContextDenoiser)
    stock = backend.transformer(hidden_states=codec.to_tokens(latents), encoder_hidden_states=embeds["prompt_embeds"],
                                timestep=t / 1000, img_ids=codec.image_ids(latents),
                                txt_ids=codec.text_ids(embeds["prompt_embeds"]), return_dict=False)[0]
    assert (codec.from_tokens(stock, 4, 6) - both).abs().max() > 1e-3


def test_text_to_set_reproduces_the_stock_pipeline(backend):
    """Every panel masked: the loop (the backend's predict, CFG at 4) is Flux2KleinPipeline's."""
    pipe = backend.inpaint_pipeline()
    prompt = backend.pipeline_prompt("a red square", None, 4.0)
    blank = Image.new("RGB", (96, 64), (127, 127, 127))
    ours = pipe(image=[blank], mask_image=torch.ones(1, 1, 64, 96), height=64, width=96, num_inference_steps=3,
                guidance_scale=4.0, generator=[torch.Generator().manual_seed(3)], output_type="latent", **prompt).images
    stock = Flux2KleinPipeline(**backend._components())(
        prompt_embeds=prompt["prompt_embeds"], negative_prompt_embeds=prompt["negative_prompt_embeds"], height=64,
        width=96, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
        output_type="latent").images  # the VAE's raw latents
    torch.testing.assert_close(backend.codec.denormalise(ours), stock, rtol=1e-4, atol=1e-5)


def test_completion_keeps_visible_latents_and_changes_masked_ones(backend):
    pipe = backend.inpaint_pipeline()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = torch.zeros(1, 1, 64, 96)
    mask[..., 32:, 48:] = 1  # bottom-right panel of a 2x2 grid
    out = pipe(image=[image], mask_image=mask, height=64, width=96, num_inference_steps=2, guidance_scale=4.0,
               generator=[torch.Generator().manual_seed(0)], output_type="latent",
               **backend.pipeline_prompt("a cat", None, 4.0)).images
    pixels = pipe.image_processor.preprocess([image], height=64, width=96)
    clean = backend.codec.encode_mean(pixels)
    assert torch.equal(out[..., :2, :], clean[..., :2, :]) and torch.equal(out[..., :, :3], clean[..., :, :3])
    assert (out[..., 2:, 3:] - clean[..., 2:, 3:]).abs().mean() > 0.1


def test_resolution_shift_moves_sigmas_as_the_pipeline_schedule(backend):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from iclora.backends.base import TimestepSampling

    latents = torch.zeros(4, backend.transformer.config.in_channels, 64, 64)  # a 1024² composite's 4096 tokens
    draw = lambda shift: backend.noise_latents(latents, torch.ones_like(latents), torch.Generator().manual_seed(0))[1]  # noqa: E731
    plain = draw(None)
    backend.timestep_sampling = TimestepSampling("logit_normal", shift="resolution")
    try:
        shifted = draw(None)
    finally:
        del backend.timestep_sampling  # back to the class's
    mu = compute_empirical_mu(4096, 50)
    sigma = plain / 1000
    expected = np.exp(mu) / (np.exp(mu) + (1 / sigma - 1))  # the scheduler's exponential time shift
    torch.testing.assert_close(shifted / 1000, expected.float(), rtol=1e-5, atol=1e-6)
    assert (shifted > plain).all()


def test_reference_mode_feeds_the_blanked_composite_in_the_editing_layout():
    """'reference': [noisy composite, masked-image tokens] with the reference at the pipeline's
    own image ids (t = 10); the masked panels' pixels never reach the model."""
    backend = Flux2Backend.from_pretrained("tiny-flux2", conditioning="reference")
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    pixel_mask = torch.zeros(1, 1, 64, 64)
    pixel_mask[..., 32:, 32:] = 1  # panel 3 of a 2x2 grid
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:, 2:] = 1
    noisy = torch.randn(1, backend.transformer.config.in_channels, 4, 4, generator=g)
    t, embeds = torch.tensor([600.0]), backend.encode_prompt(["a set"])
    reference = backend.masked_image_latents(pixels, pixel_mask)
    pred = backend.predict(noisy, t, embeds, mask, reference, {})

    text = embeds["prompt_embeds"]
    stock = backend.transformer(
        hidden_states=torch.cat([Flux2KleinPipeline._pack_latents(noisy), Flux2KleinPipeline._pack_latents(reference)], 1),
        img_ids=torch.cat([Flux2KleinPipeline._prepare_latent_ids(noisy), Flux2KleinPipeline._prepare_image_ids([reference])], 1),
        encoder_hidden_states=text, txt_ids=Flux2KleinPipeline._prepare_text_ids(text), timestep=t / 1000,
        return_dict=False)[0][:, :16]
    torch.testing.assert_close(pred, codec.from_tokens(stock, 4, 4))

    other = pixels.clone()
    other[..., 32:, 32:] = -other[..., 32:, 32:]  # the masked panel changed: nothing the model sees changes
    assert torch.equal(backend.predict(noisy, t, embeds, mask, backend.masked_image_latents(other, pixel_mask), {}), pred)
    other[..., :32, :32] = -other[..., :32, :32]  # a visible panel changed
    assert (backend.predict(noisy, t, embeds, mask, backend.masked_image_latents(other, pixel_mask), {}) - pred).abs().max() > 1e-4
