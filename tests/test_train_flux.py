"""FLUX.1 training end to end on the tiny models: both conditionings, exact resume, LoRA
files that stock diffusers (and our backend) load with the right scale, kohya files, the
2x2 packing, and the errors a user meets first.

    pytest tests/test_train_flux.py
"""

import os

# Before diffusers/huggingface_hub are imported: they read it once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxFillPipeline, FluxPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from iclora.backends.flux import FluxBackend, fill_mask_channels, pack, unpack
from iclora.backends.tiny import TINY_MODELS, save_tiny_model
from iclora.cli import parse_config
from iclora.panels import Grid, latent_mask, panel_mask
from iclora.toy import make_dataset
from iclora.training.config import TrainConfig
from iclora.training.train_flux_ic_lora import DEFAULTS, main

RANK, ALPHA = 4, 8  # alpha != rank: the scale (2) must survive saving and loading
GRID = Grid(2, 2)


@pytest.fixture(scope="module")
def flux_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_data")
    make_dataset(folder, n=4, panel_size=64)  # 128 x 128 composites, 2x2 panels
    return folder


def _train(flux_data, output_dir, *extra):
    return main([
        "--data_dir", str(flux_data), "--output_dir", str(output_dir), "--model_id", "tiny-flux",
        "--image_size", "128", "--batch_size", "2", "--lora_rank", str(RANK), "--lora_alpha", str(ALPHA),
        "--learning_rate", "5e-3", "--save_every", "2", "--seed", "0", "--cache_text_embeddings", *extra,
    ])


@pytest.fixture(scope="module")
def straight(flux_data, tmp_path_factory):
    """4 uninterrupted steps of blend training on tiny-flux."""
    return _train(flux_data, tmp_path_factory.mktemp("straight"), "--max_train_steps", "4", "--conditioning", "blend")


def _lora(folder):
    return load_file(folder / "pytorch_lora_weights.safetensors")


def _transformer_inputs(transformer, seed=0):
    """Fixed packed inputs for a tiny FLUX transformer: 8x8 latent pixels, 7 text tokens."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    tokens = torch.randn(1, 16, cfg.in_channels, generator=g)
    text = torch.randn(1, 7, cfg.joint_attention_dim, generator=g)
    return {
        "hidden_states": tokens,
        "encoder_hidden_states": text,
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([1.0]),
        "txt_ids": torch.zeros(7, 3),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
        "return_dict": False,
    }


@torch.no_grad()
def _run(transformer, inputs):
    return transformer(**inputs)[0]  # no .eval(): loaders must leave the model deterministic


# ---- training ---------------------------------------------------------------------------


def test_blend_training_saves_a_flux_lora(straight):
    assert straight.global_step == 4 and len(straight.losses) == 4
    assert all(np.isfinite(straight.losses))
    meta = json.loads((straight.final_dir / "iclora_config.json").read_text())
    assert (meta["backend"], meta["conditioning"], meta["base_model"]) == ("flux", "blend", "tiny-flux")
    keys = set(_lora(straight.final_dir))
    assert all(k.startswith("transformer.") for k in keys)
    for module in ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                   "transformer_blocks.0.ff_context.net.2", "single_transformer_blocks.0.proj_mlp",
                   "single_transformer_blocks.0.proj_out"]:
        assert f"transformer.{module}.lora_A.weight" in keys
    # The final output projection is not a target (a bare "proj_out" target would catch it).
    assert not any(k.startswith("transformer.proj_out.") for k in keys)


def test_concat_training_on_a_fill_base(flux_data, tmp_path):
    result = main([
        "--data_dir", str(flux_data), "--output_dir", str(tmp_path), "--model_id", "tiny-flux-fill",
        "--conditioning", "concat", "--image_size", "128", "--batch_size", "2", "--max_train_steps", "2",
        "--lora_rank", "4", "--learning_rate", "5e-3", "--gradient_checkpointing",  # prompts encoded every step
    ])
    assert result.global_step == 2 and all(np.isfinite(result.losses))
    meta = json.loads((result.final_dir / "iclora_config.json").read_text())
    assert meta["conditioning"] == "concat"
    backend = FluxBackend.from_pretrained("tiny-flux-fill", conditioning="concat")
    before = _run(backend.transformer, _transformer_inputs(backend.transformer))
    backend.load_lora(result.final_dir)
    assert not torch.allclose(_run(backend.transformer, _transformer_inputs(backend.transformer)), before)


def test_resume_replays_an_uninterrupted_run(straight, flux_data, tmp_path):
    halfway = _lora(_train(flux_data, tmp_path, "--max_train_steps", "2", "--conditioning", "blend").final_dir)
    resumed = _train(flux_data, tmp_path, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                      "--conditioning", "blend")
    assert resumed.global_step == 4
    expected, got = _lora(straight.final_dir), _lora(resumed.final_dir)
    assert expected.keys() == got.keys()
    assert not all(torch.equal(expected[k], halfway[k]) for k in expected)  # steps 3-4 did train
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_flux_defaults():
    cfg = parse_config(TrainConfig, ["--data_dir", "x"], prog="t", defaults=DEFAULTS)
    assert (cfg.backend, cfg.model_id, cfg.lora_rank, cfg.lora_alpha, cfg.conditioning) == (
        "flux", "black-forest-labs/FLUX.1-dev", 16, 16, "context")
    assert (cfg.mask_probability, cfg.max_masked_panels) == (1.0, 3)


# ---- the saved LoRA elsewhere -----------------------------------------------------------


def test_lora_loads_into_stock_flux_pipeline_with_its_scale(straight, tmp_path):
    save_tiny_model("tiny-flux", tmp_path / "base")
    pipe = FluxPipeline.from_pretrained(tmp_path / "base")
    inputs = _transformer_inputs(pipe.transformer)
    base = _run(pipe.transformer, inputs)
    pipe.load_lora_weights(straight.final_dir)
    loaded = _run(pipe.transformer, inputs)

    # The weights as training left them, in our backend's own PEFT modules.
    backend = FluxBackend.from_pretrained("tiny-flux")
    backend.add_lora(RANK, ALPHA, 0.0)
    trained = load_file(straight.final_dir.parent / "checkpoints/checkpoint-4/trainable.safetensors")
    # the LoRA weights as the fp16 file holds them (the default --save_precision)
    backend.load_trainable_state_dict({k: v.half().float() if ".lora_" in k else v for k, v in trained.items()})
    ours = _run(backend.transformer, inputs)

    assert (loaded - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-4)  # and the same thing, at scale alpha/rank
    adapter = next(iter(pipe.transformer.peft_config))
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling[adapter] == ALPHA / RANK


def _kohya_lora(seed=0, rank=2, alpha=1.0):
    """A kohya/sd-scripts FLUX LoRA for the tiny transformer (inner dim 32, MLP 128), and
    the weight deltas it stands for: (alpha / rank) * up @ down, qkv split by rows."""
    g = torch.Generator().manual_seed(seed)
    layers = {  # kohya name -> (diffusers modules its output rows split into, in, out)
        "double_blocks_0_img_attn_qkv": (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                          "transformer_blocks.0.attn.to_v"], 32, 96),
        "double_blocks_0_img_attn_proj": (["transformer_blocks.0.attn.to_out.0"], 32, 32),
        "double_blocks_0_txt_attn_qkv": (["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                          "transformer_blocks.0.attn.add_v_proj"], 32, 96),
        "double_blocks_0_img_mlp_0": (["transformer_blocks.0.ff.net.0.proj"], 32, 128),
        "double_blocks_0_txt_mlp_2": (["transformer_blocks.0.ff_context.net.2"], 128, 32),
        "single_blocks_0_linear2": (["single_transformer_blocks.0.proj_out"], 160, 32),
    }
    state, deltas = {}, {}
    for name, (modules, n_in, n_out) in layers.items():
        down = torch.randn(rank, n_in, generator=g) * 0.3
        up = torch.randn(n_out, rank, generator=g) * 0.3
        state[f"lora_unet_{name}.lora_down.weight"] = down
        state[f"lora_unet_{name}.lora_up.weight"] = up
        state[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
        for module, rows in zip(modules, (alpha / rank * up @ down).chunk(len(modules))):
            deltas[module] = rows
    return state, deltas


def test_kohya_flux_lora_loads_through_the_backend(tmp_path):
    state, deltas = _kohya_lora()
    save_file(state, tmp_path / "kohya_flux.safetensors")
    backend = FluxBackend.from_pretrained("tiny-flux")
    inputs = _transformer_inputs(backend.transformer)
    base = _run(backend.transformer, inputs)
    backend.load_lora(tmp_path / "kohya_flux.safetensors")
    loaded = _run(backend.transformer, inputs)

    merged = TINY_MODELS["tiny-flux"]()["transformer"]
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight += delta
    assert (loaded - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, _run(merged, inputs), atol=1e-5, rtol=1e-4)


# ---- packing ---------------------------------------------------------------------------


def test_latent_mask_packs_onto_the_same_tokens_as_the_latents():
    h = w = 16  # a 128 px composite
    latents = torch.zeros(1, 4, h, w)
    for index in range(4):  # every latent pixel holds its panel's index
        latents[:, :, panel_mask([index], GRID, h, w)[0] > 0] = float(index)
    mask = panel_mask([1, 2], GRID, h, w)[None]  # (1, 1, h, w)

    tokens = pack(latents)  # (1, 64, 16)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 1, 4, h, w))
    packed_mask = pack(mask.repeat(1, 4, 1, 1))  # as FluxInpaintPipeline packs its mask
    assert tokens.shape == packed_mask.shape == (1, 64, 16)
    # No token straddles a panel boundary, and the masked tokens are exactly panels 1 and 2.
    assert torch.equal(packed_mask.amin(-1), packed_mask.amax(-1))
    assert torch.equal(tokens.amin(-1), tokens.amax(-1))
    masked = packed_mask[0, :, 0] > 0
    assert set(tokens[0, masked, 0].tolist()) == {1.0, 2.0}
    assert set(tokens[0, ~masked, 0].tolist()) == {0.0, 3.0}
    assert torch.equal(unpack(tokens, h, w, 8), latents)


def test_fill_mask_from_the_latent_mask_matches_flux_fill_pipeline():
    pipe = FluxFillPipeline(**TINY_MODELS["tiny-flux-fill"]())
    pixel_mask = panel_mask([3], GRID, 128, 128)[None]  # (1, 1, 128, 128)
    expected, _ = pipe.prepare_mask_latents(
        pixel_mask, torch.zeros(1, 3, 128, 128), 1, 4, 1, 128, 128, torch.float32, "cpu", None
    )
    # What predict() builds from the (B, 1, h, w) latent mask the trainer hands it.
    rebuilt = F.interpolate(latent_mask(pixel_mask, 8), scale_factor=8, mode="nearest")
    assert torch.equal(pack(fill_mask_channels(rebuilt, 8)), expected)  # (1, 64, 256)


# ---- the inpaint pipelines -------------------------------------------------------------


@pytest.mark.parametrize("model_id, conditioning, strength", [("tiny-flux", "blend", 0.9), ("tiny-flux-fill", "concat", 1.0)])
def test_inpaint_pipeline_runs_with_the_lora(straight, model_id, conditioning, strength):
    backend = FluxBackend.from_pretrained(model_id, conditioning=conditioning)
    pipe = backend.inpaint_pipeline()
    assert pipe.transformer is backend.transformer
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    soft = (255 * panel_mask([3], GRID, 128, 128)[0].numpy()).astype(np.uint8)
    soft[60:68] = 128  # soft values are accepted (both pipelines binarize them)

    def call(**kw):
        return pipe(
            prompt="a red square", image=image, mask_image=Image.fromarray(soft), height=128, width=128,
            strength=strength, guidance_scale=3.5, generator=torch.Generator().manual_seed(0), **kw,
        ).images

    images = call(num_inference_steps=2, num_images_per_prompt=2, output_type="pil")
    assert len(images) == 2 and all(im.size == (128, 128) for im in images)
    if conditioning == "blend":  # the LoRA of `straight` was trained on tiny-flux
        plain = call(num_inference_steps=1, output_type="latent")
        backend.load_lora(straight.final_dir)
        assert not torch.allclose(call(num_inference_steps=1, output_type="latent"), plain)


# ---- errors ---------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without a GPU")
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantize_without_cuda_falls_back_with_a_notice(flux_data, tmp_path, mode, caplog):
    """A config written for a GPU still runs on a CPU: unquantized, saying so in one line."""
    with caplog.at_level(logging.WARNING, logger="iclora"):
        result = _train(flux_data, tmp_path, "--max_train_steps", "1", "--quantize", mode)
    assert f"--quantize {mode} needs CUDA (bitsandbytes 4/8-bit loading): loading the base unquantized" in caplog.messages
    assert json.loads((result.final_dir / "iclora_config.json").read_text())["training_args"]["quantize"] is None


def test_sdxl_model_is_refused(flux_data, tmp_path):
    with pytest.raises(ValueError, match="--model_id tiny-sdxl is not a FLUX.1 model"):
        main(["--data_dir", str(flux_data), "--output_dir", str(tmp_path), "--model_id", "tiny-sdxl",
              "--image_size", "128", "--max_train_steps", "1"])
    save_tiny_model("tiny-sdxl", tmp_path / "sdxl")
    with pytest.raises(ValueError, match="is not a FLUX.1 model .*StableDiffusionXLPipeline"):
        FluxBackend.from_pretrained(str(tmp_path / "sdxl"))


def test_conditioning_must_fit_the_base():
    with pytest.raises(ValueError, match="--conditioning concat needs a FLUX.1-Fill base"):
        FluxBackend.from_pretrained("tiny-flux", conditioning="concat")
    with pytest.raises(ValueError, match="--conditioning blend needs .* use --conditioning concat"):
        FluxBackend.from_pretrained("tiny-flux-fill", conditioning="blend")


def test_storyboard_example_config_trains_through_the_flux_entry_point(tmp_path):
    """examples/flux_storyboard_3x1.yaml as a user runs it, with the tiny model and CPU-sized
    overrides on the command line (which win over the file)."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "flux_storyboard_3x1.yaml"
    data = tmp_path / "shots"
    make_dataset(data, n=2, panel_size=32, grid=(3, 1))  # 32 x 96 three-shot strips
    argv = ["--config", str(example), "--data_dir", str(data), "--output_dir", str(tmp_path / "out")]
    cfg = parse_config(TrainConfig, argv, prog="t", defaults=DEFAULTS)
    assert (cfg.grid, cfg.conditioning, cfg.quantize, cfg.mask_probability) == ("3x1", "context", "nf4", 1.0)
    result = main(argv + ["--model_id", "tiny-flux", "--image_size", "96", "--quantize", "none",
                          "--mixed_precision", "no", "--no_use_8bit_adam", "--max_train_steps", "1"])
    assert result.global_step == 1 and np.isfinite(result.losses[0])
    assert json.loads((result.final_dir / "iclora_config.json").read_text())["grid"] == "3x1"
