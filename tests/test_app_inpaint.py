"""The web app's Inpaint tab, at the level of its handlers (no browser, no Gradio needed):
the page's settings give the command line's images byte for byte, two checkpoints side by
side, panels picked by clicking, painted masks, bad input as the command line's one line,
and paths that leave the workspace refused.

    pytest tests/test_app_inpaint.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_training, toy_dataset
from iclora.app import inpaint
from iclora.app.inpaint import InpaintSettings, run_compare, run_inpaint
from iclora.app.workspace import Workspace
from iclora.inference.sdxl_ic_lora_inference import main as infer_main
from iclora.panels import Grid

PROMPT = "a set of four panels"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """A workspace with toy data and a two-step tiny LoRA (a checkpoint at each step)."""
    root = tmp_path_factory.mktemp("workspace")
    toy_dataset(root / "data")
    run_training(root / "data", root / "runs" / "r1", "--max_train_steps", "2", "--save_every", "1")
    return Workspace(root)


def settings(**overrides) -> InpaintSettings:
    values = dict(lora="runs/r1/final_model", prompt=PROMPT, panels="2 3", steps=2, guidance=1.0, seed=7,
                  strength=0.9, feather=6, num_images=2)
    return InpaintSettings(**{**values, **overrides})


def same_flags_on_cli(ws: Workspace, out: Path, image: Path, lora: str, *extra: str) -> Path:
    infer_main(["--lora_path", str(ws.root / lora), "--input_image", str(image), "--prompt", PROMPT,
                "--panels_to_inpaint", "2", "3", "--num_inference_steps", "2", "--guidance_scale", "1",
                "--seed", "7", "--strength", "0.9", "--use_gradient_mask", "--gradient_width", "6",
                "--num_images", "2", "--save_comparison", "--output_dir", str(out), *extra])
    return out


def test_page_settings_give_the_command_lines_bytes(ws, tmp_path):
    upload = ws.root / "data" / "00001.png"
    first = run_inpaint(ws, settings(), upload)
    again = run_inpaint(ws, settings(output_dir="inpaint_again"), upload)  # the kept pipeline
    cli = same_flags_on_cli(ws, tmp_path / "cli", upload, "runs/r1/final_model")
    names = ["00001_0.png", "00001_1.png", "00001_0_panel2.png", "00001_comparison.png"]
    for name in names:
        expected = (cli / name).read_bytes()
        assert (ws.root / "inpaint_output" / "final_model" / name).read_bytes() == expected, name
        assert (ws.root / "inpaint_again" / "final_model" / name).read_bytes() == expected, name
    assert [p.name for p in first.outputs] == ["00001_0.png", "00001_1.png"]
    assert first.comparison.is_file() and again.extra["seeds"] == [7, 8]
    # The page shows the command a user could type for the same images.
    assert "--panels_to_inpaint 2 3" in first.command and "--seed 7" in first.command
    # The input the flags name is the uploaded file, copied byte for byte into the output folder.
    assert (ws.root / "inpaint_output" / "inputs" / "00001.png").read_bytes() == upload.read_bytes()


def test_two_checkpoints_side_by_side(ws):
    upload = ws.root / "data" / "00002.png"
    a, b = run_compare(ws, settings(num_images=1, output_dir="compare"), "runs/r1/checkpoints/checkpoint-1", upload)
    assert a.comparison.parent.name == "final_model" and b.comparison.parent.name == "checkpoint-1"
    assert a.extra["seeds"] == b.extra["seeds"] == [7]
    single = run_inpaint(ws, settings(num_images=1, output_dir="single"), upload)
    assert a.outputs[0].read_bytes() == single.outputs[0].read_bytes()  # same input, same seed
    pixels = [np.asarray(Image.open(r.outputs[0])) for r in (a, b)]
    assert not np.array_equal(*pixels)  # one more training step changes the completion
    # The same name twice (two runs' final models) still gets two folders.
    a2, b2 = run_compare(ws, settings(num_images=1, output_dir="compare2"), "runs/r1/final_model", upload)
    assert {a2.comparison.parent.name, b2.comparison.parent.name} == {"a_final_model", "b_final_model"}


def test_painted_mask_is_the_command_lines_mask_image(ws, tmp_path):
    upload = ws.root / "data" / "00001.png"
    painted = np.zeros((64, 64, 4), np.uint8)
    painted[40:60, 5:30, 3] = 255  # a stroke inside panel 2 only
    mask = inpaint.painted_mask({"background": None, "layers": [painted], "composite": None})
    result = run_inpaint(ws, settings(num_images=1, feather=0, strength=1.0, output_dir="painted"), upload, mask)
    mask_file = ws.root / "painted" / "inputs" / "00001_mask.png"
    assert np.asarray(Image.open(mask_file)).max() == 255 and result.extra["panels"] == [2]
    cli = tmp_path / "cli"
    infer_main(["--lora_path", str(ws.root / "runs/r1/final_model"), "--input_image", str(upload), "--prompt", PROMPT,
                "--mask_image", str(mask_file), "--num_inference_steps", "2", "--guidance_scale", "1", "--seed", "7",
                "--output_dir", str(cli)])
    assert result.outputs[0].read_bytes() == (cli / "00001_0.png").read_bytes()
    with pytest.raises(ValueError, match="painted mask is empty"):
        inpaint.painted_mask({"layers": [np.zeros((64, 64, 4), np.uint8)]})


def test_clicking_panels():
    grid = Grid.parse("2x2")
    assert [inpaint.panel_at(x, y, 64, 64, grid) for x, y in [(1, 1), (40, 2), (3, 50), (63, 63)]] == [0, 1, 2, 3]
    panels = inpaint.toggle_panel("", 3, grid)
    panels = inpaint.toggle_panel(panels, 1, grid)
    assert panels == "1 3" and inpaint.toggle_panel(panels, 3, grid) == "1"
    assert inpaint.toggle_panel("all", 0, grid) == "0"
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    drawn = np.asarray(inpaint.draw_panels(image, grid, "1 3")).astype(int)
    # Hidden panels are shaded red, visible ones keep their colour inside the grid lines.
    assert drawn[16, 48, 0] > 100 and drawn[48, 48, 0] > 100
    assert tuple(drawn[16, 16]) == (0, 0, 255) and tuple(drawn[48, 16]) == (0, 0, 255)


def test_bad_input_gives_the_command_lines_line(ws, tmp_path):
    upload = ws.root / "data" / "00001.png"
    with pytest.raises(ValueError, match=r"^--strength must be in \(0, 1\], got 0.0$"):
        run_inpaint(ws, settings(strength=0.0), upload)
    with pytest.raises(ValueError, match="--grid: expected ROWSxCOLS"):
        run_inpaint(ws, settings(grid="2by2"), upload)
    with pytest.raises(ValueError, match="no panel chosen"):
        run_inpaint(ws, settings(panels=""), upload)
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match=r"--input_image .*notes\.png: unreadable image"):
        run_inpaint(ws, settings(), junk)
    with pytest.raises(FileNotFoundError, match="--lora_path runs/none_such: no such file or folder"):
        run_inpaint(ws, settings(lora="runs/none_such"), upload)


def test_paths_outside_the_workspace_are_refused(ws, tmp_path):
    upload = ws.root / "data" / "00001.png"
    for lora in ["../elsewhere", "runs/../../x", "/etc", str(ws.root / "runs/r1/final_model")]:
        with pytest.raises(ValueError, match="refused"):
            run_inpaint(ws, settings(lora=lora), upload)
    with pytest.raises(ValueError, match="refused"):
        run_inpaint(ws, settings(output_dir="/tmp/out"), upload)
    with pytest.raises(ValueError, match="refused"):
        run_inpaint(ws, settings(base_model="../models/sdxl"), upload)
    outside = tmp_path / "outside"
    outside.mkdir()
    (ws.root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="leads outside the workspace"):
        run_inpaint(ws, settings(output_dir="link/out"), upload)
    assert not any(outside.iterdir())  # nothing written there
    # Model ids are not paths; a folder of the workspace is one.
    assert ws.model("tiny-sdxl", "--base_model") == "tiny-sdxl"
    assert ws.model("stabilityai/stable-diffusion-xl-base-1.0", "--base_model").startswith("stabilityai/")
    assert ws.model("runs/r1", "--base_model") == str(ws.root / "runs" / "r1")


def test_lora_list_finds_final_models_and_checkpoints(ws):
    found = inpaint.list_loras(ws)
    assert found[0] == "runs/r1/final_model" and found[-1] == "none"  # the newest first
    assert {"runs/r1/final_model", "runs/r1/checkpoints/checkpoint-1", "runs/r1/checkpoints/checkpoint-2"} <= set(found)
    assert inpaint.recorded_grid(ws, "runs/r1/final_model") == "2x2"


def test_separate_panels_are_composed_on_the_fly(ws, tmp_path):
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    uploads = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"p{i}.png")
        uploads.append(tmp_path / f"p{i}.png")
    composite = inpaint.compose_panels(uploads, "2x2", ws.root / "pieces")
    assert composite == ws.root / "pieces" / "inputs" / "p0_composite.png"
    pixels = np.asarray(Image.open(composite))
    assert pixels.shape == (64, 64, 3)
    assert [tuple(pixels[y, x]) for x, y in [(5, 5), (40, 5), (5, 40), (40, 40)]] == [*colours, (255, 255, 255)]
    result = run_inpaint(ws, settings(num_images=1, panels="3", output_dir="pieces"), composite)
    assert result.extra["panels"] == [3] and result.outputs[0].is_file()
    with pytest.raises(ValueError, match="4 panel images, the 1x3 grid has 3 panels"):
        inpaint.compose_panels(uploads + uploads[:1], "1x3", ws.root / "pieces")
    (tmp_path / "bad.png").write_text("no image")
    with pytest.raises(ValueError, match="unreadable"):
        inpaint.compose_panels([tmp_path / "bad.png"], "2x2", ws.root / "pieces")


def test_nothing_pickled_is_loaded(ws):
    """Weights come from safetensors only: a pickle where a LoRA should be is refused unread."""
    folder = ws.root / "pickled"
    folder.mkdir()
    (folder / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04 not to be unpickled")
    upload = ws.root / "data" / "00001.png"
    with pytest.raises(ValueError, match="only .safetensors files are loaded"):
        run_inpaint(ws, settings(lora="pickled/pytorch_lora_weights.bin"), upload)
    with pytest.raises(FileNotFoundError, match="folder has no pytorch_lora_weights.safetensors"):
        run_inpaint(ws, settings(lora="pickled"), upload)


def test_flux_base_alone_gives_the_command_lines_bytes(ws, tmp_path):
    from iclora.inference.flux_ic_lora_inference import main as flux_main

    upload = ws.root / "data" / "00001.png"
    page = run_inpaint(ws, settings(lora="none", backend="flux", base_model="tiny-flux", num_images=1, feather=0,
                                    strength=1.0, output_dir="flux"), upload)
    assert page.outputs[0].parent.name == "base"
    flux_main(["--lora_path", "none", "--base_model", "tiny-flux", "--input_image", str(upload), "--prompt", PROMPT,
               "--panels_to_inpaint", "2", "3", "--num_inference_steps", "2", "--guidance_scale", "1", "--seed", "7",
               "--output_dir", str(tmp_path / "cli")])
    assert page.outputs[0].read_bytes() == (tmp_path / "cli" / "00001_0.png").read_bytes()
