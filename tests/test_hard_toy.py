"""The harder known-answer toy's data and scoring (benchmarks/hard_toy.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from hard_toy import (  # noqa: E402
    BACKGROUND, COLOUR_HIGH, COLOUR_LOW, MEAN_COLOUR, caption, colour_error, composite, independent_pool,
    object_colour,
)

from conftest import load_benchmark  # noqa: E402
from iclora.panels import Grid, panel_box  # noqa: E402


def test_every_panel_shows_the_same_object_colour_at_its_own_place():
    grid = Grid(1, 3)
    image, rgb, shape = composite(np.random.default_rng(0), grid)
    pixels = np.asarray(image)
    assert pixels.shape == (64, 192, 3)
    assert all(COLOUR_LOW <= c <= COLOUR_HIGH for c in rgb)
    places = []
    for k in range(3):
        left, top, right, bottom = panel_box(k, grid, 192, 64)
        panel = pixels[top:bottom, left:right]
        assert np.array_equal(object_colour(panel), rgb)  # scoring reads the drawn colour exactly
        places.append(np.argwhere((panel != BACKGROUND).any(-1)).mean(0).round().tolist())
    assert len({tuple(p) for p in places}) > 1  # the object moves from panel to panel
    assert colour_error(pixels, grid, [1, 2], rgb) == [0.0, 0.0]
    assert "the object" in caption(grid) and shape not in caption(grid)


def test_a_blank_panel_scores_far_from_the_colour_and_the_pool_is_independent():
    grid = Grid(2, 2)
    image, rgb, _ = composite(np.random.default_rng(1), grid)
    blank = np.asarray(image).copy()
    blank[64:, :] = BACKGROUND
    assert min(colour_error(blank, grid, [2, 3], rgb)) > 20
    pool = independent_pool(4, np.random.default_rng(2), grid)
    assert pool.shape == (4, 3, 128, 128) and pool.min() >= -1 and pool.max() <= 1
    colours = {tuple(object_colour(((pool[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()[t:b, l:r]))
               for l, t, r, b in (panel_box(k, grid, 128, 128) for k in range(4))}
    assert len(colours) == 4  # panels drawn independently
    assert MEAN_COLOUR == ((COLOUR_LOW + COLOUR_HIGH) / 2,) * 3


def test_the_generator_settings():
    import pytest

    from hard_toy import DARK_HIGH, Toy, background_of

    grid = Grid(2, 2)
    aside = Toy(panel_size=128, background="per_composite", scale=(0.2, 0.3))
    rng = np.random.default_rng(0)
    backgrounds = set()
    for _ in range(4):
        image, rgb, _ = composite(rng, grid, aside)
        pixels = np.asarray(image)
        assert pixels.shape == (256, 256, 3)
        background = tuple(int(c) for c in pixels[0, 0])
        assert max(background) <= DARK_HIGH and np.array_equal(background_of(pixels), background)
        backgrounds.add(background)
        assert colour_error(pixels, grid, [2, 3], rgb, background) == [0.0, 0.0]
        for k in range(4):  # every object stays within the size range
            left, top, right, bottom = panel_box(k, grid, 256, 256)
            ys, xs = np.nonzero((pixels[top:bottom, left:right] != background).any(-1))
            assert 0.2 * 128 - 1 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= 0.3 * 128 + 1
    assert len(backgrounds) == 4  # one background per composite
    # The fixed setting draws the same data as before the settings existed.
    default, _, _ = composite(np.random.default_rng(5), grid)
    same, _, _ = composite(np.random.default_rng(5), grid, Toy())
    assert np.array_equal(np.asarray(default), np.asarray(same)) and tuple(np.asarray(same)[0, 0]) == BACKGROUND
    # Vivid colours stay far from grey; the blind guess is their per-channel median.
    vivid = Toy(colours="vivid")
    colours = np.array([vivid.colour(rng) for _ in range(200)])
    assert (colours.max(1) - colours.min(1)).min() >= 0.5 * 0.6 * 255 - 1
    assert all(100 < c < 150 for c in vivid.mean_colour) and Toy().mean_colour == MEAN_COLOUR
    pool = independent_pool(2, rng, Grid(1, 3), aside)
    assert pool.shape == (2, 3, 128, 384)
    for bad in ({"panel_size": 60}, {"background": "white"}, {"scale": (0.5, 0.2)}, {"colours": "grey"}):
        with pytest.raises(ValueError):
            Toy(**bad)


def test_the_benchmark_scores_each_composite_against_its_own_background(tmp_path):
    from known_answer_hard import write_set
    from PIL import Image

    from hard_toy import Toy, background_of

    paths, colours = write_set(tmp_path, 6, Grid(2, 2), 3, Toy(background="per_composite", scale=(0.2, 0.5)))
    assert len({background for _, background in colours}) == 6
    for path, (rgb, background) in zip(paths, colours):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert background != rgb and np.array_equal(background_of(pixels), background)
        assert colour_error(pixels, Grid(2, 2), [2, 3], rgb, background) == [0.0, 0.0]


def test_reference_conditioning_is_refused_outside_flux2(capsys):
    hard = load_benchmark("known_answer_hard")
    assert hard.parse_args(["--backend", "flux2", "--conditioning", "reference"]).conditioning == "reference"
    with pytest.raises(SystemExit):
        hard.parse_args(["--backend", "flux", "--conditioning", "reference"])
    assert "--conditioning reference is FLUX.2's" in capsys.readouterr().err
