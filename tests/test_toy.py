"""The toy in-context task: deterministic, hidden panels fixed by the visible ones, no leaks."""

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from iclora.toy import PALETTE, SHAPES, main, make_dataset, make_sample, render_panel


def _panel(image: Image.Image, k: int, panel_size: int, cols: int) -> np.ndarray:
    row, col = divmod(k, cols)
    box = (col * panel_size, row * panel_size, (col + 1) * panel_size, (row + 1) * panel_size)
    return np.asarray(image.crop(box))


def _samples(n: int, seed: int = 0, panel_size: int = 32, grid=(2, 2)):
    rng = np.random.default_rng(seed)
    return [make_sample(rng, panel_size=panel_size, grid=grid) for _ in range(n)]


def test_same_seed_gives_identical_bytes(tmp_path):
    a = make_dataset(tmp_path / "a", n=4, seed=3, panel_size=32)
    b = make_dataset(tmp_path / "b", n=4, seed=3, panel_size=32)
    assert [p.name for p in a] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.with_suffix(".txt").read_bytes() == pb.with_suffix(".txt").read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp")), "temporary files left behind"


def test_different_seeds_differ(tmp_path):
    a = make_dataset(tmp_path / "a", n=8, seed=0, panel_size=32)
    b = make_dataset(tmp_path / "b", n=8, seed=1, panel_size=32)
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in b]


def test_hidden_panels_are_determined_by_colour_and_shape():
    samples = _samples(64)
    by_object = {}
    for s in samples:
        by_object.setdefault((s.colour, s.shape), []).append(s)
    repeated = [group for group in by_object.values() if len(group) >= 2]
    assert repeated, "64 draws from 32 objects should repeat one"
    for group in repeated:
        for k in (2, 3):
            first = _panel(group[0].image, k, 32, cols=2)
            for other in group[1:]:
                np.testing.assert_array_equal(_panel(other.image, k, 32, cols=2), first)


def test_hidden_panels_differ_when_colour_or_shape_differs():
    for k in (2, 3):
        base = np.asarray(render_panel(PALETTE["red"], "square", k, 32, (2, 2)))
        other_colour = np.asarray(render_panel(PALETTE["green"], "square", k, 32, (2, 2)))
        other_shape = np.asarray(render_panel(PALETTE["red"], "circle", k, 32, (2, 2)))
        assert not np.array_equal(base, other_colour)
        assert not np.array_equal(base, other_shape)
    # and in generated samples: different colours never share a hidden panel
    samples = _samples(32)
    for a in samples:
        for b in samples:
            if a.colour != b.colour:
                for k in (2, 3):
                    assert not np.array_equal(_panel(a.image, k, 32, 2), _panel(b.image, k, 32, 2))


def test_panels_are_flat_colours_and_objects_stay_inside():
    for shape in SHAPES:
        for k in range(9):
            panel = np.asarray(render_panel(PALETTE["white"], shape, k, 32, (3, 3)))
            colours = {tuple(c) for c in panel.reshape(-1, 3)}  # (H*W, 3)
            assert colours == {(24, 24, 24), PALETTE["white"]}, (shape, k)
            border = np.concatenate([panel[0], panel[-1], panel[:, 0], panel[:, -1]])
            assert (border == 24).all(), f"{shape} in panel {k} touches the panel edge"


def test_captions_have_markers_and_no_colour_or_shape():
    forbidden = [*PALETTE, *SHAPES]
    cases = {
        (2, 2): ["[TOP-LEFT]", "[TOP-RIGHT]", "[BOTTOM-LEFT]", "[BOTTOM-RIGHT]"],
        (1, 3): ["[IMAGE 1]", "[IMAGE 2]", "[IMAGE 3]"],
        (2, 1): ["[IMAGE 1]", "[IMAGE 2]"],
    }
    for grid, markers in cases.items():
        for s in _samples(8, grid=grid):
            positions = [s.caption.index(m) for m in markers]
            assert positions == sorted(positions), s.caption
            if grid == (2, 2):
                assert "[IMAGE" not in s.caption
            for word in forbidden:
                # word boundaries: "centered" contains "red" but names no colour
                assert not re.search(rf"\b{word}\b", s.caption, re.IGNORECASE), (word, s.caption)


@pytest.mark.parametrize("grid", [(2, 2), (1, 3), (2, 1), (1, 2)])
def test_composite_size_is_grid_times_panel(grid):
    rows, cols = grid
    sample = _samples(1, panel_size=48, grid=grid)[0]
    assert sample.image.size == (cols * 48, rows * 48)
    assert sample.image.mode == "RGB"
    for k in range(rows * cols):  # panels tile the composite with no gaps
        expected = render_panel(PALETTE[sample.colour], sample.shape, k, 48, grid)
        np.testing.assert_array_equal(_panel(sample.image, k, 48, cols), np.asarray(expected))


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="one panel"):
        make_sample(rng, grid=(1, 1))
    with pytest.raises(ValueError, match="at most"):
        make_sample(rng, grid=(4, 4))
    with pytest.raises(ValueError, match="panel_size"):
        make_sample(rng, panel_size=4)
    with pytest.raises(ValueError, match="shape"):
        render_panel(PALETTE["red"], "star", 0, 32, (2, 2))


def test_cli_writes_files(tmp_path):
    paths = main(["--out", str(tmp_path / "a"), "--n", "3", "--panel_size", "32", "--grid", "1x3"])
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(paths[0]).size == (96, 32)
    assert "[IMAGE 3]" in paths[0].with_suffix(".txt").read_text()

    out = tmp_path / "b"
    subprocess.run(
        [sys.executable, "-m", "iclora.toy", "--out", str(out), "--n", "2", "--seed", "0",
         "--panel_size", "32", "--grid", "2x2"],
        check=True,
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000.png", "00000.txt", "00001.png", "00001.txt"]
    assert Image.open(out / "00000.png").size == (64, 64)

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "c"), "--grid", "2by2"])


def test_one_per_colour(tmp_path):
    paths = main(["--out", str(tmp_path), "--n", "3", "--one_per_colour", "--panel_size", "32"])
    colours = list(PALETTE)[:3]
    for path, colour in zip(paths, colours):
        pixels = np.asarray(Image.open(path)).reshape(-1, 3)
        assert (pixels == PALETTE[colour]).all(-1).any(), colour  # the object is drawn in colour i


def test_base_model_folder_loads_and_draws(tmp_path):
    """`--base_model DIR`: the fitted toy SDXL as a diffusers folder (what scripts/demo.sh trains)."""
    import json

    import torch

    from iclora.backends.sdxl import SDXLBackend

    assert main(["--base_model", str(tmp_path / "base")]) == []
    scheduler = json.loads((tmp_path / "base" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    backend = SDXLBackend.from_pretrained(str(tmp_path / "base"), conditioning="concat")
    # the fitted VAE round-trips a toy composite (a random one decodes to near-grey)
    image = np.asarray(Image.open(make_dataset(tmp_path / "d", 1, panel_size=64)[0]), dtype=np.float32)
    x = torch.from_numpy(image / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, 128, 128)
    with torch.no_grad():
        y = backend.vae.decode(backend.vae.encode(x).latent_dist.mode()).sample
    assert float(((y.clamp(-1, 1) + 1) * 127.5 - torch.from_numpy(image).permute(2, 0, 1)).abs().mean()) < 10
    with pytest.raises(SystemExit):
        main([])  # neither --out nor --base_model
