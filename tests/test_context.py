"""--conditioning context: visible panels enter the denoiser clean, in training and at every
inference step; FLUX's per-token timestep-0 modulation (tiny models)."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_batched_equals_single
from iclora.backends import flux as flux_module
from iclora.backends import load_backend
from iclora.backends.flux_context import ContextDenoiser, clean_token_mask, context_forward
from iclora.backends.tiny import TINY_MODELS
from iclora.cli import run_cli
from iclora.inference import flux_ic_lora_inference, sdxl_ic_lora_inference
from iclora.panels import Grid, panel_box, panel_mask
from iclora.toy import make_dataset
from iclora.training import train_flux_ic_lora, train_sdxl_ic_lora

FLUX_TINY = ["--model_id", "tiny-flux", "--image_size", "64", "--batch_size", "2", "--lora_rank", "4",
             "--lora_alpha", "8", "--conditioning", "context"]
SDXL_TINY = ["--model_id", "tiny-sdxl", "--image_size", "64", "--batch_size", "2", "--lora_rank", "4",
             "--lora_alpha", "8", "--conditioning", "context"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("context_data")
    make_dataset(folder, 4, seed=0, panel_size=32)
    return folder


def _flux_inputs(transformer, batch=2, h=8, w=8, text=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(batch, h // 2 * w // 2, cfg.in_channels, generator=g),
        timestep=torch.rand(batch, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        encoder_hidden_states=torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
        txt_ids=torch.zeros(text, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32),
        guidance=torch.full((batch,), 3.5),
    )


# ---- the per-token forward -------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_context_forward_with_every_token_masked_is_the_stock_transformer(checkpointing):
    transformer = TINY_MODELS["tiny-flux"]()["transformer"]
    if checkpointing:
        transformer.enable_gradient_checkpointing()
        transformer.train()
    inputs = _flux_inputs(transformer)
    none_clean = torch.zeros(2, inputs["hidden_states"].shape[1], 1, dtype=torch.bool)
    with torch.set_grad_enabled(checkpointing):
        stock = transformer(**inputs, return_dict=False)[0]
        ours = context_forward(transformer, none_clean, **inputs)
    assert torch.equal(ours, stock)


def test_clean_tokens_change_only_through_their_modulation():
    transformer = TINY_MODELS["tiny-flux"]()["transformer"].eval()
    inputs = _flux_inputs(transformer)
    clean = torch.zeros(2, 16, 1, dtype=torch.bool)
    clean[:, :8] = True  # the top half of an 8x8 latent: visible
    with torch.no_grad():
        stock = transformer(**inputs, return_dict=False)[0]
        ours = context_forward(transformer, clean, **inputs)
        # At timestep 0 for every sample the per-token forward only differs from the stock
        # one in the text stream's timestep; at the clean tokens' own timestep it is stock.
        at_zero = {**inputs, "timestep": torch.zeros(2)}
        ours_all_clean_t0 = context_forward(transformer, torch.ones_like(clean), **at_zero)
        stock_t0 = transformer(**at_zero, return_dict=False)[0]
    assert not torch.allclose(ours, stock, atol=1e-4)
    assert torch.equal(ours_all_clean_t0, stock_t0)


def test_context_forward_batch_rows_are_the_samples_alone():
    """Each sample of a batch has its own clean tokens: row i of a batched call is sample i's call."""
    transformer = TINY_MODELS["tiny-flux"]()["transformer"].eval()
    inputs = _flux_inputs(transformer, batch=2)
    clean = torch.zeros(2, 16, 1, dtype=torch.bool)
    clean[0, :8] = True  # sample 0: top half visible
    clean[1, 4:] = True  # sample 1: all but the first row
    with torch.no_grad():
        batched = context_forward(transformer, clean, **inputs)
        alone = [context_forward(transformer, clean[i : i + 1], **_sample(inputs, i)) for i in range(2)]
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[0], context_forward(transformer, clean[1:], **_sample(inputs, 0)), atol=1e-4)


def _sample(inputs: dict, i: int) -> dict:
    """Sample i of `_flux_inputs` (the ids are shared by the batch)."""
    return {k: v if k.endswith("_ids") else v[i : i + 1] for k, v in inputs.items()}


def test_clean_token_mask_follows_whole_patches():
    mask = panel_mask([1], Grid(1, 2), 8, 8)[None]  # (1, 1, 8, 8): right half masked
    mask[..., 0, 2] = 1.0  # one latent pixel of a left-half patch
    clean = clean_token_mask(mask)[0, :, 0].view(4, 4)  # (h/2, w/2) tokens
    expected = torch.tensor([[True, True, False, False]] * 4)
    expected[0, 1] = False  # its patch holds a masked latent pixel: denoised
    assert torch.equal(clean, expected)


# ---- training ----------------------------------------------------------------------------------


def _spy_training(monkeypatch, backend_cls):
    """Record (latents, denoiser input, mask) of every training step."""
    seen, latents_of = [], {}
    noise_latents, predict = backend_cls.noise_latents, backend_cls.predict

    def spy_noise(self, latents, noise, generator):
        latents_of["last"] = latents.detach().clone()
        return noise_latents(self, latents, noise, generator)

    def spy_predict(self, noisy, timesteps, prompt_embeds, mask, masked_latents, batch):
        seen.append((latents_of["last"], noisy.detach().clone(), mask.detach().clone(), masked_latents))
        return predict(self, noisy, timesteps, prompt_embeds, mask, masked_latents, batch)

    monkeypatch.setattr(backend_cls, "noise_latents", spy_noise)
    monkeypatch.setattr(backend_cls, "predict", spy_predict)
    return seen


@pytest.mark.parametrize("backend", ["sdxl", "flux"])
def test_training_feeds_visible_panels_clean_and_masked_ones_noisy(backend, data, tmp_path, monkeypatch):
    from iclora.backends.flux import FluxBackend
    from iclora.backends.sdxl import SDXLBackend

    seen = _spy_training(monkeypatch, FluxBackend if backend == "flux" else SDXLBackend)
    main, flags = (train_flux_ic_lora.main, FLUX_TINY) if backend == "flux" else (train_sdxl_ic_lora.main, SDXL_TINY)
    result = main(["--data_dir", str(data), "--output_dir", str(tmp_path), *flags, "--max_train_steps", "4",
                   "--mask_probability", "1.0"])
    assert len(seen) == 4
    for latents, noisy, mask, masked_latents in seen:
        visible = (mask < 0.5).expand_as(latents)
        assert visible.any() and (~visible).any()
        assert torch.equal(noisy[visible], latents[visible])  # clean, bit for bit
        assert not torch.allclose(noisy[~visible], latents[~visible])  # noised
        assert masked_latents is None  # LoRA only: no extra input channels
    meta = json.loads((result.final_dir / "iclora_config.json").read_text())
    assert meta["conditioning"] == "context"
    assert meta["context_timestep"] == ("zero" if backend == "flux" else "shared")


def test_flux_zero_mode_modulates_exactly_the_visible_tokens(data, tmp_path, monkeypatch):
    calls = []
    forward = ContextDenoiser.forward

    def spy(self, clean_tokens, **kwargs):
        calls.append(clean_tokens.clone())
        return forward(self, clean_tokens, **kwargs)

    monkeypatch.setattr(ContextDenoiser, "forward", spy)
    seen = _spy_training(monkeypatch, flux_module.FluxBackend)
    train_flux_ic_lora.main(["--data_dir", str(data), "--output_dir", str(tmp_path), *FLUX_TINY,
                             "--max_train_steps", "2", "--mask_probability", "1.0"])
    assert len(calls) == 2
    for clean, (_, _, mask, _) in zip(calls, seen):
        assert torch.equal(clean, clean_token_mask(mask))
        assert clean.any() and not clean.all()


def test_shared_and_zero_train_alike_when_every_panel_is_masked(data, tmp_path):
    """With nothing visible there is no clean token: the two variants are the same model."""
    losses = {
        mode: train_flux_ic_lora.main(["--data_dir", str(data), "--output_dir", str(tmp_path / mode), *FLUX_TINY,
                                       "--max_train_steps", "3", "--mask_probability", "0",
                                       "--context_timestep", mode]).losses
        for mode in ["zero", "shared"]
    }
    assert losses["zero"] == losses["shared"]


@pytest.mark.parametrize("argv, message", [
    (["--context_timestep", "zero"], "SDXL supports only 'shared'"),
    (["--conditioning", "blend", "--context_timestep", "shared"], "needs --conditioning context"),
    (["--visible_loss_weight", "0.5"], "--visible_loss_weight must be 0 with --conditioning context"),
    (["--model_id", "tiny-sdxl-inpaint"], "needs a 4-channel UNet"),
])
def test_context_settings_errors_are_one_line(argv, message, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_sdxl_ic_lora.main, ["--data_dir", str(data), "--output_dir", str(tmp_path), *SDXL_TINY, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "final_model").exists()


# ---- inference ------------------------------------------------------------------------------------


def test_sdxl_context_pipeline_with_everything_masked_is_stock_text_to_image():
    backend = load_backend("sdxl", "tiny-sdxl", "context")
    pipe = backend.inpaint_pipeline()
    stock = StableDiffusionXLPipeline(**pipe.components)
    white = Image.new("L", (64, 64), 255)
    kwargs = dict(prompt="a set", height=64, width=64, num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    ours = pipe(image=Image.new("RGB", (64, 64), (30, 90, 200)), mask_image=white,
                generator=torch.Generator().manual_seed(3), **kwargs).images
    theirs = stock(generator=torch.Generator().manual_seed(3), **kwargs).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_flux_context_pipeline_with_everything_masked_is_stock_flux():
    backend = load_backend("flux", "tiny-flux", "context")
    pipe = backend.inpaint_pipeline()
    stock = FluxPipeline(**backend._components())
    white = Image.new("L", (64, 64), 255)
    kwargs = dict(prompt="a set", height=64, width=64, num_inference_steps=4, guidance_scale=3.5, output_type="latent")
    ours = pipe(image=Image.new("RGB", (64, 64), (30, 90, 200)), mask_image=white,
                generator=torch.Generator().manual_seed(3), **kwargs).images
    theirs = stock(generator=torch.Generator().manual_seed(3), **kwargs).images  # packed (1, N, 4C)
    theirs = FluxPipeline._unpack_latents(theirs, 64, 64, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdxl", "flux"])
def test_visible_panels_reach_the_denoiser_clean_at_every_inference_step(backend, data, tmp_path, monkeypatch):
    """Through the inference CLI, with a LoRA trained in context mode: every denoiser call
    sees the clean latents (posterior mean) of the visible panels, never re-noised."""
    main, flags = (train_flux_ic_lora.main, FLUX_TINY) if backend == "flux" else (train_sdxl_ic_lora.main, SDXL_TINY)
    lora = main(["--data_dir", str(data), "--output_dir", str(tmp_path / "lora"), *flags, "--max_train_steps", "2",
                 "--learning_rate", "1e-2"]).final_dir
    inputs = []
    if backend == "flux":
        def record_forward(transformer, clean_tokens, **kw):
            inputs.append((kw["hidden_states"].clone(), clean_tokens))
            return context_forward(transformer, clean_tokens, **kw)

        monkeypatch.setattr("iclora.backends.flux_context.context_forward", record_forward)
        cli = flux_ic_lora_inference
    else:
        from diffusers import UNet2DConditionModel

        forward = UNet2DConditionModel.forward

        def record_unet(self, sample, *args, **kw):
            inputs.append((sample.clone(), None))
            return forward(self, sample, *args, **kw)

        monkeypatch.setattr(UNet2DConditionModel, "forward", record_unet)
        cli = sdxl_ic_lora_inference
    source = data / "00002.png"
    files = cli.main(["--lora_path", str(lora), "--input_image", str(source), "--prompt", "a set",
                      "--panels_to_inpaint", "2", "3", "--num_inference_steps", "4", "--seed", "1",
                      "--guidance_scale", "2", "--output_dir", str(tmp_path / "out")])
    assert len(inputs) == 4

    backend_obj = load_backend(backend, "tiny-flux" if backend == "flux" else "tiny-sdxl", "context")
    pixels = torch.from_numpy(np.asarray(Image.open(source), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    dist = backend_obj.vae.encode(pixels).latent_dist
    clean = backend_obj._scale(dist.mode()) if backend == "flux" else dist.mode() * backend_obj.vae.config.scaling_factor
    h, w = clean.shape[-2:]
    visible = panel_mask([0, 1], Grid(2, 2), h, w)[None].bool()  # (1, 1, h, w)
    for x, clean_tokens in inputs:
        if backend == "flux":
            x = FluxPipeline._unpack_latents(x, h * 8, w * 8, 8)  # (1, C, h, w)
            assert torch.equal(clean_tokens, clean_token_mask((~visible).float()))
        for sample in x:  # both halves of classifier-free guidance for SDXL
            v = visible[0].expand_as(sample)
            torch.testing.assert_close(sample[v], clean[0][v], rtol=0, atol=1e-4)  # noise would be ~1
    record = json.loads((tmp_path / "out" / "00002_inference.json").read_text())
    assert record["resolved"]["conditioning"] == "context"  # picked from the LoRA's record
    out = np.asarray(Image.open(tmp_path / "out" / "00002_0.png"))
    given = np.asarray(Image.open(source))
    for k in [0, 1]:
        left, top, right, bottom = panel_box(k, Grid(2, 2), 64, 64)
        assert np.array_equal(out[top:bottom, left:right], given[top:bottom, left:right])
    assert any(p.name == "00002_0.png" for p in files)


@pytest.mark.parametrize("backend, flags", [
    ("sdxl", ["--guidance_scale", "5"]),
    ("sdxl", ["--strength", "0.6"]),
    ("flux", []),  # zero: per-token modulation of a batch
    ("flux", ["--context_timestep", "shared", "--strength", "0.6"]),
])
def test_batched_context_images_are_the_one_image_calls_images(backend, flags, data, tmp_path, decoded):
    """SDXLContextPipeline / FluxContextPipeline batch: one generator and one clean input per
    image; image i of a batch is the image its seed makes alone."""
    cli, base = (flux_ic_lora_inference, "tiny-flux") if backend == "flux" else (sdxl_ic_lora_inference, "tiny-sdxl")
    args = ["--lora_path", "none", "--base_model", base, "--native_size", "--conditioning", "context", "--input_image",
            str(data / "00001.png"), "--prompt", "a set", "--panels_to_inpaint", "1", "3", "--num_inference_steps", "3",
            "--num_images", "3", "--seed", "11", *flags]
    single_files = cli.main([*args, "--output_dir", str(tmp_path / "single")])
    single = list(decoded)
    decoded.clear()
    batched_files = cli.main([*args, "--output_dir", str(tmp_path / "batched"), "--batch_size", "2"])
    assert [z.shape[0] for z in single] == [1, 1, 1] and [z.shape[0] for z in decoded] == [2, 1]
    images = lambda files: [p for p in files if p.name in {f"00001_{i}.png" for i in range(3)}]  # noqa: E731
    assert_batched_equals_single(decoded, single, images(batched_files), images(single_files))
    out, given = np.asarray(Image.open(tmp_path / "batched" / "00001_2.png")), np.asarray(Image.open(data / "00001.png"))
    assert np.array_equal(out[:, :32], given[:, :32])  # panels 0 and 2 kept in every image of the batch


@pytest.mark.parametrize("extra", [
    ["--strength", "0.6"],
    ["--use_gradient_mask", "--gradient_width", "16"],
    ["--mask_image", "MASK"],
])
def test_context_inference_options(extra, data, tmp_path):
    lora = train_flux_ic_lora.main(["--data_dir", str(data), "--output_dir", str(tmp_path / "lora"), *FLUX_TINY,
                                    "--max_train_steps", "1"]).final_dir
    if "MASK" in extra:  # a free-form mask: a blob in the bottom-right panel
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[40:60, 36:62] = 255
        Image.fromarray(mask).save(tmp_path / "mask.png")
        extra = ["--mask_image", str(tmp_path / "mask.png")]
    files = flux_ic_lora_inference.main([
        "--lora_path", str(lora), "--input_image", str(data / "00001.png"), "--prompt", "a set",
        "--panels_to_inpaint", "3", "--num_inference_steps", "4", "--seed", "0", "--output_dir", str(tmp_path / "o"),
        *extra,
    ])
    out = np.asarray(Image.open(tmp_path / "o" / "00001_0.png"), dtype=np.float32)
    given = np.asarray(Image.open(data / "00001.png"), dtype=np.float32)
    assert np.array_equal(out[:16, :16], given[:16, :16])  # panel 0, away from the feathered edge
    assert files


def test_context_text_to_image_set_without_input(data, tmp_path):
    lora = train_sdxl_ic_lora.main(["--data_dir", str(data), "--output_dir", str(tmp_path / "lora"), *SDXL_TINY,
                                    "--max_train_steps", "1"]).final_dir
    files = sdxl_ic_lora_inference.main(["--lora_path", str(lora), "--prompt", "a set", "--panels_to_inpaint", "all",
                                         "--num_inference_steps", "3", "--seed", "0",
                                         "--output_dir", str(tmp_path / "o")])
    image = Image.open(tmp_path / "o" / "generated_0.png")
    assert image.size == (64, 64) and files


def test_zero_mode_resume_replays_an_uninterrupted_run(data, tmp_path):
    """The per-token forward sits behind its own module: checkpoints and resume see through it."""
    flags = ["--data_dir", str(data), *FLUX_TINY, "--save_every", "2", "--learning_rate", "5e-3"]
    straight = train_flux_ic_lora.main([*flags, "--output_dir", str(tmp_path / "a"), "--max_train_steps", "4"])
    train_flux_ic_lora.main([*flags, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "2"])
    resumed = train_flux_ic_lora.main([*flags, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "4",
                                       "--resume_from_checkpoint", "latest"])
    assert resumed.losses == straight.losses[2:]
    a = load_file(straight.final_dir / "pytorch_lora_weights.safetensors")
    b = load_file(resumed.final_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
