"""The harder known-answer toy's data and scoring (benchmarks/hard_toy.py)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from hard_toy import (  # noqa: E402
    BACKGROUND, COLOUR_HIGH, COLOUR_LOW, MEAN_COLOUR, caption, colour_error, composite, independent_pool,
    object_colour,
)

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
