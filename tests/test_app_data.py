"""The web app's Data tab, at the level of its handlers: the dry run's report for a folder,
each caption's tokens per text encoder and marker check, captions saved in place atomically,
composites built by the compose command's code, and paths outside the workspace refused.

    pytest tests/test_app_data.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import toy_dataset
from iclora.app import data
from iclora.app.workspace import Workspace
from iclora.data import Record
from iclora.prepare.check import check_encoder, load_tokenizers


@pytest.fixture
def ws(tmp_path) -> Workspace:
    toy_dataset(tmp_path / "data")
    return Workspace(tmp_path)


def test_folder_report_is_the_dry_run(ws):
    text = data.folder_report(ws, "data", "2x2", "sdxl", "tiny-sdxl", 64)
    assert text.startswith("dry run: data, grid 2x2, image_size 64")  # workspace paths shown relative
    assert "images: 4" in text and "text_encoder (CLIP)" in text and "markers:" in text
    (ws.root / "data" / "00002.txt").unlink()
    with pytest.raises(ValueError, match="--data_dir .*data: 1 bad file\\(s\\): 00002.png: no caption file 00002.txt"):
        data.folder_report(ws, "data", "2x2", "sdxl", "tiny-sdxl", 64)
    assert data.list_images(ws, "data") == ["00000.png", "00001.png", "00002.png", "00003.png"]  # still browsable


def test_caption_checks_per_image(ws):
    caption = data.read_image_caption(ws, "data", "00001.png")
    check = data.check_caption(caption, "2x2", "sdxl", "tiny-sdxl", "00001.png")
    [(_, tokenizer, limit), _] = load_tokenizers("sdxl", "tiny-sdxl", None)
    expected = check_encoder("x", tokenizer, limit, [Record(Path("00001.png"), caption, (0, 0), (0, 0))])
    assert check.tokens[0].startswith(f"text_encoder (CLIP): {expected.lengths['00001.png']} tokens of 150")
    assert check.markers == "markers match the 2x2 grid"
    wrong = data.check_caption("[IMAGE 1] a; [IMAGE 2] b", "2x2", "sdxl", "tiny-sdxl")
    assert wrong.markers == "missing marker(s) [IMAGE 3] [IMAGE 4] of the 2x2 grid"
    empty = data.check_caption("[IMAGE 1] a; [IMAGE 2]; [IMAGE 3] c; [IMAGE 4] d", "2x2", "sdxl", "tiny-sdxl")
    assert empty.markers == "empty panel(s): [IMAGE 2] with no description"
    flux = data.check_caption("plain words", "1x3", "flux", "tiny-flux")
    assert [line.split(":")[0] for line in flux.tokens] == ["text_encoder (CLIP, pooled)", "text_encoder_2 (T5)"]
    assert flux.markers == "no panel markers (a plain caption)"
    assert "no caption file" in data.check_caption(None, "2x2", "sdxl", "tiny-sdxl").markers


def test_grid_drawn_over_the_composite(ws):
    shown = np.asarray(data.show_image(ws, "data", "00000.png", "2x2"))
    original = np.asarray(Image.open(ws.root / "data" / "00000.png").convert("RGB"))
    assert shown.shape == original.shape
    assert tuple(shown[10, 32]) == (255, 255, 0) and tuple(shown[32, 10]) == (255, 255, 0)  # the panel borders
    assert (shown != original).mean() < 0.3  # the picture itself is still there


def test_save_caption_atomically_and_recheck(ws):
    text = "[TOP-LEFT] a; [TOP-RIGHT] b; [BOTTOM-LEFT] c; [BOTTOM-RIGHT] d"
    target = data.save_caption(ws, "data", "00003.png", f"  {text}\n\n")
    assert target == ws.root / "data" / "00003.txt" and target.read_text() == text + "\n"
    assert not list((ws.root / "data").glob(".*.tmp"))
    assert data.read_image_caption(ws, "data", "00003.png") == text
    with pytest.raises(ValueError, match="empty"):
        data.save_caption(ws, "data", "00003.png", "   ")
    (ws.root / "data" / "00002.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"00002.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        data.read_image_caption(ws, "data", "00002.png")


def test_paths_outside_the_workspace_are_refused(ws, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "x.png").write_bytes((ws.root / "data" / "00000.png").read_bytes())
    for call in [lambda: data.list_images(ws, "../"), lambda: data.list_images(ws, str(outside)),
                 lambda: data.save_caption(ws, "data", "../x.png", "a caption"),
                 lambda: data.save_caption(ws, "data/..", "00000.png", "a caption"),
                 lambda: data.show_image(ws, "data", "/etc/passwd", "2x2"),
                 lambda: data.compose_folder(ws, data.ComposeSettings(input_dir="data", output_dir=str(outside)))]:
        with pytest.raises(ValueError, match="refused|not a path|outside"):
            call()
    assert sorted(p.name for p in outside.iterdir()) == ["x.png"]  # nothing written there
    with pytest.raises(ValueError, match="not an image"):
        data.save_caption(ws, "data", "00000.txt", "a caption")


def test_compose_from_photo_sets(ws):
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
    for look in ("look1", "look2"):
        for i, colour in enumerate(colours):
            folder = ws.root / "photos" / look
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 60), colour).save(folder / f"{i}.jpg")
            (folder / f"{i}.txt").write_text(f"panel {i} of {look}")
    settings = data.ComposeSettings(input_dir="photos", output_dir="composed", panel_width=32, marker_style="position")
    text, command = data.compose_folder(ws, settings)
    assert "wrote 2 composite(s) to composed; skipped 0" in text
    assert command.startswith("python -m iclora.prepare compose --input_dir")
    assert Image.open(ws.root / "composed" / "look1.png").size == (64, 64)
    assert (ws.root / "composed" / "look1.txt").read_text().startswith("[TOP-LEFT] panel 0 of look1")
    again, _ = data.compose_folder(ws, settings)
    assert "skipped look1:" in again and "--overwrite replaces it" in again
    with pytest.raises(ValueError, match=r"^--grid: expected ROWSxCOLS"):
        data.compose_folder(ws, data.ComposeSettings(input_dir="photos", output_dir="c2", grid="2by2"))
    with pytest.raises(FileNotFoundError, match="--input_dir nowhere: no such file or folder"):
        data.compose_folder(ws, data.ComposeSettings(input_dir="nowhere", output_dir="c2"))
