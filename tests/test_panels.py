"""Panel geometry, masks and the training-time panel sampler (iclora.panels)."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from iclora.panels import (
    Grid,
    composite_size,
    expected_masked_fraction,
    feather,
    fit_to_grid,
    inpaint_mask,
    latent_mask,
    panel_box,
    panel_mask,
    panel_masks,
    parse_panels,
    sample_masked_panels,
    split_panels,
)

G2x2, G1x3 = Grid(2, 2), Grid(1, 3)


# ---- grids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, rows, cols", [("2x2", 2, 2), ("1x3", 1, 3), (" 2 X 1 ", 2, 1), ("3×3", 3, 3)])
def test_grid_parse(text, rows, cols):
    grid = Grid.parse(text)
    assert (grid.rows, grid.cols, grid.num_panels) == (rows, cols, rows * cols)
    assert str(grid) == f"{rows}x{cols}"
    assert Grid.parse(grid) is grid


@pytest.mark.parametrize("text, message", [("3", "ROWSxCOLS"), ("2by2", "ROWSxCOLS"), ("1x1", "at least 2 panels"),
                                           ("0x2", "at least 2 panels")])
def test_grid_parse_errors_name_the_flag(text, message):
    with pytest.raises(ValueError, match=message) as info:
        Grid.parse(text)
    assert str(info.value).startswith("--grid")


# ---- boxes ---------------------------------------------------------------------------------


def test_panel_box_is_row_major_2x2():
    assert [panel_box(i, G2x2, 64, 48) for i in range(4)] == [
        (0, 0, 32, 24), (32, 0, 64, 24),
        (0, 24, 32, 48), (32, 24, 64, 48),
    ]


def test_panel_box_is_row_major_1x3_and_2x1():
    assert [panel_box(i, G1x3, 96, 32) for i in range(3)] == [(0, 0, 32, 32), (32, 0, 64, 32), (64, 0, 96, 32)]
    assert [panel_box(i, Grid(2, 1), 32, 64) for i in range(2)] == [(0, 0, 32, 32), (0, 32, 32, 64)]


@pytest.mark.parametrize("index", [-1, 4, 10])
def test_panel_box_rejects_out_of_range(index):
    with pytest.raises(ValueError, match="outside the 2x2 grid"):
        panel_box(index, G2x2, 64, 64)


@pytest.mark.parametrize("grid", [G2x2, G1x3, Grid(2, 1), Grid(3, 3), Grid(2, 3)])
@pytest.mark.parametrize("width, height", [(64, 64), (100, 37), (7, 11)])
def test_boxes_tile_the_image(grid, width, height):
    """Every pixel belongs to exactly one panel, whatever the rounding."""
    coverage = np.zeros((height, width), dtype=int)
    for i in range(grid.num_panels):
        left, top, right, bottom = panel_box(i, grid, width, height)
        assert right > left and bottom > top
        coverage[top:bottom, left:right] += 1
    assert (coverage == 1).all()


def test_split_panels_crops_each_panel():
    array = np.zeros((32, 96, 3), dtype=np.uint8)
    for k in range(3):
        array[:, 32 * k : 32 * (k + 1)] = 80 * k
    panels = split_panels(Image.fromarray(array), G1x3)
    assert [p.size for p in panels] == [(32, 32)] * 3
    assert [np.unique(np.asarray(p)).tolist() for p in panels] == [[0], [80], [160]]


# ---- composite sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("width, height, image_size, grid, quantum", [
    (2048, 2048, 1024, G2x2, 8),
    (1536, 1024, 1024, G2x2, 8),
    (1024, 1536, 1024, G2x2, 8),
    (1000, 600, 1024, G1x3, 16),
    (640, 1280, 512, Grid(2, 1), 16),
    (128, 192, 128, G2x2, 8),
    (333, 97, 768, G1x3, 8),
])
def test_composite_size_keeps_aspect_and_puts_boundaries_on_the_quantum(width, height, image_size, grid, quantum):
    out_w, out_h = composite_size(width, height, image_size, grid, quantum)
    step_w, step_h = grid.cols * quantum, grid.rows * quantum
    assert out_w % step_w == 0 and out_h % step_h == 0
    for i in range(grid.num_panels):  # every panel boundary on a multiple of the quantum
        assert all(v % quantum == 0 for v in panel_box(i, grid, out_w, out_h))
    # The longer side is image_size and the aspect ratio is kept, each up to one rounding step.
    if width >= height:
        assert abs(out_w - image_size) <= step_w / 2
        assert abs(out_h - out_w * height / width) <= step_h / 2 + 1
    else:
        assert abs(out_h - image_size) <= step_h / 2
        assert abs(out_w - out_h * width / height) <= step_w / 2 + 1


def test_composite_size_exact_cases():
    assert composite_size(2048, 2048, 1024, G2x2, 8) == (1024, 1024)
    assert composite_size(64, 64, 64, G2x2, 8) == (64, 64)
    assert composite_size(1536, 1024, 1024, G2x2, 8) == (1024, 688)  # 682.7 -> nearest multiple of 16
    assert composite_size(96, 32, 96, G1x3, 8) == (96, 32)


def test_fit_to_grid_never_returns_zero():
    assert fit_to_grid(3, 1, G2x2, 8) == (16, 16)


# ---- masks ----------------------------------------------------------------------------------


def test_panel_mask_marks_listed_panels():
    mask = panel_mask([1, 2], G2x2, 64, 64)
    assert mask.shape == (1, 64, 64)
    assert mask[0, :32, 32:].eq(1).all() and mask[0, 32:, :32].eq(1).all()
    assert mask[0, :32, :32].eq(0).all() and mask[0, 32:, 32:].eq(0).all()
    assert panel_mask([], G2x2, 8, 8).eq(0).all()


def test_feather_ramps_inside_the_band_and_is_exact_outside():
    hard = panel_mask([3], G2x2, 64, 64)  # bottom-right panel: edges at x = 32 and y = 32
    soft = feather(hard, 8)  # a ramp 8 px wide centred on the edges: pixels 28..35
    assert soft.shape == hard.shape
    row = soft[0, 50]  # a row of the masked half, away from the horizontal edge
    assert row[:28].eq(0).all()
    assert row[36:].eq(1).all()
    band = row[28:36]
    assert ((band > 0) & (band < 1)).all()
    assert (band.diff() > 0).all()  # rises monotonically across the edge
    column = soft[0, :, 50]
    assert column[:28].eq(0).all() and column[36:].eq(1).all()
    assert ((column[28:36] > 0) & (column[28:36] < 1)).all()
    # Far from every edge the mask is untouched, in the top-left panel too.
    assert soft[0, :28, :28].eq(0).all() and soft[0, 36:, 36:].eq(1).all()
    # Image borders are not edges: the masked panel stays fully masked up to the border.
    assert soft[0, 63, 36:].eq(1).all() and soft[0, 36:, 63].eq(1).all()


def test_feather_keeps_batch_shapes_and_zero_width_is_a_copy():
    hard = torch.stack([panel_mask([0], G2x2, 32, 32), panel_mask([2, 3], G2x2, 32, 32)])  # (2, 1, H, W)
    assert feather(hard, 6).shape == (2, 1, 32, 32)
    same = feather(hard, 0)
    assert torch.equal(same, hard) and same is not hard
    assert torch.equal(inpaint_mask([0], G2x2, 32, 32), panel_mask([0], G2x2, 32, 32))
    assert torch.equal(inpaint_mask([0], G2x2, 32, 32, gradient_width=6), feather(panel_mask([0], G2x2, 32, 32), 6))


@pytest.mark.parametrize("grid", [G2x2, G1x3, Grid(3, 1), Grid(2, 3)])
@pytest.mark.parametrize("height, width", [(64, 64), (10, 17), (7, 5), (96, 144)])
def test_panel_masks_stack_the_panel_mask_of_each_subset(grid, height, width):
    subsets = [(), (0,), (1, grid.num_panels - 1), tuple(range(grid.num_panels))]
    expected = torch.stack([panel_mask(list(s), grid, height, width) for s in subsets])  # (B, 1, H, W)
    assert torch.equal(panel_masks(subsets, grid, height, width), expected)


@pytest.mark.parametrize("grid, height, width", [(G2x2, 128, 128), (G1x3, 64, 192), (Grid(2, 3), 48, 144)])
def test_panel_masks_at_latent_size_are_the_pixel_masks_area_averages(grid, height, width):
    """What training builds directly at latent size: exact, as panel boundaries fall on latent pixels."""
    subsets = [(0,), (1, 2), tuple(range(grid.num_panels))]
    pixel = panel_masks(subsets, grid, height, width)
    assert torch.equal(panel_masks(subsets, grid, height // 8, width // 8), latent_mask(pixel, 8))


@pytest.mark.parametrize("grid, height, width, indices", [
    (G2x2, 64, 64, [3]), (G2x2, 128, 192, [0, 3]), (G1x3, 32, 96, [1]), (Grid(2, 1), 96, 48, [0]),
])
def test_latent_mask_is_exact_for_aligned_masks(grid, height, width, indices):
    pixel = panel_mask(indices, grid, height, width)
    latent = latent_mask(pixel, 8)
    assert latent.shape == (1, height // 8, width // 8)
    assert torch.equal(latent, panel_mask(indices, grid, height // 8, width // 8))
    batched = latent_mask(torch.stack([pixel, 1 - pixel]), 8)  # (B, 1, H, W) -> (B, 1, h, w)
    assert batched.shape == (2, 1, height // 8, width // 8)
    assert torch.equal(batched[1], 1 - latent)


def test_latent_mask_averages_soft_masks():
    soft = feather(panel_mask([3], G2x2, 64, 64), 8)
    latent = latent_mask(soft, 8)
    assert torch.allclose(latent.mean(), soft.mean())
    assert ((latent > 0) & (latent < 1)).any()


# ---- parse_panels ------------------------------------------------------------------------------


def test_parse_panels_accepts_indices_and_all():
    assert parse_panels(["2", "3"], G2x2) == [2, 3]
    assert parse_panels(["3", "0"], G2x2) == [0, 3]
    assert parse_panels("1", G2x2) == [1]
    assert parse_panels([2], G1x3) == [2]
    assert parse_panels(["all"], G2x2) == [0, 1, 2, 3]
    assert parse_panels("ALL", G1x3) == [0, 1, 2]


@pytest.mark.parametrize("values, message", [
    (["4"], "panel 4 is outside the 2x2 grid"),
    (["-1"], "panel -1 is outside"),
    (["1", "1"], "duplicate"),
    (["all", "1"], "expected panel indices or 'all'"),
    (["two"], "expected panel indices or 'all'"),
    ([], "no panel given"),
])
def test_parse_panels_errors(values, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_panels(values, G2x2, flag="--panels_to_inpaint")
    assert str(info.value).startswith("--panels_to_inpaint")


# ---- the training-time sampler ---------------------------------------------------------------


def _draws(num_panels, p, most, n=20_000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [sample_masked_panels(num_panels, p, most, generator) for _ in range(n)]


def _tolerance(p, n):
    return 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma of a binomial proportion


def test_sampler_statistics_2x2():
    n, p = 20_000, 0.7
    draws = _draws(4, p, 2, n)
    assert all(d == sorted(set(d)) and all(0 <= i < 4 for i in d) for d in draws)
    empty = sum(not d for d in draws) / n
    assert abs(empty - (1 - p)) < _tolerance(1 - p, n)
    masked = [d for d in draws if d]
    counts = Counter(len(d) for d in masked)
    assert set(counts) == {1, 2}  # uniform over 1..max_masked_panels
    assert abs(counts[1] / len(masked) - 0.5) < _tolerance(0.5, len(masked))
    per_panel = Counter(i for d in masked for i in d)
    total = sum(per_panel.values())
    for panel in range(4):  # each panel equally likely
        assert abs(per_panel[panel] / total - 0.25) < _tolerance(0.25, total)
    # the mean share masked matches the closed form used in logs
    share = sum(len(d) for d in draws) / (4 * n)
    assert abs(share - expected_masked_fraction(4, p, 2)) < 0.01


def test_sampler_caps_at_all_but_one_panel():
    n = 12_000
    draws = _draws(4, 1.0, 10, n)  # max larger than panels - 1: capped at 3
    counts = Counter(len(d) for d in draws)
    assert set(counts) == {1, 2, 3}
    for k in (1, 2, 3):
        assert abs(counts[k] / n - 1 / 3) < _tolerance(1 / 3, n)
    assert expected_masked_fraction(4, 1.0, 10) == pytest.approx(0.5)
    # a two-panel grid masks exactly one panel, each half the time
    pairs = _draws(2, 1.0, 5, 4000)
    assert all(len(d) == 1 for d in pairs)
    assert abs(sum(d == [0] for d in pairs) / 4000 - 0.5) < _tolerance(0.5, 4000)


def test_sampler_extremes_and_determinism():
    assert all(d == [] for d in _draws(4, 0.0, 2, 500))
    assert all(d for d in _draws(4, 1.0, 2, 500))
    assert all(len(d) == 1 for d in _draws(3, 1.0, 1, 500))
    assert _draws(4, 0.7, 2, 200, seed=5) == _draws(4, 0.7, 2, 200, seed=5)
    assert _draws(4, 0.7, 2, 200, seed=5) != _draws(4, 0.7, 2, 200, seed=6)
