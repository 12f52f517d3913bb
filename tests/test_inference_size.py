"""Inference at the LoRA's trained size, through the CLIs (tiny SDXL and FLUX).

A LoRA trained at --image_size 64 completes 128 px (and larger, and off-grid) composites:
the pipeline runs at the training bucket, the result is resized back and the visible
pixels are the input's exactly.

    pytest tests/test_inference_size.py
"""

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxInpaintPipeline, StableDiffusionXLInpaintPipeline
from PIL import Image

from conftest import assert_batched_equals_single
from iclora.cli import run_cli
from iclora.inference import flux_ic_lora_inference as flux_cli
from iclora.inference.config import InferConfig
from iclora.inference.inpaint import check_inputs
from iclora.inference.sdxl_ic_lora_inference import main as infer_main
from iclora.panels import Grid, composite_size, inpaint_mask
from iclora.training import train_flux_ic_lora
from iclora.training.train_sdxl_ic_lora import main as train_main

ROOT = Path(__file__).resolve().parents[1]
INPUT = ROOT / "data" / "sample" / "00001.png"  # 128x128, 2x2 panels of 64x64
FAST = ["--prompt", "a set of four panels", "--num_inference_steps", "2", "--guidance_scale", "1"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)  # (H, W, 3)


def record(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}_inference.json").read_text())


def upscaled(path: Path, source: Path, size: tuple[int, int]) -> Path:
    with Image.open(source) as image:
        image.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(path)
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A concat LoRA trained at --image_size 64 (its record says so) on 128 px composites."""
    result = train_main([
        "--data_dir", str(ROOT / "data" / "sample"), "--output_dir", str(tmp_path_factory.mktemp("lora64")),
        "--model_id", "tiny-sdxl", "--image_size", "64", "--max_train_steps", "1", "--batch_size", "1",
        "--lora_rank", "4", "--learning_rate", "1e-2",
    ])
    return Path(result.final_dir)


@pytest.fixture
def calls(monkeypatch):
    """The (width, height, mask) of every SDXL pipeline call, the mask as the call got it."""
    seen = []
    real = StableDiffusionXLInpaintPipeline.__call__

    @functools.wraps(real)  # keeps the signature the call's kwargs are filtered by
    def call(self, *a, **k):
        seen.append((k["width"], k["height"], k["mask_image"].clone()))
        return real(self, *a, **k)

    monkeypatch.setattr(StableDiffusionXLInpaintPipeline, "__call__", call)
    return seen


def test_a_larger_input_is_denoised_at_the_trained_size_and_pasted_back(lora, tmp_path, calls):
    big = upscaled(tmp_path / "big.png", INPUT, (256, 256))
    out = tmp_path / "out"
    infer_main([*FAST, "--lora_path", str(lora), "--input_image", str(big), "--panels_to_inpaint", "1", "3",
                "--seed", "4", "--output_dir", str(out)])
    [(width, height, mask)] = calls
    assert (width, height) == (64, 64)  # the bucket training gives a 256 px 2x2 composite at 64
    assert torch.equal(mask, inpaint_mask([1, 3], Grid(2, 2), 64, 64)[None])  # panels drawn at 64, not blurred
    result, source = pixels(out / "big_0.png"), pixels(big)
    assert result.shape == (256, 256, 3)
    np.testing.assert_array_equal(result[:, :128], source[:, :128])  # panels 0 and 2, full resolution
    assert (result[:, 128:] != source[:, 128:]).any()
    resolved = record(out, "big")["resolved"]
    assert resolved["size"] == [256, 256] and resolved["working_size"] == [64, 64]
    assert "recorded image_size" in resolved["working_size_from"]


def test_image_size_overrides_the_record_and_native_size_keeps_the_input_size(lora, tmp_path, calls):
    common = [*FAST, "--lora_path", str(lora), "--input_image", str(INPUT), "--seed", "4"]
    infer_main([*common, "--image_size", "128", "--output_dir", str(tmp_path / "side128")])
    infer_main([*common, "--native_size", "--output_dir", str(tmp_path / "native")])
    infer_main([*common, "--output_dir", str(tmp_path / "trained")])
    assert [(w, h) for w, h, _ in calls] == [(128, 128), (128, 128), (64, 64)]
    # --native_size on a 128 px input and --image_size 128 are the same run.
    assert (tmp_path / "side128" / "00001_0.png").read_bytes() == (tmp_path / "native" / "00001_0.png").read_bytes()
    trained, native = pixels(tmp_path / "trained" / "00001_0.png"), pixels(tmp_path / "native" / "00001_0.png")
    np.testing.assert_array_equal(trained[:64], native[:64])  # panels 0 1 are the input's in both
    assert (trained[64:] != native[64:]).any()
    assert record(tmp_path / "native", "00001")["resolved"]["working_size_from"].startswith("--native_size")
    assert record(tmp_path / "side128", "00001")["resolved"]["working_size_from"].startswith("--image_size")


def test_an_off_grid_input_keeps_its_size_and_aspect(lora, tmp_path, calls):
    """300x200 (not a multiple of the grid): the working size is training's bucket for it,
    the output the input's own size; the feathered band is soft, outside it the input exact."""
    image = upscaled(tmp_path / "wide.png", INPUT, (300, 200))
    out = tmp_path / "out"
    infer_main([*FAST, "--lora_path", str(lora), "--input_image", str(image), "--panels_to_inpaint", "3",
                "--use_gradient_mask", "--gradient_width", "24", "--seed", "1", "--output_dir", str(out)])
    [(width, height, mask)] = calls
    assert (width, height) == composite_size(300, 200, 64, Grid(2, 2), 8) == (64, 48)
    assert ((mask > 0.01) & (mask < 0.99)).any(), "the feathered mask reached the pipeline hard"
    plan = check_inputs(InferConfig(lora_path=str(lora), prompt="p", input_image=str(image), panels_to_inpaint=[3],
                                    use_gradient_mask=True, gradient_width=24))
    m = plan.mask[0].numpy()  # (200, 300) at the input's size
    result, source = pixels(out / "wide_0.png"), pixels(image)
    assert result.shape == (200, 300, 3)
    np.testing.assert_array_equal(result[m == 0], source[m == 0])
    assert (result[m == 1] != source[m == 1]).any()


def test_free_form_mask_and_batches_at_the_working_size(lora, tmp_path, calls, decoded):
    big = upscaled(tmp_path / "big.png", INPUT, (256, 256))
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[60:200, 150:240] = 255  # white = regenerate
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = [*FAST, "--lora_path", str(lora), "--input_image", str(big), "--mask_image", str(tmp_path / "mask.png"),
              "--num_images", "3", "--seed", "8"]
    infer_main([*common, "--output_dir", str(tmp_path / "single")])
    single = list(decoded)
    decoded.clear()
    infer_main([*common, "--batch_size", "2", "--output_dir", str(tmp_path / "batched")])
    assert {(w, h) for w, h, _ in calls} == {(64, 64)}
    working = calls[0][2][0, 0]  # (64, 64): the 256 px mask averaged down, 0 far from it
    assert working[:8].max() == 0 and working[26:48, 40:58].min() == 1
    assert [z.shape[0] for z in decoded] == [2, 1]
    names = [f"big_{i}.png" for i in range(3)]
    assert_batched_equals_single(decoded, single, [tmp_path / "batched" / n for n in names],
                                 [tmp_path / "single" / n for n in names])
    result, source = pixels(tmp_path / "batched" / "big_2.png"), pixels(big)
    np.testing.assert_array_equal(result[mask == 0], source[mask == 0])


def test_folder_inputs_of_two_sizes_share_the_trained_size(lora, tmp_path, calls):
    """A 128 and a 256 px composite have one bucket at 64: their images share a call."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(INPUT, folder / "a.png")
    upscaled(folder / "b.png", INPUT, (256, 256))
    out = tmp_path / "out"
    infer_main([*FAST, "--lora_path", str(lora), "--input_dir", str(folder), "--batch_size", "2", "--seed", "2",
                "--output_dir", str(out)])
    assert [(w, h) for w, h, _ in calls] == [(64, 64)]
    for stem, side in [("a", 128), ("b", 256)]:
        result, source = pixels(out / f"{stem}_0.png"), pixels(folder / f"{stem}.png")
        assert result.shape == (side, side, 3)
        np.testing.assert_array_equal(result[: side // 2], source[: side // 2])  # panels 0 1
        assert record(out, stem)["resolved"]["working_size"] == [64, 64]


def test_text_to_set_takes_the_trained_grids_aspect(lora, tmp_path):
    strip = tmp_path / "strip_lora"
    shutil.copytree(lora, strip)
    meta = json.loads((strip / "iclora_config.json").read_text())
    # A record without training sizes (as earlier versions wrote): the grid's aspect, square panels.
    (strip / "iclora_config.json").write_text(json.dumps({**meta, "grid": "1x3", "buckets": None}))
    out = tmp_path / "out"
    infer_main([*FAST, "--lora_path", str(strip), "--panels_to_inpaint", "all", "--seed", "0",
                "--output_dir", str(out)])
    image = pixels(out / "generated_0.png")
    assert image.shape == (24, 72, 3)  # 1x3 at 64: 64x21 on the grid's steps (24 x 8 px), not 64x64
    assert record(out, "generated")["resolved"]["working_size"] == [72, 24]
    width_only = InferConfig(lora_path=str(strip), prompt="p", panels_to_inpaint=["all"], width=96)
    assert check_inputs(width_only).size == (96, 32)  # the height from the grid


def test_text_to_set_takes_the_aspect_training_saw_most(lora, tmp_path):
    """Training records its sizes; a set from text takes the most common one's aspect (a
    1x3 of portrait panels stays portrait), scaled to the working size."""
    assert json.loads((lora / "iclora_config.json").read_text())["buckets"] == [[64, 64, 16]]  # data/sample at 64
    portrait = tmp_path / "portrait_lora"
    shutil.copytree(lora, portrait)
    meta = json.loads((portrait / "iclora_config.json").read_text())
    buckets = [[120, 56, 5], [72, 24, 3]]  # 1x3 of 40x56 panels, most common first
    (portrait / "iclora_config.json").write_text(json.dumps({**meta, "grid": "1x3", "buckets": buckets}))
    out = tmp_path / "out"
    infer_main([*FAST, "--lora_path", str(portrait), "--panels_to_inpaint", "all", "--seed", "0",
                "--output_dir", str(out)])
    assert pixels(out / "generated_0.png").shape == (32, 72, 3)  # 120x56 at 64: 64x30 on the grid's steps
    width_only = InferConfig(lora_path=str(portrait), prompt="p", panels_to_inpaint=["all"], width=240)
    assert check_inputs(width_only).size == (240, 112)
    other_grid = InferConfig(lora_path=str(portrait), prompt="p", panels_to_inpaint=["all"], grid="1x2")
    assert check_inputs(other_grid).size == composite_size(2, 1, 64, Grid(1, 2), 8)  # not the record's grid


def test_an_area_bucketed_lora_works_at_its_area(lora, tmp_path):
    """A LoRA trained with --bucket_by area (its record says so) denoises a 1x3 strip, and
    generates one from text, at about image_size² pixels, as training sized its strips."""
    strip = tmp_path / "area_lora"
    shutil.copytree(lora, strip)
    meta = json.loads((strip / "iclora_config.json").read_text())
    (strip / "iclora_config.json").write_text(json.dumps({**meta, "grid": "1x3", "bucket_by": "area",
                                                           "buckets": None}))
    image = upscaled(tmp_path / "strip.png", INPUT, (192, 64))
    plan = check_inputs(InferConfig(lora_path=str(strip), prompt="p", input_image=str(image), panels_to_inpaint=["2"],
                                    output_dir=str(tmp_path / "out")))
    assert plan.working.size == composite_size(192, 64, 64, Grid(1, 3), 8, "area") == (120, 40)  # longest: 72x24
    assert "bucket_by area" in plan.working.source
    generated = check_inputs(InferConfig(lora_path=str(strip), prompt="p", panels_to_inpaint=["all"]))
    assert generated.size == (120, 40)


def test_the_bare_base_works_at_its_native_size_and_says_so(tmp_path):
    plan = check_inputs(InferConfig(lora_path="none", prompt="p", input_image=str(INPUT), base_model="tiny-sdxl",
                                    output_dir=str(tmp_path)))
    assert plan.working.size == (1024, 1024) and "native size (1024" in plan.working.source
    plan = check_inputs(InferConfig(lora_path="none", prompt="p", input_image=str(INPUT), base_model="tiny-sdxl",
                                    output_dir=str(tmp_path), native_size=True))
    assert plan.working.size == (128, 128)


@pytest.mark.parametrize("flags, message", [
    (["--image_size", "0"], "--image_size must be at least 1, got 0"),
    (["--image_size", "64", "--native_size"], "--native_size denoises at the input's own size"),
])
def test_size_flag_errors_are_one_line(flags, message, lora, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer_main, [*FAST, "--lora_path", str(lora), "--input_image", str(INPUT), "--output_dir",
                             str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and not (tmp_path / "out").exists()


def test_flux_works_at_the_trained_size(tmp_path, monkeypatch):
    data = ROOT / "data" / "sample"
    lora = train_flux_ic_lora.main([
        "--data_dir", str(data), "--output_dir", str(tmp_path / "train"), "--model_id", "tiny-flux",
        "--conditioning", "blend", "--image_size", "64", "--batch_size", "2", "--lora_rank", "4",
        "--max_train_steps", "1",
    ]).final_dir
    sizes = []
    real = FluxInpaintPipeline.__call__

    @functools.wraps(real)
    def call(self, *a, **k):
        sizes.append((k["width"], k["height"]))
        return real(self, *a, **k)

    monkeypatch.setattr(FluxInpaintPipeline, "__call__", call)
    out = tmp_path / "out"
    flux_cli.main(["--lora_path", str(lora), "--input_image", str(INPUT), "--prompt", "a set", "--panels_to_inpaint",
                   "1", "3", "--num_inference_steps", "2", "--seed", "3", "--output_dir", str(out)])
    assert sizes == [(64, 64)]
    result, source = pixels(out / "00001_0.png"), pixels(INPUT)
    assert result.shape == (128, 128, 3)
    np.testing.assert_array_equal(result[:, :64], source[:, :64])
    assert record(out, "00001")["resolved"]["working_size"] == [64, 64]
