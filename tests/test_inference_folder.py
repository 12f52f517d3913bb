"""--input_dir: a folder of composites completed with one model load (tiny SDXL)."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_batched_equals_single
from iclora.backends import load_backend as real_load_backend
from iclora.cli import run_cli
from iclora.inference.flux_ic_lora_inference import main as flux_main
from iclora.inference.inpaint import pipeline_calls
from iclora.inference.sdxl_ic_lora_inference import main as infer_main
from iclora.panels import Grid, panel_box
from iclora.toy import make_dataset
from iclora.training.train_sdxl_ic_lora import main as train_main

STEPS = ["--num_inference_steps", "2", "--guidance_scale", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    data = tmp_path_factory.mktemp("folder_data")
    make_dataset(data, 4, seed=0, panel_size=32)
    return train_main(["--data_dir", str(data), "--output_dir", str(tmp_path_factory.mktemp("lora")),
                       "--model_id", "tiny-sdxl", "--image_size", "64", "--batch_size", "2", "--lora_rank", "4",
                       "--lora_alpha", "4", "--max_train_steps", "1", "--conditioning", "context"]).final_dir


@pytest.fixture
def inputs(tmp_path):
    """Three composites: two with their own prompt, one with a free-form mask."""
    folder = tmp_path / "in"
    make_dataset(folder, 3, seed=5, panel_size=32)
    (folder / "00001.txt").unlink()  # takes --prompt
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:32, 32:] = 255  # panel 1
    Image.fromarray(mask).save(folder / "00002_mask.png")
    return folder


def test_a_folder_runs_with_one_model_load(lora, inputs, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr("iclora.backends.load_backend", lambda *a, **k: loads.append(a) or real_load_backend(*a, **k))
    out = tmp_path / "out"
    files = infer_main(["--lora_path", str(lora), "--input_dir", str(inputs), "--prompt", "a set",
                        "--panels_to_inpaint", "2", "3", "--output_dir", str(out), *STEPS])
    assert len(loads) == 1
    summary = json.loads((out / "folder_summary.json").read_text())
    assert [e["input"].rsplit("/", 1)[-1] for e in summary["images"]] == ["00000.png", "00001.png", "00002.png"]
    assert [e["prompt_from"] for e in summary["images"]] == ["txt", "--prompt", "txt"]
    assert summary["images"][2]["panels"] == [1] and summary["images"][0]["panels"] == [2, 3]
    for stem in ["00000", "00001", "00002"]:
        assert (out / f"{stem}_0.png").is_file() and (out / f"{stem}_inference.json").is_file()
    record = json.loads((out / "00000_inference.json").read_text())
    assert record["arguments"]["prompt"] == (inputs / "00000.txt").read_text()
    # The masked image keeps everything outside its mask, its panel 2 included.
    kept = np.asarray(Image.open(out / "00002_0.png"))
    given = np.asarray(Image.open(inputs / "00002.png"))
    left, top, right, bottom = panel_box(2, Grid(2, 2), 64, 64)
    assert np.array_equal(kept[top:bottom, left:right], given[top:bottom, left:right])
    assert out / "folder_summary.json" in files


def test_the_folder_result_equals_single_image_runs(lora, inputs, tmp_path):
    infer_main(["--lora_path", str(lora), "--input_dir", str(inputs), "--prompt", "a set",
                "--output_dir", str(tmp_path / "folder"), *STEPS])
    infer_main(["--lora_path", str(lora), "--input_image", str(inputs / "00001.png"), "--prompt", "a set",
                "--output_dir", str(tmp_path / "single"), *STEPS])
    assert (tmp_path / "folder" / "00001_0.png").read_bytes() == (tmp_path / "single" / "00001_0.png").read_bytes()


def test_a_folder_batches_across_inputs(lora, inputs, tmp_path, decoded):
    """One image per input (a folder of try-on composites): --batch_size 2 makes two inputs a
    call, each image its own input's, with its own prompt, mask and seed."""
    args = ["--lora_path", str(lora), "--input_dir", str(inputs), "--prompt", "a set", *STEPS]
    infer_main([*args, "--output_dir", str(tmp_path / "single")])
    single = list(decoded)
    decoded.clear()
    infer_main([*args, "--output_dir", str(tmp_path / "batched"), "--batch_size", "2"])
    assert [z.shape[0] for z in single] == [1] * 3 and [z.shape[0] for z in decoded] == [2, 1]
    names = [f"{stem}_0.png" for stem in ["00000", "00001", "00002"]]
    assert_batched_equals_single(decoded, single, [tmp_path / "batched" / n for n in names],
                                 [tmp_path / "single" / n for n in names])
    summary = json.loads((tmp_path / "batched" / "folder_summary.json").read_text())
    assert summary["batch_size"] == 2 and [e["seeds"] for e in summary["images"]] == [[3]] * 3
    assert "split evenly" in summary["seconds_per_input"]
    record = json.loads((tmp_path / "batched" / "00002_inference.json").read_text())
    assert record["arguments"]["batch_size"] == 2 and record["arguments"]["mask_image"].endswith("00002_mask.png")


@pytest.fixture
def mixed_inputs(tmp_path):
    """Four composites, each with its own prompt (one takes --prompt): one with a free-form
    mask, one of another size (96x96, its own pipeline calls)."""
    folder = tmp_path / "mixed"
    make_dataset(folder, 3, seed=5, panel_size=32)
    make_dataset(tmp_path / "large", 1, seed=6, panel_size=48)
    (tmp_path / "large" / "00000.png").rename(folder / "00003.png")
    (folder / "00001.txt").unlink()
    for stem, prompt in [("00000", "a red set"), ("00002", "four panels of one object, large and small, blue and green"),
                         ("00003", "a large set")]:
        (folder / f"{stem}.txt").write_text(prompt)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[40:60, 36:62] = 255  # a blob in panel 3
    Image.fromarray(mask).save(folder / "00002_mask.png")
    return folder


@pytest.mark.parametrize("backend, base, conditioning, flags", [
    ("sdxl", "tiny-sdxl", "blend", ["--use_gradient_mask", "--gradient_width", "8"]),  # StableDiffusionXLInpaintPipeline
    ("sdxl", "tiny-sdxl-inpaint", "concat", ["--strength", "0.6", "--guidance_scale", "5"]),  # + visible reset
    ("sdxl", "tiny-sdxl", "context", ["--guidance_scale", "5", "--negative_prompt", "blurry"]),  # SDXLContextPipeline
    ("flux", "tiny-flux", "blend", ["--strength", "0.6"]),  # FluxInpaintPipeline
    ("flux", "tiny-flux-fill", "concat", ["--use_gradient_mask", "--gradient_width", "8"]),  # FluxFillPipeline + reset
    ("flux", "tiny-flux", "context", []),  # FluxContextPipeline, per-token modulation
    ("flux", "tiny-flux", "context", ["--context_timestep", "shared", "--strength", "0.6"]),
])
def test_batched_folder_images_are_the_one_input_runs_images(backend, base, conditioning, flags, mixed_inputs,
                                                             tmp_path, decoded):
    """Every pipeline takes a batch of different prompts, inputs, (soft, free-form) masks and
    seeds: image i of a batched folder run is the one --batch_size 1 makes, within float rounding."""
    main = flux_main if backend == "flux" else infer_main
    args = ["--lora_path", "none", "--base_model", base, "--native_size", "--conditioning", conditioning, "--input_dir",
            str(mixed_inputs), "--prompt", "a set", "--panels_to_inpaint", "1", "3", "--num_images", "2",
            "--num_inference_steps", "2", "--seed", "3", *flags]
    main([*args, "--output_dir", str(tmp_path / "single")])
    single = list(decoded)
    decoded.clear()
    main([*args, "--output_dir", str(tmp_path / "batched"), "--batch_size", "3"])
    # 64x64: a0 a1 b0 | b1 c0 c1, 96x96: d0 d1 (an input of another size has calls of its own)
    assert [z.shape[0] for z in single] == [1] * 8 and [z.shape[0] for z in decoded] == [3, 3, 2]
    names = [f"{stem}_{i}.png" for stem in ["00000", "00001", "00002", "00003"] for i in range(2)]
    assert_batched_equals_single(decoded, single, [tmp_path / "batched" / n for n in names],
                                 [tmp_path / "single" / n for n in names])
    summary = json.loads((tmp_path / "batched" / "folder_summary.json").read_text())
    assert [e["input"].rsplit("/", 1)[-1] for e in summary["images"]] == [f"0000{i}.png" for i in range(4)]
    assert [e["seeds"] for e in summary["images"]] == [[3, 4]] * 4
    kept = np.asarray(Image.open(tmp_path / "batched" / "00002_1.png"))
    given = np.asarray(Image.open(mixed_inputs / "00002.png"))
    assert np.array_equal(kept[:24], given[:24])  # outside its own (feathered) mask: the input's pixels


def test_pipeline_calls_group_by_size_in_input_order():
    calls = pipeline_calls(["64", "96", "64"], [[1, 2], [5], [3, 4]], 3)
    assert calls == [[(0, 1), (0, 2), (2, 3)], [(2, 4)], [(1, 5)]]
    assert pipeline_calls(["64", "64"], [[1], [1]], 1) == [[(0, 1)], [(1, 1)]]


@pytest.mark.parametrize("setup, argv, message", [
    ("no_prompt", [], "00001.png: no prompt"),
    ("none", ["--input_image", "x.png"], "give it without --input_image"),
    ("missing", [], "no such folder"),
    ("bad_mask", ["--prompt", "a set"], "00002.png: --mask_image"),
])
def test_folder_errors_are_one_line_before_any_model_loads(setup, argv, message, lora, inputs, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setattr("iclora.backends.load_backend", lambda *a, **k: pytest.fail("a model was loaded"))
    folder = tmp_path / "nowhere" if setup == "missing" else inputs
    if setup == "bad_mask":
        Image.new("L", (10, 10), 255).save(inputs / "00002_mask.png")  # not the image's size
    with pytest.raises(SystemExit) as info:
        run_cli(infer_main, ["--lora_path", str(lora), "--input_dir", str(folder), "--output_dir",
                             str(tmp_path / "out"), *STEPS, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
