"""SDXL panel-inpainting inference, through its CLI: every flag, the outputs, the errors.

Two tiny LoRAs (concat and blend) are trained once per module through the training CLI;
every inference run is the real `main(argv)` on 128x128 composites with 2 denoising steps.
The tiny VAE does not reconstruct, so pixels are compared exactly only where the product
promises exactness (visible panels, identical seeds); elsewhere only "differs" is asserted.

    pytest tests/test_inference_sdxl.py
"""

import os

# Before diffusers/huggingface_hub are imported: they read it once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_batched_equals_single
from iclora.backends.tiny import save_tiny_model
from iclora.cli import parse_config, run_cli
from iclora.inference import generation, inpaint
from iclora.inference.config import InferConfig
from iclora.inference.inpaint import COMPARISON_GAP, check_inputs, composite, load_pipeline
from iclora.inference.sdxl_ic_lora_inference import DEFAULTS
from iclora.inference.sdxl_ic_lora_inference import main as infer_main
from iclora.panels import Grid
from iclora.training.train_sdxl_ic_lora import main as train_main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "sample"
INPUT = DATA / "00001.png"  # 128x128, 2x2 panels of 64x64
INFER_SCRIPT = ROOT / "src" / "inference" / "sdxl_ic_lora_inference.py"
TRAIN_SCRIPT = ROOT / "src" / "training" / "train_sdxl_ic_lora.py"
PROMPT = "a set of four panels"
# No classifier-free guidance (one UNet batch) and 2 steps: the cheapest real run.
FAST = ["--prompt", PROMPT, "--num_inference_steps", "2", "--guidance_scale", "1"]


# ---- helpers -----------------------------------------------------------------------------


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)  # (H, W, 3)


def infer(out: Path, *args) -> list[Path]:
    return infer_main([*FAST, "--output_dir", str(out), *map(str, args)])


def record(out: Path, stem: str = "00001") -> dict:
    return json.loads((out / f"{stem}_inference.json").read_text())


def random_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def cfg(lora, **overrides) -> InferConfig:
    values = {"lora_path": str(lora), "prompt": PROMPT, "input_image": str(INPUT)}
    return InferConfig(**{**values, **overrides})


class Spy:
    """What reached the pipeline: call kwargs, the mask after the pipeline's own mask
    processor, every UNet input, and what went into composite()."""

    def __init__(self):
        self.calls, self.processed_masks, self.unet_inputs, self.composites = [], [], [], []
        self.base_models = []


@pytest.fixture
def pipe_spy(monkeypatch):
    s = Spy()
    real_load = inpaint.load_pipeline

    def load(plan):
        backend, pipe = real_load(plan)
        s.base_models.append(backend.base_model)
        pipe.unet.register_forward_pre_hook(lambda module, args: s.unet_inputs.append(args[0].detach().clone()))
        real_preprocess = pipe.mask_processor.preprocess

        def preprocess(*a, **k):
            out = real_preprocess(*a, **k)
            s.processed_masks.append(out.detach().clone())
            return out

        pipe.mask_processor.preprocess = preprocess
        return backend, pipe

    real_call = StableDiffusionXLInpaintPipeline.__call__

    @functools.wraps(real_call)  # keeps the signature generate() filters its kwargs by
    def call(self, *a, **k):
        s.calls.append(k)
        return real_call(self, *a, **k)

    real_composite = generation.composite

    def spy_composite(generated, original, mask):
        out = real_composite(generated, original, mask)
        s.composites.append((generated.copy(), mask.clone(), out.copy()))
        return out

    monkeypatch.setattr(inpaint, "load_pipeline", load)
    monkeypatch.setattr(StableDiffusionXLInpaintPipeline, "__call__", call)
    monkeypatch.setattr(generation, "composite", spy_composite)  # where generate_all looks it up
    return s


# ---- module fixtures: trained LoRAs and reference runs ------------------------------------


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    """A concat and a blend LoRA, trained 2 steps through the training CLI at the inputs' size
    (128, so inference works at the input's own size). The high
    learning rate makes the LoRA's effect visible in 8-bit outputs; alpha (default 64) !=
    rank (4) so a wrong LoRA scale would show."""
    root = tmp_path_factory.mktemp("loras")
    folders = {}
    for conditioning in ["concat", "blend"]:
        result = train_main([
            "--data_dir", str(DATA), "--output_dir", str(root / conditioning), "--model_id", "tiny-sdxl",
            "--image_size", "128", "--max_train_steps", "2", "--batch_size", "1", "--lora_rank", "4",
            "--learning_rate", "1e-2", "--conditioning", conditioning,
        ])
        assert result.global_step == 2
        folders[conditioning] = Path(result.final_dir)
    return folders


@pytest.fixture(scope="module")
def ref(loras, tmp_path_factory) -> tuple[Path, list[Path]]:
    """Concat LoRA, hard mask over panels 1 and 3, two images, comparison, seed 42."""
    out = tmp_path_factory.mktemp("ref") / "out"
    files = infer(out, "--lora_path", loras["concat"], "--input_image", INPUT, "--panels_to_inpaint", 1, 3,
                  "--num_images", 2, "--save_comparison", "--seed", 42)
    return out, files


@pytest.fixture(scope="module")
def blend_ref(loras, tmp_path_factory) -> tuple[Path, int]:
    """Blend LoRA with every default left alone: panels, output_dir, num_images, seed."""
    cwd = tmp_path_factory.mktemp("blend_ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        infer_main([*FAST, "--lora_path", str(loras["blend"]), "--input_image", str(INPUT)])
    out = cwd / "inference_output"
    return out, record(out)["images"][0]["seed"]


# ---- flags and defaults ------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    c = parse_config(InferConfig, ["--lora_path", "x", "--prompt", "p"], prog="t", defaults=DEFAULTS)
    assert c.panels_to_inpaint == [2, 3]
    assert c.output_dir == "inference_output"
    assert (c.num_inference_steps, c.guidance_scale, c.num_images, c.batch_size, c.seed) == (50, 7.5, 1, 1, None)
    assert (c.use_gradient_mask, c.gradient_width, c.strength) == (False, 20, 1.0)
    assert (c.base_model, c.grid, c.mask_image, c.negative_prompt, c.input_image) == (None, None, None, None, None)
    assert (c.save_comparison, c.cpu_offload, c.backend) == (False, False, "sdxl")


def test_yaml_config_sets_flags_and_command_line_overrides(loras, blend_ref, tmp_path):
    out_ref, seed = blend_ref
    yaml = tmp_path / "infer.yaml"
    yaml.write_text(
        f"lora_path: {loras['blend']}\ninput_image: {INPUT}\nprompt: {PROMPT}\n"
        "num_inference_steps: 2\nguidance_scale: 1.0\npanels_to_inpaint: [2, 3]\nseed: 99\n"
    )
    out = tmp_path / "out"
    # The flag comes before --config and must still win over the file.
    infer_main(["--seed", str(seed), "--output_dir", str(out), "--config", str(yaml)])
    args = record(out)["arguments"]
    assert (args["num_inference_steps"], args["guidance_scale"], args["prompt"]) == (2, 1.0, PROMPT)
    assert args["seed"] == seed  # the command line won over the file's 99
    assert (out / "00001_0.png").read_bytes() == (out_ref / "00001_0.png").read_bytes()


def test_default_run_inpaints_panels_2_and_3_into_inference_output(blend_ref):
    out, seed = blend_ref
    assert sorted(p.name for p in out.iterdir()) == [
        "00001_0.png", "00001_0_panel2.png", "00001_0_panel3.png", "00001_inference.json"
    ]
    rec = record(out)
    assert rec["arguments"]["seed"] is None  # not given ...
    assert isinstance(seed, int) and rec["images"] == [{"file": "00001_0.png", "seed": seed}]  # ... but drawn
    result, source = pixels(out / "00001_0.png"), pixels(INPUT)
    np.testing.assert_array_equal(result[:64], source[:64])  # panels 0, 1 kept exactly
    assert (result[64:] != source[64:]).any()


def test_random_seed_is_recorded_and_reproduces_the_image(blend_ref, loras, tmp_path):
    out_ref, seed = blend_ref
    infer(tmp_path, "--lora_path", loras["blend"], "--input_image", INPUT, "--seed", seed)
    assert (tmp_path / "00001_0.png").read_bytes() == (out_ref / "00001_0.png").read_bytes()


def test_lora_as_a_single_file_beside_its_record(ref, loras, tmp_path):
    out_ref, _ = ref
    infer(tmp_path, "--lora_path", loras["concat"] / "pytorch_lora_weights.safetensors", "--input_image", INPUT,
          "--panels_to_inpaint", 1, 3, "--seed", 42)
    assert (tmp_path / "00001_0.png").read_bytes() == (out_ref / "00001_0.png").read_bytes()


def test_lone_lora_file_with_base_model(blend_ref, loras, tmp_path):
    """A .safetensors file with no record beside it: --base_model says what to load it on
    (--max_token_length how its captions were read: without a record it is CLIP's 75; and
    --image_size the size it was trained at: without a record it is the base's 1024).
    Its adapter metadata asks for dropout, as LoRAs from elsewhere may: inference must run
    the LoRA layers in eval mode, or the output is random whatever the seed."""
    out_ref, seed = blend_ref
    source = loras["blend"] / "pytorch_lora_weights.safetensors"
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    adapter = {**json.loads(metadata["lora_adapter_metadata"]), "unet.lora_dropout": 0.5}
    lone = tmp_path / "lora" / "my_lora.safetensors"
    lone.parent.mkdir()
    save_file(load_file(source), lone, metadata={**metadata, "lora_adapter_metadata": json.dumps(adapter)})
    infer(tmp_path / "out", "--lora_path", lone, "--base_model", "tiny-sdxl", "--input_image", INPUT, "--seed", seed,
          "--max_token_length", 150, "--image_size", 128)
    assert (tmp_path / "out" / "00001_0.png").read_bytes() == (out_ref / "00001_0.png").read_bytes()


def test_lora_none_runs_the_bare_base_and_differs_from_the_lora(blend_ref, tmp_path):
    out_ref, seed = blend_ref
    infer(tmp_path, "--lora_path", "none", "--base_model", "tiny-sdxl", "--input_image", INPUT, "--seed", seed,
          "--native_size")
    bare, with_lora = pixels(tmp_path / "00001_0.png"), pixels(out_ref / "00001_0.png")
    np.testing.assert_array_equal(bare[:64], with_lora[:64])
    assert np.abs(bare[64:] - with_lora[64:]).mean() > 1, "the LoRA had no visible effect"


def test_base_model_flag_wins_over_the_recorded_base(ref, loras, tmp_path, pipe_spy):
    assert check_inputs(cfg(loras["concat"])).base_model == "tiny-sdxl"  # recorded at training
    base = tmp_path / "tiny-base"
    save_tiny_model("tiny-sdxl", base, seed=1)  # same architecture, other weights
    assert check_inputs(cfg(loras["concat"], base_model=str(base))).base_model == str(base)
    infer(tmp_path / "out", "--lora_path", loras["concat"], "--base_model", base, "--input_image", INPUT,
          "--panels_to_inpaint", 1, 3, "--seed", 42)
    assert pipe_spy.base_models == [str(base)]
    assert record(tmp_path / "out")["resolved"]["base_model"] == str(base)
    # Same LoRA, seed and flags as the reference run: only the base weights differ.
    assert (pixels(tmp_path / "out" / "00001_0.png") != pixels(ref[0] / "00001_0.png")).any()


def test_cpu_offload_on_cpu_just_works(blend_ref, loras, tmp_path):
    out_ref, seed = blend_ref
    infer(tmp_path, "--lora_path", loras["blend"], "--input_image", INPUT, "--seed", seed, "--cpu_offload")
    assert (tmp_path / "00001_0.png").read_bytes() == (out_ref / "00001_0.png").read_bytes()


def test_guidance_scale_and_negative_prompt_reach_the_pipeline(blend_ref, loras, tmp_path, pipe_spy):
    out_ref, seed = blend_ref
    common = ["--lora_path", loras["blend"], "--input_image", INPUT, "--seed", seed, "--guidance_scale", 5]
    infer(tmp_path / "guided", *common)
    infer(tmp_path / "negative", *common, "--negative_prompt", "blurry, low quality")
    assert [c["guidance_scale"] for c in pipe_spy.calls] == [5.0, 5.0]
    # The prompts reach the pipeline as embeddings encoded as in training: no negative prompt
    # is the pipeline's zeros (force_zeros_for_empty_prompt), a negative prompt its encoding.
    assert not pipe_spy.calls[0]["negative_prompt_embeds"].any()
    assert pipe_spy.calls[1]["negative_prompt_embeds"].abs().sum() > 0
    assert pipe_spy.unet_inputs[0].shape[0] == 2, "guidance_scale 5 should run the unconditional batch too"
    guided, negative = pixels(tmp_path / "guided" / "00001_0.png"), pixels(tmp_path / "negative" / "00001_0.png")
    assert (guided[64:] != pixels(out_ref / "00001_0.png")[64:]).any()  # vs guidance 1
    assert (negative[64:] != guided[64:]).any()
    assert record(tmp_path / "negative")["arguments"]["negative_prompt"] == "blurry, low quality"


def test_strength_below_one_starts_part_way_and_changes_the_result(loras, tmp_path, pipe_spy):
    counts = {}
    for strength in [0.5, 1.0]:
        before = len(pipe_spy.unet_inputs)
        infer(tmp_path / str(strength), "--lora_path", loras["concat"], "--input_image", INPUT, "--seed", 3,
              "--num_inference_steps", 4, "--strength", strength)
        counts[strength] = len(pipe_spy.unet_inputs) - before
    assert [c["strength"] for c in pipe_spy.calls] == [0.5, 1.0]
    assert [c["num_inference_steps"] for c in pipe_spy.calls] == [4, 4]
    assert torch.equal(pipe_spy.calls[0]["prompt_embeds"], pipe_spy.calls[1]["prompt_embeds"])  # the prompt, encoded
    assert counts == {0.5: 2, 1.0: 4}  # denoising steps run: strength * num_inference_steps
    a, b = pixels(tmp_path / "0.5" / "00001_0.png"), pixels(tmp_path / "1.0" / "00001_0.png")
    np.testing.assert_array_equal(a[:64], b[:64])
    assert (a[64:] != b[64:]).any()


# ---- masks -------------------------------------------------------------------------------


def test_gradient_mask_is_soft_only_across_the_panel_edge(loras):
    """Panels 1 and 3 masked: one vertical edge at x = 64. Width 30 -> a ramp over ~30 px."""
    mask = check_inputs(cfg(loras["concat"], panels_to_inpaint=[1, 3], use_gradient_mask=True,
                            gradient_width=30)).mask
    assert mask.shape == (1, 128, 128)
    row = mask[0, 100].numpy()
    soft = np.flatnonzero((row > 0) & (row < 1))
    assert 28 <= len(soft) <= 32 and soft.min() < 64 <= soft.max(), soft
    assert np.all(np.diff(soft) == 1) and np.all(np.diff(row) >= 0)  # one contiguous rising ramp
    assert (row[: soft.min()] == 0).all() and (row[soft.max() + 1:] == 1).all()
    assert torch.equal(mask[0], mask[0, :1].expand(128, 128)), "no ramp between the two masked panels"
    default = check_inputs(cfg(loras["concat"], panels_to_inpaint=[1, 3], use_gradient_mask=True)).mask
    assert 18 <= int(((default[0, 100] > 0) & (default[0, 100] < 1)).sum()) <= 22  # --gradient_width 20
    hard = check_inputs(cfg(loras["concat"], panels_to_inpaint=[1, 3], gradient_width=30)).mask
    assert set(hard.unique().tolist()) == {0.0, 1.0}, "--gradient_width alone must not feather"


@pytest.mark.parametrize("conditioning", ["concat", "blend"])
def test_gradient_mask_stays_soft_through_the_pipeline_and_the_composite(conditioning, loras, tmp_path, pipe_spy):
    lora = loras[conditioning]
    infer(tmp_path, "--lora_path", lora, "--input_image", INPUT, "--panels_to_inpaint", 1, 3,
          "--use_gradient_mask", "--gradient_width", 30, "--seed", 5)
    expected = check_inputs(cfg(lora, panels_to_inpaint=[1, 3], use_gradient_mask=True, gradient_width=30)).mask

    # 1. The pipeline's own mask processor did not binarize it.
    (processed,) = pipe_spy.processed_masks  # (1, 1, H, W)
    assert processed.shape[-2:] == (128, 128)
    torch.testing.assert_close(processed[0], expected, atol=1e-5, rtol=0)
    if conditioning == "concat":  # 2. and the UNet's mask channel (4 latent + 1 mask + 4) is soft too
        latent_mask = pipe_spy.unet_inputs[0][:, 4]
        assert ((latent_mask > 0.01) & (latent_mask < 0.99)).any(), "mask binarized before the UNet"

    # 3. The written image is m * generated + (1 - m) * input, through the same soft mask.
    (generated, used_mask, _), = pipe_spy.composites
    torch.testing.assert_close(used_mask, expected, atol=0, rtol=0)
    m = expected[0].numpy()[..., None]  # (H, W, 1)
    gen, source = np.asarray(generated, dtype=np.float64), pixels(INPUT).astype(np.float64)
    result = pixels(tmp_path / "00001_0.png")
    np.testing.assert_allclose(result, m * gen + (1 - m) * source, atol=0.5 + 1e-6)
    band = (m[..., 0] > 0) & (m[..., 0] < 1)
    assert (result[band] != source[band]).any() and (result[band] != gen[band]).any()
    np.testing.assert_array_equal(result[m[..., 0] == 0], pixels(INPUT)[m[..., 0] == 0])
    assert np.array_equal(np.asarray(composite(generated, Image.open(INPUT).convert("RGB"), expected)),
                          result.astype(np.uint8))


def test_composite_blends_through_the_mask():
    generated = Image.new("RGB", (4, 1), (200, 200, 200))
    original = Image.new("RGB", (4, 1), (100, 50, 0))
    mask = torch.tensor([[[0.0, 0.25, 0.5, 1.0]]])  # (1, H, W)
    out = np.asarray(composite(generated, original, mask))[0, :, 0]
    assert out.tolist() == [100, 125, 150, 200]
    assert composite(generated, None, mask) is generated  # no input: the generation as is


def test_free_form_mask_image(loras, tmp_path):
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[40:90, 80:120] = 255  # white = regenerate; crosses panels 1 and 3 only
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    infer(out, "--lora_path", loras["concat"], "--input_image", INPUT, "--mask_image", tmp_path / "mask.png",
          "--seed", 1)
    result, source = pixels(out / "00001_0.png"), pixels(INPUT)
    np.testing.assert_array_equal(result[mask == 0], source[mask == 0])
    assert (result[mask == 255] != source[mask == 255]).any()
    assert sorted(p.name for p in out.iterdir()) == [
        "00001_0.png", "00001_0_panel1.png", "00001_0_panel3.png", "00001_inference.json"
    ]
    assert record(out)["resolved"]["panels"] == [1, 3]


# ---- geometry ----------------------------------------------------------------------------


def test_concat_unet_sees_the_visible_panels_as_training_does(loras, tmp_path, pipe_spy):
    """After every step the visible panels' latents are the input's noised to the next step
    (q(x_t | x_0), what training feeds); with --no_blend_visible the model's own, as
    diffusers' 9-channel pipeline leaves them."""
    steps = ["--lora_path", loras["concat"], "--input_image", INPUT, "--seed", 3, "--num_inference_steps", 4]
    infer(tmp_path / "on", *steps)
    reset = [x[:, :4] for x in pipe_spy.unet_inputs]  # (1, 4, h, w) each: the noisy latents, scaled
    pipe_spy.unet_inputs.clear()
    infer(tmp_path / "off", *steps, "--no_blend_visible")
    free = [x[:, :4] for x in pipe_spy.unet_inputs]

    backend, pipe = inpaint.load_pipeline(check_inputs(cfg(loras["concat"], num_inference_steps=4)))
    image = torch.from_numpy(pixels(INPUT)).permute(2, 0, 1)[None] / 127.5 - 1
    clean = pipe.vae.encode(image).latent_dist.mode() * pipe.vae.config.scaling_factor  # (1, 4, 16, 16)
    noise = torch.randn(clean.shape, generator=torch.Generator("cpu").manual_seed(3))
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas  # Euler: x_t = x_0 + sigma * noise, fed as x_t / sqrt(sigma^2 + 1)
    visible = (slice(None), slice(None), slice(0, 8))  # panels 0 and 1 (2 and 3 are masked)
    assert len(reset) == len(free) == 4
    torch.testing.assert_close(reset[0], free[0])  # the first step: pure noise in both
    for k in range(1, 4):
        expected = (clean + sigmas[k] * noise) / (sigmas[k] ** 2 + 1) ** 0.5
        torch.testing.assert_close(reset[k][visible], expected[visible], atol=5e-4, rtol=1e-3)
        assert (free[k][visible] - expected[visible]).abs().max() > 1e-2
    # The masked panels are the model's in both runs, and the two results differ there.
    assert (pixels(tmp_path / "on" / "00001_0.png") != pixels(tmp_path / "off" / "00001_0.png")).any()


def test_visible_panels_are_kept_exactly(ref):
    out, _ = ref
    source = pixels(INPUT)
    for i in range(2):
        result = pixels(out / f"00001_{i}.png")
        np.testing.assert_array_equal(result[:, :64], source[:, :64])  # panels 0 and 2
        assert (result[:, 64:] != source[:, 64:]).any()


def test_input_size_off_the_grid_keeps_its_size_and_visible_pixels(loras, tmp_path):
    image = random_image(tmp_path / "odd.png", 130, 122, seed=0)  # 2x2 boxes split at x=65, y=61
    infer(tmp_path / "out", "--lora_path", loras["blend"], "--input_image", image, "--panels_to_inpaint", 1, 3,
          "--seed", 0)
    result, source = pixels(tmp_path / "out" / "odd_0.png"), pixels(image)
    assert result.shape == (122, 130, 3)
    np.testing.assert_array_equal(result[:, :65], source[:, :65])
    assert (result[:, 65:] != source[:, 65:]).any()
    assert Image.open(tmp_path / "out" / "odd_0_panel3.png").size == (65, 61)


def test_grid_1x3_with_a_1x3_input(loras, tmp_path):
    image = random_image(tmp_path / "strip.png", 192, 64, seed=1)
    out = tmp_path / "out"
    infer(out, "--lora_path", loras["blend"], "--input_image", image, "--grid", "1x3", "--panels_to_inpaint", 1,
          "--seed", 0)
    result, source = pixels(out / "strip_0.png"), pixels(image)
    assert result.shape == (64, 192, 3)
    np.testing.assert_array_equal(result[:, :64], source[:, :64])
    np.testing.assert_array_equal(result[:, 128:], source[:, 128:])
    assert (result[:, 64:128] != source[:, 64:128]).any()
    assert sorted(p.name for p in out.iterdir()) == ["strip_0.png", "strip_0_panel1.png", "strip_inference.json"]
    np.testing.assert_array_equal(pixels(out / "strip_0_panel1.png"), result[:, 64:128])
    assert record(out, "strip")["resolved"]["grid"] == "1x3"


def test_grid_defaults_to_the_lora_record(loras, tmp_path):
    assert check_inputs(cfg(loras["blend"])).grid == Grid(2, 2)
    lora = tmp_path / "lora"
    shutil.copytree(loras["blend"], lora)
    meta = json.loads((lora / "iclora_config.json").read_text())
    (lora / "iclora_config.json").write_text(json.dumps({**meta, "grid": "1x3"}))
    assert check_inputs(cfg(lora, panels_to_inpaint=[2])).grid == Grid(1, 3)
    with pytest.raises(ValueError, match="outside the 1x3 grid"):
        check_inputs(cfg(lora, panels_to_inpaint=[3]))
    assert check_inputs(cfg(lora, grid="2x2", panels_to_inpaint=[3])).grid == Grid(2, 2)  # the flag wins


def test_all_panels_with_an_input_masks_everything(loras):
    plan = check_inputs(cfg(loras["concat"], panels_to_inpaint=["all"]))
    assert plan.panels == [0, 1, 2, 3] and bool((plan.mask == 1).all())


def test_all_panels_without_input_generates_the_whole_set(loras, tmp_path):
    out = tmp_path / "out"
    files = infer(out, "--lora_path", loras["blend"], "--panels_to_inpaint", "all", "--seed", 0)
    names = ["generated_0.png"] + [f"generated_0_panel{k}.png" for k in range(4)] + ["generated_inference.json"]
    assert sorted(p.name for p in files) == sorted(names) == sorted(p.name for p in out.iterdir())
    image = pixels(out / "generated_0.png")
    assert image.shape == (128, 128, 3)  # the LoRA's training image_size
    for k, (x, y) in enumerate([(0, 0), (64, 0), (0, 64), (64, 64)]):
        np.testing.assert_array_equal(pixels(out / f"generated_0_panel{k}.png"), image[y:y + 64, x:x + 64])


# ---- outputs -----------------------------------------------------------------------------


def test_output_files_names_and_panel_crops(ref):
    out, files = ref
    names = [f"00001_{i}{s}.png" for i in range(2) for s in ["", "_panel1", "_panel3"]]
    names += ["00001_comparison.png", "00001_inference.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # nothing else, no temporary files
    assert sorted(files) == sorted(out / n for n in names)
    for i in range(2):
        image = pixels(out / f"00001_{i}.png")
        np.testing.assert_array_equal(pixels(out / f"00001_{i}_panel1.png"), image[:64, 64:])
        np.testing.assert_array_equal(pixels(out / f"00001_{i}_panel3.png"), image[64:, 64:])
    assert (pixels(out / "00001_0.png") != pixels(out / "00001_1.png")).any(), "seeds 42 and 43 gave one image"


def test_comparison_image_layout(ref):
    out, _ = ref
    sheet = pixels(out / "00001_comparison.png")
    size, gap, n = 128, COMPARISON_GAP, 2
    caption = sheet.shape[0] - size
    assert sheet.shape[1] == (2 + n) * size + (1 + n) * gap
    assert 0 < caption <= size // 2
    mask = np.zeros((size, size, 3), dtype=np.int16)
    mask[:, 64:] = 255
    expected = [pixels(INPUT), mask, pixels(out / "00001_0.png"), pixels(out / "00001_1.png")]
    for column, tile in enumerate(expected):
        left = column * (size + gap)
        np.testing.assert_array_equal(sheet[caption:, left:left + size], tile, err_msg=f"tile {column}")
        assert (sheet[:caption, left:left + size] < 128).any(), f"tile {column} has no caption"
        if column:
            assert (sheet[caption:, left - gap:left] == 255).all(), "gap between tiles is not white"


def test_json_records_every_argument_and_each_seed(ref, loras):
    rec = record(ref[0])
    args = rec["arguments"]
    assert set(args) == {f.name for f in dataclasses.fields(InferConfig)}
    assert args["lora_path"] == str(loras["concat"]) and args["input_image"] == str(INPUT)
    assert (args["panels_to_inpaint"], args["num_images"], args["seed"]) == ([1, 3], 2, 42)
    assert (args["num_inference_steps"], args["guidance_scale"], args["strength"]) == (2, 1.0, 1.0)
    assert (args["save_comparison"], args["use_gradient_mask"], args["prompt"]) == (True, False, PROMPT)
    assert rec["images"] == [{"file": "00001_0.png", "seed": 42}, {"file": "00001_1.png", "seed": 43}]
    assert rec["resolved"]["base_model"] == "tiny-sdxl" and rec["resolved"]["conditioning"] == "concat"


def test_same_seed_gives_byte_identical_files(ref, loras, tmp_path):
    out_ref, _ = ref
    infer(tmp_path, "--lora_path", loras["concat"], "--input_image", INPUT, "--panels_to_inpaint", 1, 3,
          "--num_images", 2, "--save_comparison", "--seed", 42)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in out_ref.iterdir())
    for file in out_ref.glob("*.png"):
        assert (tmp_path / file.name).read_bytes() == file.read_bytes(), file.name
    a, b = record(out_ref), record(tmp_path)
    a["arguments"].pop("output_dir"), b["arguments"].pop("output_dir")
    assert a == b


# ---- batches ------------------------------------------------------------------------------


def one_image_calls(lora, seeds, **flags) -> list[np.ndarray]:
    """The composites as the one-image path makes them: one pipeline call per seed with a
    lone generator and a lone input image, nothing batched."""
    plan = check_inputs(cfg(lora, panels_to_inpaint=[1, 3], num_inference_steps=2, guidance_scale=1.0, **flags))
    backend, pipe = load_pipeline(plan)
    width, height = plan.size  # 128x128: on the grid already
    mask = torch.nn.functional.interpolate(plan.mask[None], size=(height, width), mode="bilinear",
                                           align_corners=False).clamp(0, 1)
    image = plan.image.resize((width, height))
    kwargs = {**backend.pipeline_prompt(PROMPT, None, 1.0), "image": image,
              "mask_image": mask, "height": height, "width": width, "strength": plan.cfg.strength,
              "num_inference_steps": 2, "guidance_scale": 1.0, "output_type": "pil"}
    images = [pipe(generator=torch.Generator("cpu").manual_seed(s), **kwargs,
                   **backend.visible_reset(pipe, [image], mask, [s])).images[0] for s in seeds]
    return [np.asarray(composite(image, plan.image, plan.mask)).astype(np.int16) for image in images]


def test_batch_size_1_is_bit_identical_to_one_call_per_image(ref, loras):
    """The default path (--batch_size 1) makes exactly the images of a lone-generator call per seed."""
    out, _ = ref
    expected = one_image_calls(loras["concat"], [42, 43])
    for i, image in enumerate(expected):
        np.testing.assert_array_equal(pixels(out / f"00001_{i}.png"), image)
    assert record(out)["arguments"]["batch_size"] == 1


@pytest.mark.parametrize("conditioning, flags", [
    ("blend", []),  # the input's VAE sample is drawn at every strength
    ("concat", ["--strength", "0.6", "--guidance_scale", "5"]),  # with classifier-free guidance
])
def test_batched_images_are_the_one_image_calls_images(conditioning, flags, loras, tmp_path, decoded):
    common = ["--lora_path", loras[conditioning], "--input_image", INPUT, "--panels_to_inpaint", 1, 3,
              "--num_images", 3, "--seed", 42, *flags]
    infer(tmp_path / "single", *common)
    single = list(decoded)
    decoded.clear()
    infer(tmp_path / "batched", *common, "--batch_size", 2)
    assert [z.shape[0] for z in single] == [1, 1, 1]
    assert [z.shape[0] for z in decoded] == [2, 1]  # ceil(3 / 2) pipeline calls
    names = [f"00001_{i}.png" for i in range(3)]
    assert_batched_equals_single(decoded, single, [tmp_path / "batched" / n for n in names],
                                 [tmp_path / "single" / n for n in names])
    rec = record(tmp_path / "batched")
    assert rec["arguments"]["batch_size"] == 2
    assert [i["seed"] for i in rec["images"]] == [42, 43, 44]
    np.testing.assert_array_equal(pixels(tmp_path / "batched" / "00001_2.png")[:, :64], pixels(INPUT)[:, :64])


def test_one_input_beside_many_generators_would_shift_their_noise(loras):
    """Why generate() passes one copy of the input per generator: the stock inpaint pipeline
    samples the input's VAE posterior with generator i for input i only. With a lone input,
    generators 1.. skip that draw, so their images are not their seeds' images."""
    plan = check_inputs(cfg(loras["blend"]))
    backend, pipe = load_pipeline(plan)
    kwargs = {**backend.pipeline_prompt(PROMPT, None, 1.0), "mask_image": plan.mask[None], "height": 128,
              "width": 128, "num_inference_steps": 2, "guidance_scale": 1.0, "output_type": "latent"}
    single = torch.cat([pipe(image=plan.image, generator=torch.Generator().manual_seed(s), **kwargs).images
                        for s in (5, 6)])
    generators = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    lone = pipe(image=plan.image, generator=generators(), num_images_per_prompt=2, **kwargs).images
    copies = pipe(image=[plan.image] * 2, generator=generators(), num_images_per_prompt=2, **kwargs).images
    torch.testing.assert_close(copies, single, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(lone[0], single[0], rtol=1e-4, atol=1e-3)
    assert (lone[1] - single[1]).abs().max() > 0.1


# ---- errors ------------------------------------------------------------------------------


WITH_INPUT = ["--lora_path", "{lora}", "--input_image", "{input}"]
# name -> (argv, with {lora}, {input} and {tmp} filled in; what the error line must say)
ERRORS = {
    "panel outside grid": (WITH_INPUT + ["--panels_to_inpaint", "4"], "panel 4 is outside the 2x2 grid"),
    "duplicate panels": (WITH_INPUT + ["--panels_to_inpaint", "1", "1"], "duplicate"),
    "every panel listed": (WITH_INPUT + ["--panels_to_inpaint", "0", "1", "2", "3"], "use --panels_to_inpaint all"),
    "unreadable input": (["--lora_path", "{lora}", "--input_image", "{tmp}/broken.png"], "unreadable image"),
    "missing input": (["--lora_path", "{lora}", "--input_image", "{tmp}/nope.png"], "no such file"),
    "unreadable mask": (WITH_INPUT + ["--mask_image", "{tmp}/broken.png"], "--mask_image {tmp}/broken.png: unreadable"),
    "mask size": (WITH_INPUT + ["--mask_image", "{tmp}/small_mask.png"], "differs from --input_image 128x128"),
    "missing lora": (["--lora_path", "{tmp}/nowhere", "--input_image", "{input}"], "no such file or folder"),
    "lora without weights": (["--lora_path", "{tmp}/empty_lora", "--input_image", "{input}"],
                             "has no pytorch_lora_weights.safetensors"),
    "lora not safetensors": (["--lora_path", "{tmp}/broken.png", "--input_image", "{input}"], ".safetensors"),
    "strength 0": (WITH_INPUT + ["--strength", "0"], "--strength"),
    "strength 1.5": (WITH_INPUT + ["--strength", "1.5"], "--strength"),
    "negative num_images": (WITH_INPUT + ["--num_images", "-1"], "--num_images"),
    "zero num_images": (WITH_INPUT + ["--num_images", "0"], "--num_images"),
    "negative steps": (WITH_INPUT + ["--num_inference_steps", "-3"], "--num_inference_steps"),
    "zero batch_size": (WITH_INPUT + ["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    "no input": (["--lora_path", "{lora}"], "--input_image is required"),
    "mask without input": (["--lora_path", "{lora}", "--panels_to_inpaint", "all", "--mask_image",
                            "{tmp}/small_mask.png"], "--mask_image needs --input_image"),
    "bad grid": (WITH_INPUT + ["--grid", "2by2"], "--grid"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_user_errors_are_one_line_and_write_nothing(name, loras, tmp_path, capsys):
    (tmp_path / "empty_lora").mkdir()
    (tmp_path / "broken.png").write_text("not an image")
    Image.new("L", (64, 64), 255).save(tmp_path / "small_mask.png")
    template, message = ERRORS[name]
    argv = [a.format(lora=loras["concat"], input=INPUT, tmp=tmp_path) for a in template]
    message = message.format(tmp=tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer_main, ["--prompt", PROMPT, "--output_dir", str(out), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert message in errors[0], errors[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_error_from_the_script_run_by_path(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(INFER_SCRIPT), "--lora_path", str(tmp_path / "missing"), "--input_image", str(INPUT),
         "--prompt", PROMPT, "--output_dir", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --lora_path {tmp_path / 'missing'}: no such file or folder"], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


# ---- end to end --------------------------------------------------------------------------


def test_train_then_infer_through_both_scripts_by_path(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--data_dir", str(DATA), "--output_dir", str(tmp_path / "train"),
         "--model_id", "tiny-sdxl", "--image_size", "64", "--max_train_steps", "1", "--batch_size", "1",
         "--lora_rank", "4"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    lora = tmp_path / "train" / "final_model"
    out = tmp_path / "infer"
    run = subprocess.run(
        [sys.executable, str(INFER_SCRIPT), "--lora_path", str(lora), "--input_image", str(INPUT), *FAST,
         "--panels_to_inpaint", "1", "3", "--use_gradient_mask", "--gradient_width", "30", "--strength", "0.8",
         "--num_images", "2", "--save_comparison", "--seed", "42", "--output_dir", str(out)],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    written = sorted(Path(line).name for line in run.stdout.split() if line.endswith((".png", ".json")))
    assert written == sorted(p.name for p in out.iterdir())
    assert "00001_comparison.png" in written and "00001_1_panel3.png" in written
    assert record(out)["images"] == [{"file": "00001_0.png", "seed": 42}, {"file": "00001_1.png", "seed": 43}]
