"""A toy in-context task on grid composites, for smoke-testing training and inference.

Each composite shows one object (a colour from PALETTE, a shape from SHAPES) on a flat dark
background, drawn in every panel at that panel's fixed position and size (PANEL_LAYOUTS).
So any one visible panel determines every hidden panel exactly, and a hidden panel cannot be
guessed without the visible ones: the caption describes positions and sizes only, never the
colour or the shape.

    python -m iclora.toy --out data/sample --n 16 --seed 0 --panel_size 64 --grid 2x2
    python -m iclora.toy --base_model output/toy_base      # a toy SDXL base that can draw

The first writes 00000.png + 00000.txt (the caption), 00001.png + ... Same seed, same bytes.
The second writes a diffusers SDXL folder (make_base_model) to train and sample on: the
tiny SDXL of iclora.backends.tiny with a VAE and UNet fitted to this toy domain (shipped in
benchmarks/assets; benchmarks/fit_toy_vae.py and fit_toy_base.py made them). An IC-LoRA
on the random tiny SDXL never learns to draw; on this base it learns the panels' relation.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Saturated and far apart, so a model (or a test) can't confuse one colour for another.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 200, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 20),
    "magenta": (220, 20, 220),
    "cyan": (20, 210, 220),
    "orange": (250, 130, 0),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond")
# One fixed background: a random one would be a second hidden variable, and the hidden panels
# should depend on (colour, shape) alone.
BACKGROUND: tuple[int, int, int] = (24, 24, 24)

# The fitted toy base (benchmarks/README.md): a VAE that round-trips toy images and an SDXL
# UNet pretrained to draw any object in any panel, never a composite.
ASSETS = Path(__file__).resolve().parents[1] / "benchmarks" / "assets"
TOY_VAE = ASSETS / "toy_vae"
TOY_UNET = ASSETS / "toy_sdxl_unet"
# With epsilon prediction the sampler scales the noise estimate's error by sigma (up to ~15
# for SDXL's schedule); a UNet fitted for minutes needs v-prediction's milder target.
TOY_PREDICTION_TYPE = "v_prediction"


@dataclass(frozen=True)
class PanelLayout:
    scale: float  # object side, as a fraction of the panel side
    cx: float  # object centre, as fractions of the panel width / height
    cy: float
    description: str  # what the caption says about this panel


# Panel k of any grid (row-major) uses PANEL_LAYOUTS[k]; every object stays inside its panel.
PANEL_LAYOUTS: tuple[PanelLayout, ...] = (
    PanelLayout(0.75, 0.50, 0.50, "large, centered"),
    PanelLayout(0.35, 0.25, 0.25, "small, in the top-left corner"),
    PanelLayout(0.50, 0.67, 0.67, "medium, toward the bottom-right"),
    PanelLayout(0.35, 0.75, 0.25, "small, in the top-right corner"),
    PanelLayout(0.35, 0.25, 0.75, "small, in the bottom-left corner"),
    PanelLayout(0.50, 0.33, 0.33, "medium, toward the top-left"),
    PanelLayout(0.35, 0.50, 0.50, "small, centered"),
    PanelLayout(0.35, 0.75, 0.75, "small, in the bottom-right corner"),
    PanelLayout(0.50, 0.33, 0.67, "medium, toward the bottom-left"),
)
MIN_PANEL_SIZE = 16  # below this the small shapes are a few pixels and hard to tell apart

_COUNT_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")
_MARKERS_2X2 = ("[TOP-LEFT]", "[TOP-RIGHT]", "[BOTTOM-LEFT]", "[BOTTOM-RIGHT]")


@dataclass
class ToySample:
    image: Image.Image  # RGB, (rows * panel_size) high, (cols * panel_size) wide
    caption: str
    colour: str  # key of PALETTE; deliberately absent from the caption
    shape: str  # one of SHAPES; deliberately absent from the caption


def check_grid(grid: tuple[int, int]) -> int:
    """Validate a (rows, cols) grid and return its number of panels."""
    rows, cols = grid
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must have rows, cols >= 1, got {rows}x{cols}")
    n_panels = rows * cols
    if n_panels < 2:
        raise ValueError(f"grid {rows}x{cols} has one panel: nothing to complete in-context")
    if n_panels > len(PANEL_LAYOUTS):
        raise ValueError(
            f"grid {rows}x{cols} has {n_panels} panels; the toy task defines layouts for at "
            f"most {len(PANEL_LAYOUTS)}"
        )
    return n_panels


def _check_panel_size(panel_size: int) -> None:
    if panel_size < MIN_PANEL_SIZE:
        raise ValueError(f"panel_size must be >= {MIN_PANEL_SIZE}, got {panel_size}")


def render_panel(
    colour_rgb: tuple[int, int, int],
    shape: str,
    panel_index: int,
    panel_size: int,
    grid: tuple[int, int],
) -> Image.Image:
    """One square panel: the object at panel `panel_index`'s layout. Pure; no anti-aliasing."""
    n_panels = check_grid(grid)
    _check_panel_size(panel_size)
    if not 0 <= panel_index < n_panels:
        raise ValueError(f"panel_index {panel_index} out of range for a {n_panels}-panel grid")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    layout = PANEL_LAYOUTS[panel_index]
    side = round(layout.scale * panel_size)
    x0 = round(layout.cx * panel_size - side / 2)
    y0 = round(layout.cy * panel_size - side / 2)
    x1, y1 = x0 + side - 1, y0 + side - 1  # inclusive, as PIL draws them
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2

    panel = Image.new("RGB", (panel_size, panel_size), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    fill = tuple(colour_rgb)
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":  # apex up
        draw.polygon([(x0, y1), (xm, y0), (x1, y1)], fill=fill)
    else:  # diamond
        draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
    return panel


def make_caption(grid: tuple[int, int]) -> str:
    """IC-LoRA style: one summary sentence, then a marker and description per panel."""
    n_panels = check_grid(grid)
    if tuple(grid) == (2, 2):
        markers = _MARKERS_2X2
    else:
        markers = tuple(f"[IMAGE {k + 1}]" for k in range(n_panels))
    parts = [
        f"A set of {_COUNT_WORDS[n_panels - 2]} panels showing the same object "
        "at different positions and sizes"
    ]
    parts += [f"{markers[k]} the object, {PANEL_LAYOUTS[k].description}" for k in range(n_panels)]
    return "; ".join(parts)


def make_sample(
    rng: np.random.Generator, panel_size: int = 64, grid: tuple[int, int] = (2, 2)
) -> ToySample:
    """Draw one (colour, shape) and render it into every panel of a rows x cols composite."""
    colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return draw_sample(colour, shape, panel_size, grid)


def draw_sample(colour: str, shape: str, panel_size: int = 64, grid: tuple[int, int] = (2, 2)) -> ToySample:
    """The composite of one (colour, shape): the object in every panel of a rows x cols grid."""
    rows, cols = grid
    n_panels = check_grid(grid)
    _check_panel_size(panel_size)
    image = Image.new("RGB", (cols * panel_size, rows * panel_size), BACKGROUND)
    for k in range(n_panels):  # row-major, no gaps between panels
        row, col = divmod(k, cols)
        panel = render_panel(PALETTE[colour], shape, k, panel_size, grid)
        image.paste(panel, (col * panel_size, row * panel_size))
    return ToySample(image=image, caption=make_caption(grid), colour=colour, shape=shape)


def make_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    panel_size: int = 64,
    grid: tuple[int, int] = (2, 2),
    one_per_colour: bool = False,
) -> list[Path]:
    """Write n samples as 00000.png + 00000.txt, ...; return the image paths in order.
    one_per_colour: sample i has colour i of PALETTE (cycling) and shape i of SHAPES instead
    of a random draw, e.g. a validation set that shows every colour once.

    Each file is written under a temporary name and moved into place, so a reader never
    sees a half-written file. Same arguments give byte-identical files.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        if one_per_colour:  # colour i, shapes in turn
            colour = list(PALETTE)[i % len(PALETTE)]
            sample = draw_sample(colour, SHAPES[i % len(SHAPES)], panel_size, grid)
        else:
            sample = make_sample(rng, panel_size=panel_size, grid=grid)
        image_path = out_dir / f"{i:05d}.png"
        caption_path = out_dir / f"{i:05d}.txt"

        tmp = out_dir / f".{image_path.name}.tmp"
        sample.image.save(tmp, format="PNG")
        os.replace(tmp, image_path)
        tmp = out_dir / f".{caption_path.name}.tmp"
        tmp.write_text(sample.caption, encoding="utf-8")
        os.replace(tmp, caption_path)
        paths.append(image_path)
    return paths


def make_base_model(folder: str | os.PathLike, vae_dir: Path = TOY_VAE, unet_dir: Path | None = TOY_UNET) -> Path:
    """A diffusers SDXL folder: the tiny SDXL's text encoders, tokenizers and scheduler, the
    toy VAE, the toy UNet (or the random one with unet_dir=None), v-prediction."""
    import json
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from .backends.lora_files import match_umask
    from .backends.tiny import save_tiny_model

    folder = Path(folder)
    for path in [vae_dir] + ([unet_dir] if unet_dir else []):
        if not (Path(path) / "diffusion_pytorch_model.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no weights; run benchmarks/fit_toy_vae.py and fit_toy_base.py first")
    save_tiny_model("tiny-sdxl", folder)
    shutil.rmtree(folder / "vae")
    (folder / "vae").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(Path(vae_dir) / name, folder / "vae" / name)
    if unet_dir:
        unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32)  # stored as float16
        shutil.rmtree(folder / "unet")
        unet.save_pretrained(folder / "unet")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["prediction_type"] = TOY_PREDICTION_TYPE
    config_file.write_text(json.dumps(config, indent=2))
    match_umask(folder)  # save_pretrained's safetensors files are 0600
    return folder


def parse_grid(text: str) -> tuple[int, int]:
    """'2x2' -> (2, 2); rows first."""
    try:
        rows, cols = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--grid must look like ROWSxCOLS (e.g. 2x2, 1x3), got {text!r}") from None
    check_grid((rows, cols))
    return rows, cols


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output folder of the composites")
    parser.add_argument("--n", type=int, default=16, help="number of composites")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--panel_size", type=int, default=64, help="side of one panel, px")
    parser.add_argument("--grid", default="2x2", help="ROWSxCOLS, e.g. 2x2, 1x3, 2x1")
    parser.add_argument("--one_per_colour", action="store_true",
                        help="sample i gets colour i and shape i (cycling) instead of a random draw")
    parser.add_argument("--base_model", help="also write the fitted toy SDXL base model to this folder")
    args = parser.parse_args(argv)
    if not (args.out or args.base_model):
        parser.error("give --out (composites) and/or --base_model (the toy base model folder)")
    if args.base_model:
        from .logs import setup_logging

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        setup_logging()
        make_base_model(args.base_model)
        print(f"toy base model: {args.base_model}")
        if not args.out:
            return []
    try:
        grid = parse_grid(args.grid)
    except ValueError as err:
        parser.error(str(err))
    return make_dataset(args.out, args.n, seed=args.seed, panel_size=args.panel_size, grid=grid,
                        one_per_colour=args.one_per_colour)


if __name__ == "__main__":
    main()
