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

import colorsys
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image, ImageDraw

from iclora.panels import Grid, panel_box
from iclora.toy import BACKGROUND, SHAPES

COLOUR_LOW, COLOUR_HIGH = 40, 240  # every channel; BACKGROUND is (24, 24, 24)
SCALE_RANGE = (0.35, 0.8)  # object side as a fraction of the panel side
PANEL_SIZE = 64
DARK_HIGH = 32  # a per-composite background draws every channel from [0, DARK_HIGH]
BACKGROUNDS = ("fixed", "per_composite")
COLOUR_MODES = ("uniform", "vivid")


@dataclass(frozen=True)
class Toy:
    """The generator's settings. The defaults are the toy every figure before the
    distribution was measured on; the other settings make data that differ the way users'
    data differ from it.

    - panel_size: 64 (8x8 latents per panel through the toy VAE) or 128 (16x16).
    - background: "fixed" (BACKGROUND everywhere) or "per_composite" (one dark colour per
      composite, each channel in [0, DARK_HIGH]: the model cannot take it for granted).
    - scale: the object side's range, as a fraction of the panel side.
    - colours: "uniform" (each channel uniform in [COLOUR_LOW, COLOUR_HIGH]) or "vivid"
      (uniform hue, saturation 0.5-1, value 0.6-0.95: far from grey, unlike uniform RGB,
      whose colours crowd around the mean)."""

    panel_size: int = PANEL_SIZE
    background: str = "fixed"
    scale: tuple[float, float] = SCALE_RANGE
    colours: str = "uniform"

    def __post_init__(self):
        if self.panel_size < 16 or self.panel_size % 8:
            raise ValueError(f"panel size must be a multiple of 8, at least 16, got {self.panel_size}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.colours not in COLOUR_MODES:
            raise ValueError(f"colours must be one of {COLOUR_MODES}, got {self.colours!r}")
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"object scale must satisfy 0 < low <= high <= 1, got {self.scale}")

    def background_colour(self, rng: np.random.Generator) -> tuple[int, int, int]:
        if self.background == "fixed":  # draws nothing: the fixed toy's data stay as they were
            return BACKGROUND
        return tuple(int(c) for c in rng.integers(0, DARK_HIGH + 1, size=3))

    def colour(self, rng: np.random.Generator) -> tuple[int, int, int]:
        if self.colours == "uniform":
            return tuple(int(c) for c in rng.integers(COLOUR_LOW, COLOUR_HIGH + 1, size=3))
        hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.5, 1), rng.uniform(0.6, 0.95)
        return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))

    @cached_property
    def mean_colour(self) -> tuple[float, float, float]:
        """The best blind guess under the colour score (mean absolute error): the per-channel
        median of the distribution (exact for uniform, from 20000 draws for vivid)."""
        if self.colours == "uniform":
            return MEAN_COLOUR
        rng = np.random.default_rng(12345)
        return tuple(float(c) for c in np.median([self.colour(rng) for _ in range(20000)], axis=0))

    def describe(self) -> str:
        return (f"{self.panel_size} px panels, {self.background.replace('_', '-')} background, "
                f"objects {self.scale[0]:g}-{self.scale[1]:g} of the side, {self.colours} colours")


def toy_arguments(parser) -> None:
    """The generator's settings as command-line flags (`toy_from_args` reads them back)."""
    group = parser.add_argument_group("toy generator")
    group.add_argument("--panel_size", type=int, default=PANEL_SIZE, help="panel side in px (64 or 128)")
    group.add_argument("--background", choices=BACKGROUNDS, default="fixed")
    group.add_argument("--object_scale", default=f"{SCALE_RANGE[0]},{SCALE_RANGE[1]}",
                       help="LOW,HIGH: the object side as a fraction of the panel side")
    group.add_argument("--colours", choices=COLOUR_MODES, default="uniform")


def toy_from_args(parser, args) -> Toy:
    try:
        low, high = (float(x) for x in args.object_scale.split(","))
        return Toy(args.panel_size, args.background, (low, high), args.colours)
    except ValueError as error:
        parser.error(f"toy generator: {error}")


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


def random_panel(rng: np.random.Generator, rgb: tuple[int, int, int], shape: str, toy: Toy = Toy(),
                 background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """One panel: the object at a random size and place, wholly inside the panel."""
    size = toy.panel_size
    side = max(2, int(round(rng.uniform(*toy.scale) * size)))
    x0, y0 = (int(rng.integers(0, size - side + 1)) for _ in range(2))
    panel = Image.new("RGB", (size, size), background)
    draw_object(panel, rgb, shape, side, x0, y0)
    return panel


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(COLOUR_LOW, COLOUR_HIGH + 1, size=3))


def caption(grid: Grid) -> str:
    markers = [f"[IMAGE {k + 1}] the object" for k in range(grid.num_panels)]
    return "; ".join([f"A set of {grid.num_panels} panels showing the same object", *markers])


def composite(rng: np.random.Generator, grid: Grid, toy: Toy = Toy()) -> tuple[Image.Image, tuple[int, int, int], str]:
    """(image, object colour, shape): the same object in every panel, placed anew in each.
    The composite's background is `background_of(image)`."""
    rgb, shape = toy.colour(rng), SHAPES[int(rng.integers(len(SHAPES)))]
    background, size = toy.background_colour(rng), toy.panel_size
    image = Image.new("RGB", (grid.cols * size, grid.rows * size), background)
    for k in range(grid.num_panels):
        row, col = divmod(k, grid.cols)
        image.paste(random_panel(rng, rgb, shape, toy, background), (col * size, row * size))
    return image, rgb, shape


def independent_pool(n: int, rng: np.random.Generator, grid: Grid, toy: Toy = Toy()) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1]: composites whose panels are drawn independently (each
    composite its own background, as the toy's composites)."""
    out, size = [], toy.panel_size
    for _ in range(n):
        background = toy.background_colour(rng)
        image = Image.new("RGB", (grid.cols * size, grid.rows * size), background)
        for k in range(grid.num_panels):
            row, col = divmod(k, grid.cols)
            panel = random_panel(rng, toy.colour(rng), SHAPES[int(rng.integers(len(SHAPES)))], toy, background)
            image.paste(panel, (col * size, row * size))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)


def background_of(image: np.ndarray) -> np.ndarray:
    """A composite's background colour: the median of its outer one-pixel ring, which the
    objects (at most 80 % of a panel side) never fill."""
    ring = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float64)
    return np.median(ring, axis=0)


def object_colour(panel: np.ndarray, background=BACKGROUND) -> np.ndarray:
    """The colour a model drew: the median of the pixels more than half as far from the
    background as the farthest one (robust to the VAE's blurred and ringing edges: the VAE
    round trip of the truth scores ~8 with it, ~15 with the farthest 3 % of pixels)."""
    pixels = panel.reshape(-1, 3).astype(np.float64)
    distance = np.abs(pixels - np.array(background, dtype=np.float64)).max(1)
    return np.median(pixels[distance >= 0.5 * distance.max()], axis=0)


def colour_error(image: np.ndarray, grid: Grid, hidden: list[int], rgb: tuple[int, int, int],
                 background=BACKGROUND) -> list[float]:
    """Mean absolute RGB error (0-255) of the object colour in each hidden panel (`background`:
    the true composite's)."""
    height, width = image.shape[:2]
    errors = []
    for k in hidden:
        left, top, right, bottom = panel_box(k, grid, width, height)
        errors.append(float(np.abs(object_colour(image[top:bottom, left:right], background) - np.array(rgb)).mean()))
    return errors


def set_spread(image: np.ndarray, grid: Grid, background=BACKGROUND) -> tuple[float, float]:
    """How much a generated set agrees with itself: (the mean absolute RGB distance of each
    panel's object colour from the panels' median colour, the share of panels with an
    object at all: a pixel more than OBJECT_CONTRAST from the background). A toy set scores
    about its VAE round trip; panels drawn independently score far more. `background`: the
    toy's fixed one, or None to read it off the image (`background_of`)."""
    background = background_of(image) if background is None else np.array(background, dtype=np.float64)
    height, width = image.shape[:2]
    colours, present = [], []
    for k in range(grid.num_panels):
        left, top, right, bottom = panel_box(k, grid, width, height)
        panel = image[top:bottom, left:right]
        colours.append(object_colour(panel, background))
        present.append(np.abs(panel.reshape(-1, 3).astype(np.float64) - background).max() > OBJECT_CONTRAST)
    colours = np.array(colours)
    return float(np.abs(colours - np.median(colours, axis=0)).mean()), float(np.mean(present))


OBJECT_CONTRAST = 40  # an empty panel's VAE noise stays under it; only near-black objects (~0.2 %) do too
MEAN_COLOUR = ((COLOUR_LOW + COLOUR_HIGH) / 2,) * 3  # the best blind guess of the colour
