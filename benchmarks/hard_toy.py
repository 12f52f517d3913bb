"""The harder known-answer toy: continuous colours, a random place and size per panel.

Each composite shows one object, a shape of SHAPES in one RGB colour drawn uniformly from
[COLOUR_LOW, COLOUR_HIGH]^3, in every panel of the grid; in each panel the object has its
own random size and position. The caption names neither colour, shape, place nor size:

    "A set of N panels showing the same object; [IMAGE 1] the object; [IMAGE 2] the object; ..."

So a hidden panel's *colour* (and shape) follows from the visible panels and from nothing
else, while its place and size are free: the benchmark scores the colour of the object a
model draws, not pixel error. Unlike the first toy there are no palette colours to
memorise: a LoRA can only get the colour right by reading it.

`independent_pool` draws the images the toy bases are pretrained on: panels drawn
independently (any colour, shape, place and size each), so the bases can draw every object
anywhere but have never seen a composite whose panels share one.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from iclora.panels import Grid, panel_box
from iclora.toy import BACKGROUND, SHAPES

COLOUR_LOW, COLOUR_HIGH = 40, 240  # every channel; BACKGROUND is (24, 24, 24)
SCALE_RANGE = (0.35, 0.8)  # object side as a fraction of the panel side
PANEL_SIZE = 64


def draw_object(panel: Image.Image, rgb: tuple[int, int, int], shape: str, side: int, x0: int, y0: int) -> None:
    draw = ImageDraw.Draw(panel)
    x1, y1 = x0 + side - 1, y0 + side - 1
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=rgb)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (xm, y0), (x1, y1)], fill=rgb)
    else:  # diamond
        draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=rgb)


def random_panel(rng: np.random.Generator, rgb: tuple[int, int, int], shape: str, size: int = PANEL_SIZE) -> Image.Image:
    """One panel: the object at a random size and place, wholly inside the panel."""
    side = int(round(rng.uniform(*SCALE_RANGE) * size))
    x0, y0 = (int(rng.integers(0, size - side + 1)) for _ in range(2))
    panel = Image.new("RGB", (size, size), BACKGROUND)
    draw_object(panel, rgb, shape, side, x0, y0)
    return panel


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(COLOUR_LOW, COLOUR_HIGH + 1, size=3))


def caption(grid: Grid) -> str:
    markers = [f"[IMAGE {k + 1}] the object" for k in range(grid.num_panels)]
    return "; ".join([f"A set of {grid.num_panels} panels showing the same object", *markers])


def composite(rng: np.random.Generator, grid: Grid, size: int = PANEL_SIZE) -> tuple[Image.Image, tuple[int, int, int], str]:
    """(image, object colour, shape): the same object in every panel, placed anew in each."""
    rgb, shape = random_colour(rng), SHAPES[int(rng.integers(len(SHAPES)))]
    image = Image.new("RGB", (grid.cols * size, grid.rows * size), BACKGROUND)
    for k in range(grid.num_panels):
        row, col = divmod(k, grid.cols)
        image.paste(random_panel(rng, rgb, shape, size), (col * size, row * size))
    return image, rgb, shape


def independent_pool(n: int, rng: np.random.Generator, grid: Grid, size: int = PANEL_SIZE) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1]: composites whose panels are drawn independently."""
    out = []
    for _ in range(n):
        image = Image.new("RGB", (grid.cols * size, grid.rows * size), BACKGROUND)
        for k in range(grid.num_panels):
            row, col = divmod(k, grid.cols)
            panel = random_panel(rng, random_colour(rng), SHAPES[int(rng.integers(len(SHAPES)))], size)
            image.paste(panel, (col * size, row * size))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)


def object_colour(panel: np.ndarray) -> np.ndarray:
    """The colour a model drew: the median of the pixels more than half as far from the
    background as the farthest one (robust to the VAE's blurred and ringing edges: the VAE
    round trip of the truth scores ~8 with it, ~15 with the farthest 3 % of pixels)."""
    pixels = panel.reshape(-1, 3).astype(np.float64)
    distance = np.abs(pixels - np.array(BACKGROUND, dtype=np.float64)).max(1)
    return np.median(pixels[distance >= 0.5 * distance.max()], axis=0)


def colour_error(image: np.ndarray, grid: Grid, hidden: list[int], rgb: tuple[int, int, int]) -> list[float]:
    """Mean absolute RGB error (0-255) of the object colour in each hidden panel."""
    height, width = image.shape[:2]
    errors = []
    for k in hidden:
        left, top, right, bottom = panel_box(k, grid, width, height)
        errors.append(float(np.abs(object_colour(image[top:bottom, left:right]) - np.array(rgb)).mean()))
    return errors


def set_spread(image: np.ndarray, grid: Grid) -> tuple[float, float]:
    """How much a generated set agrees with itself: (the mean absolute RGB distance of each
    panel's object colour from the panels' median colour, the share of panels with an
    object at all: a pixel more than OBJECT_CONTRAST from the background). A toy set scores
    about its VAE round trip; panels drawn independently score far more."""
    height, width = image.shape[:2]
    colours, present = [], []
    for k in range(grid.num_panels):
        left, top, right, bottom = panel_box(k, grid, width, height)
        panel = image[top:bottom, left:right]
        colours.append(object_colour(panel))
        present.append(np.abs(panel.reshape(-1, 3).astype(np.float64) - np.array(BACKGROUND)).max() > OBJECT_CONTRAST)
    colours = np.array(colours)
    return float(np.abs(colours - np.median(colours, axis=0)).mean()), float(np.mean(present))


OBJECT_CONTRAST = 40  # an empty panel's VAE noise stays under it; only near-black objects (~0.2 %) do too
MEAN_COLOUR = ((COLOUR_LOW + COLOUR_HIGH) / 2,) * 3  # the best blind guess of the colour
