"""Data preparation: separate photos -> composites with unified captions.

    pytest tests/test_prepare.py
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iclora.panels import Grid
from iclora.prepare.__main__ import main
from iclora.prepare.markers import check_markers, find_markers, panel_markers, unified_caption

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def photo(path: Path, size: tuple[int, int], colour, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def pixel(image: Image.Image, x: int, y: int):
    return image.convert("RGB").getpixel((x, y))


def test_panel_markers_for_every_style_and_grid():
    assert panel_markers(Grid(2, 2), "position") == ["[TOP-LEFT]", "[TOP-RIGHT]", "[BOTTOM-LEFT]", "[BOTTOM-RIGHT]"]
    assert panel_markers(Grid(1, 3), "position") == ["[LEFT]", "[CENTER]", "[RIGHT]"]
    assert panel_markers(Grid(2, 1), "position") == ["[TOP]", "[BOTTOM]"]
    assert panel_markers(Grid(1, 3), "image") == ["[IMAGE 1]", "[IMAGE 2]", "[IMAGE 3]"]
    assert panel_markers(Grid(1, 2), "scene") == ["[SCENE-1]", "[SCENE-2]"]
    with pytest.raises(ValueError, match="position"):
        panel_markers(Grid(1, 4), "position")


def test_marker_check_against_the_grid():
    grid = Grid(2, 2)
    good = unified_caption("a set", ["a", "b", "c", "d"], panel_markers(grid, "position"))
    assert good == "a set; [TOP-LEFT] a; [TOP-RIGHT] b; [BOTTOM-LEFT] c; [BOTTOM-RIGHT] d"
    assert check_markers(good, grid) is None
    assert check_markers("no markers, a plain description", grid) is None
    assert check_markers("[IMAGE1] a [IMAGE2] b [IMAGE3] c [IMAGE4] d", grid) is None  # spelling variant
    assert check_markers("[IMAGE 1] a [IMAGE 2] b", grid) == "missing marker(s) [IMAGE 3] [IMAGE 4] of the 2x2 grid"
    assert check_markers("s; [IMAGE 1] a; [IMAGE 3] c; [IMAGE 4] d", grid) == "missing marker(s) [IMAGE 2] of the 2x2 grid"
    assert check_markers("s; [IMAGE 1] a; [IMAGE 2]; [IMAGE 3] c; [IMAGE 4]", grid) == (
        "empty panel(s): [IMAGE 2] [IMAGE 4] with no description")
    assert "do not match" in check_markers("[TOP-RIGHT] a [TOP-LEFT] b [BOTTOM-LEFT] c [BOTTOM-RIGHT] d", grid)
    assert find_markers(good) == panel_markers(grid, "position")


def test_compose_folders_letterbox_and_captions(tmp_path, capsys):
    src = tmp_path / "photos"
    # A portrait and a landscape photo into square 32 px panels: letterboxed, not stretched.
    photo(src / "shirt" / "a_front.png", (40, 80), RED, "a red shirt, front")
    photo(src / "shirt" / "b_back.png", (80, 40), GREEN, "[IMAGE 2] the back")  # its own marker is replaced
    photo(src / "shirt" / "c_model.png", (64, 64), BLUE)  # no panel caption
    (src / "shirt.txt").write_text("a shirt and the person wearing it")
    photo(src / "two" / "x.png", (32, 32), RED)
    photo(src / "two" / "y.png", (32, 32), RED)
    (src / "broken").mkdir()
    for name in ("p0.png", "p1.png", "p2.png"):
        (src / "broken" / name).write_bytes(b"not an image")

    result = main(["compose", "--input_dir", str(src), "--output_dir", str(tmp_path / "out"), "--grid", "1x3",
                   "--panel_width", "32", "--background", "black"])

    assert [p.name for p in result.written] == ["shirt.png"]
    assert "2 panel images, the 1x3 grid needs 3" in result.skipped["two"]
    assert "unreadable image p0.png" in result.skipped["broken"]
    printed = capsys.readouterr().out
    assert "skipped two: 2 panel images" in printed and "skipped broken: unreadable image" in printed
    image = Image.open(tmp_path / "out" / "shirt.png")
    assert image.size == (96, 32)
    # Panel 0: the 40x80 portrait becomes 16x32, centred: black bars left and right.
    assert pixel(image, 2, 16) == (0, 0, 0) and pixel(image, 16, 16) == RED and pixel(image, 29, 16) == (0, 0, 0)
    # Panel 1: the landscape becomes 32x16: bars above and below.
    assert pixel(image, 48, 2) == (0, 0, 0) and pixel(image, 48, 16) == GREEN
    assert pixel(image, 80, 2) == BLUE  # square: fills its panel
    # Panel 2 has no caption: no caption with an empty [IMAGE 3] slot, the group is named instead.
    assert not (tmp_path / "out" / "shirt.txt").exists()
    assert result.partly_captioned == {"shirt": ["c_model.png"]}
    assert "no caption written for shirt: its panel(s) c_model.png have no caption file" in printed
    (src / "shirt" / "c_model.txt").write_text("the person wearing it")
    main(["compose", "--input_dir", str(src), "--output_dir", str(tmp_path / "out"), "--grid", "1x3",
          "--panel_width", "32", "--background", "black", "--overwrite"])
    caption = (tmp_path / "out" / "shirt.txt").read_text().strip()
    assert caption == ("a shirt and the person wearing it; [IMAGE 1] a red shirt, front; [IMAGE 2] the back; "
                       "[IMAGE 3] the person wearing it")
    assert not list((tmp_path / "out").glob(".*tmp"))  # nothing half-written left behind


def test_compose_writes_no_empty_marker_slot(tmp_path, capsys):
    src = tmp_path / "photos"
    for group in ("summary_only", "bare"):
        for name in ("a.png", "b.png"):
            photo(src / group / name, (32, 32), RED)
    (src / "summary_only.txt").write_text("two red squares")
    result = main(["compose", "--input_dir", str(src), "--output_dir", str(tmp_path / "out"), "--grid", "1x2",
                   "--panel_width", "32"])
    assert len(result.written) == 2 and result.uncaptioned == ["bare"] and not result.partly_captioned
    assert (tmp_path / "out" / "summary_only.txt").read_text().strip() == "two red squares"  # no bare markers
    assert not (tmp_path / "out" / "bare.txt").exists()


def test_compose_names_crop_order_and_position_markers(tmp_path):
    src = tmp_path / "photos"
    photo(src / "look1_front.png", (64, 32), RED, "front")
    photo(src / "look1_back.png", (32, 32), GREEN, "back")
    photo(src / "look2_front.png", (32, 32), RED)
    photo(src / "look2_side.png", (32, 32), RED)
    photo(src / "loose.png", (32, 32), RED)
    out = tmp_path / "out"
    argv = ["compose", "--input_dir", str(src), "--output_dir", str(out), "--grid", "2x1", "--panel_width", "32",
            "--panel_height", "16", "--grouping", "names", "--fit", "crop", "--order", "back", "front",
            "--marker_style", "position"]
    result = main(argv)

    assert [p.name for p in result.written] == ["look1.png"]
    assert "no panel back" in result.skipped["look2"] and "unexpected panel side" in result.skipped["look2"]
    assert "GROUP_PANEL" in result.skipped["loose.png"]
    image = Image.open(out / "look1.png")
    assert image.size == (32, 32)
    assert pixel(image, 0, 0) == GREEN and pixel(image, 0, 31) == RED  # --order: back on top
    # Crop fills the panel edge to edge: no background anywhere.
    assert (np.asarray(image) != 255).any(axis=2).all()
    assert (out / "look1.txt").read_text().strip() == "[TOP] back; [BOTTOM] front"

    # A second run leaves existing composites alone unless --overwrite.
    (src / "look1_back.png").unlink()
    photo(src / "look1_back.png", (32, 32), BLUE, "back")
    again = main(argv)
    assert not again.written and "exists" in again.skipped["look1"]
    assert pixel(Image.open(out / "look1.png"), 0, 0) == GREEN
    main([*argv, "--overwrite"])
    assert pixel(Image.open(out / "look1.png"), 0, 0) == BLUE


def test_compose_composites_train(tmp_path, train):
    """What compose writes is a dataset the trainer accepts as it is."""
    src = tmp_path / "photos"
    for group in range(2):
        for panel, colour in enumerate((RED, GREEN, BLUE, YELLOW)):
            photo(src / f"set{group}" / f"{panel}.png", (40 + 8 * panel, 48), colour, f"panel {panel}")
        (src / f"set{group}.txt").write_text(f"set {group}")
    main(["compose", "--input_dir", str(src), "--output_dir", str(tmp_path / "data"), "--panel_width", "32"])
    result = train(tmp_path / "data", "--max_train_steps", "1")
    assert result.global_step == 1


@pytest.mark.parametrize("argv, message", [
    (["compose", "--input_dir", "x", "--output_dir", "y", "--order", "a", "b"], "--order names 2 panels"),
    (["compose", "--input_dir", "x", "--output_dir", "y", "--background", "nocolour"], "--background"),
    (["compose", "--input_dir", "x", "--output_dir", "y", "--grid", "1x4", "--marker_style", "position"], "position"),
    (["compose", "--input_dir", "x", "--output_dir", "y", "--panel_width", "2"], "--panel_width"),
])
def test_compose_bad_flags_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_compose_missing_folder_and_unknown_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="--input_dir"):
        main(["compose", "--input_dir", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="expected a command"):
        main(["combine"])


# ---- caption -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    from iclora.prepare.tiny_vlm import save_tiny_vlm

    folder = tmp_path_factory.mktemp("tiny-vlm")
    save_tiny_vlm(folder)
    return folder


def composites(folder: Path, n: int, size=(96, 32)) -> list[Path]:
    return [photo(folder / f"c{i}.png", size, (40 * i, 100, 200)) for i in range(n)]


def test_caption_writes_no_caption_where_the_model_answers_nothing(tmp_path, tiny_vlm, capsys):
    data = tmp_path / "data"
    composites(data, 2)
    (data / "c1.txt").write_text("my own caption")
    argv = ["caption", "--data_dir", str(data), "--grid", "1x3", "--model_id", str(tiny_vlm), "--max_new_tokens", "8"]
    result = main(argv)

    assert "has a caption" in result.skipped["c1.png"]
    assert (data / "c1.txt").read_text() == "my own caption"  # left alone
    # Random weights answer bytes that decode to nothing readable: no caption of bare markers.
    assert result.written == [] and result.empty == {"c0.png": ["[IMAGE 1]", "[IMAGE 2]", "[IMAGE 3]"]}
    assert not (data / "c0.txt").exists() and not list(data.glob(".*tmp"))
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "c0.png" in line] == [
        "warning: no caption for c0.png: the model answered nothing for [IMAGE 1] [IMAGE 2] [IMAGE 3] "
        "(check the image, or try another --model_id or prompt)"]
    assert "wrote 0 caption(s); skipped 1; 1 left without one" in out


class Answers:
    """Stands in for the VLM: 'answer N' to the N-th question, nothing to those in `silent`."""

    def __init__(self, silent=()):
        self.silent, self.asked = set(silent), 0

    def ask(self, image, question, max_new_tokens):
        self.asked += 1
        return "" if self.asked in self.silent else f"answer {self.asked}"


def test_caption_skips_a_composite_with_an_unanswered_panel_and_keeps_every_marker(tmp_path, capsys):
    from iclora.prepare.caption import CaptionConfig, caption, report

    data = tmp_path / "data"
    composites(data, 3)
    # Questions per composite: the summary, then panels 1-3. c0's panel 2 (question 3) and
    # c1's summary (question 5) get no answer.
    result = caption(CaptionConfig(data_dir=str(data), grid="1x3"), model=Answers(silent={3, 5}))
    report(result)
    assert [p.name for p in result.written] == ["c1.txt", "c2.txt"] and result.empty == {"c0.png": ["[IMAGE 2]"]}
    assert not (data / "c0.txt").exists()
    assert (data / "c1.txt").read_text().strip() == "[IMAGE 1] answer 6.; [IMAGE 2] answer 7.; [IMAGE 3] answer 8."
    for name in ("c1.txt", "c2.txt"):
        assert check_markers((data / name).read_text(), Grid(1, 3)) is None  # every slot filled, in order
    out = capsys.readouterr().out
    assert "warning: no caption for c0.png: the model answered nothing for [IMAGE 2]" in out

    # --overwrite captions them all again, in another marker style.
    caption(CaptionConfig(data_dir=str(data), grid="1x3", marker_style="position", overwrite=True), model=Answers())
    for name in ("c0.txt", "c1.txt", "c2.txt"):
        assert find_markers((data / name).read_text()) == ["[LEFT]", "[CENTER]", "[RIGHT]"]


class Recorder:
    """Stands in for the VLM: records the questions and images it gets."""

    def __init__(self):
        self.asked = []

    def ask(self, image, question, max_new_tokens):
        self.asked.append((image.size, question))
        return f"answer {len(self.asked)}; with [IMAGE 9] a marker"


def test_caption_prompts_are_templates_and_panels_are_crops(tmp_path):
    from iclora.prepare.caption import CaptionConfig, caption

    data = tmp_path / "data"
    composites(data, 1, size=(64, 64))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Summarise these {num_panels} panels ({grid}).\n\nPanel {index} is {marker}: describe it.\n")
    recorder = Recorder()
    caption(CaptionConfig(data_dir=str(data), grid="2x2", marker_style="position", prompt_file=str(prompts)),
            model=recorder)
    assert recorder.asked[0] == ((64, 64), "Summarise these 4 panels (2x2).")
    assert recorder.asked[1:] == [((32, 32), f"Panel {i + 1} is {m}: describe it.")
                                  for i, m in enumerate(panel_markers(Grid(2, 2), "position"))]
    text = (data / "c0.txt").read_text().strip()
    # The model's own markers and separators are removed: the caption's structure is ours.
    assert text.startswith("answer 1, with a marker.; [TOP-LEFT] answer 2, with a marker.")
    assert find_markers(text) == panel_markers(Grid(2, 2), "position")


def test_caption_errors(tmp_path, capsys):
    bad = tmp_path / "p.txt"
    bad.write_text("only one paragraph {nope}")
    for argv, message in [
        (["caption", "--data_dir", str(tmp_path), "--prompt_file", str(bad)], "--prompt_file"),
        (["caption", "--data_dir", str(tmp_path), "--panel_prompt", "{unknown}"], "--panel_prompt: bad template"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err
    with pytest.raises(ValueError, match="no images"):
        main(["caption", "--data_dir", str(tmp_path)])


def test_the_tryon_recipe_config_parses_and_checks(tmp_path, capsys):
    """examples/sdxl_tryon_1x3.yaml on data composed as examples/tryon_1x3.md says."""
    from iclora.training.train_sdxl_ic_lora import main as train

    root = Path(__file__).resolve().parents[1]
    photos = tmp_path / "photos"
    for look in ("look001", "look002"):
        for name, colour in (("1_garment", RED), ("2_person", GREEN), ("3_result", BLUE)):
            photo(photos / look / f"{name}.jpg", (60, 90), colour, f"{name[2:]} of {look}")
        (photos / f"{look}.txt").write_text(f"a try-on set, {look}")
    main(["compose", "--input_dir", str(photos), "--output_dir", str(tmp_path / "tryon"), "--grid", "1x3",
          "--panel_width", "32", "--panel_height", "48", "--marker_style", "image"])
    report = train(["--config", str(root / "examples" / "sdxl_tryon_1x3.yaml"), "--data_dir", str(tmp_path / "tryon"),
                    "--model_id", "tiny-sdxl", "--image_size", "96", "--dry_run"])
    assert report.num_images == 2 and not report.marker_problems and report.with_markers == 2
    assert list(report.buckets) == [(48, 96)] and report.max_train_steps == 3000


def test_compose_turns_phone_photos_upright(tmp_path):
    """A JPEG stored landscape with EXIF orientation 6 ('rotate 90° clockwise') is a portrait."""
    src = tmp_path / "photos" / "set"
    src.mkdir(parents=True)
    stored = Image.new("RGB", (80, 40), RED)
    stored.paste(GREEN, (0, 0, 40, 40))  # left half green: after turning upright, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(src / "a.jpg", exif=exif, quality=100)
    photo(src / "b.png", (40, 80), BLUE)
    main(["compose", "--input_dir", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "out"), "--grid", "1x2",
          "--panel_width", "40", "--panel_height", "80", "--fit", "crop"])
    image = Image.open(tmp_path / "out" / "set.png").convert("RGB")
    top, bottom = np.asarray(image)[10, 20], np.asarray(image)[70, 20]
    assert top[1] > 200 and top[0] < 60 and bottom[0] > 200 and bottom[1] < 60  # green above red
