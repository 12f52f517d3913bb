"""What inference checks about an input's shape and the outputs it will replace.

An input whose shape training would refuse at the LoRA's --image_size (its centre crop to a
bucket would cut more than data.MAX_CROP of a side beyond rounding: a 1000x20 strip for a 2x2
grid at 512) is refused at inference too, or with --allow_crop centre-cropped to the shape
training would give it, as training crops it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from PIL import Image

from ..data import cover_crop, crop_problem
from ..panels import Grid, composite_size

logger = logging.getLogger(__name__)


def fit_input(image: Image.Image, grid: Grid, quantum: int, image_size: int, bucket_by: str, allow_crop: bool,
              name: str) -> tuple[int, int] | None:
    """None when training at `image_size` takes `image` as it is; with --allow_crop the
    (width, height) to crop it to (the training bucket's shape at the input's scale); else
    ValueError naming `name`."""
    bucket_w, bucket_h = composite_size(image.width, image.height, image_size, grid, quantum, bucket_by)
    problem = crop_problem(image.width, image.height, bucket_w, bucket_h, grid, quantum)
    if problem is None:
        return None
    if not allow_crop:
        raise ValueError(f"{name}: {image.width}x{image.height} is far from a shape the {grid} grid holds: as training "
                         f"at --image_size {image_size}, it {problem} (--allow_crop crops it to fit)")
    scale = min(image.width / bucket_w, image.height / bucket_h)  # the largest box of the bucket's shape
    return max(1, round(bucket_w * scale)), max(1, round(bucket_h * scale))


def crop_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scaled to cover `size` = (width, height) and centre-cropped, as training's buckets are."""
    width, height = size
    resized, (top, left) = cover_crop(image.width, image.height, (height, width))
    return image.resize(resized, Image.Resampling.LANCZOS).crop((left, top, left + width, top + height))


def earlier_outputs(folder: Path, stem: str) -> list[str]:
    """The files an earlier run wrote for inputs named `stem` in `folder` (which this run replaces)."""
    if not folder.is_dir():
        return []
    pattern = rf"{re.escape(stem)}_(?:\d+(?:_panel\d+)?\.png|comparison\.png|inference\.json)"
    return sorted(p.name for p in folder.iterdir() if re.fullmatch(pattern, p.name))


def warn_replacing(folder: Path, stems: list[str]) -> None:
    """One line naming the inputs whose earlier outputs in `folder` this run replaces."""
    replaced = [stem for stem in stems if earlier_outputs(folder, stem)]
    if replaced:
        shown = ", ".join(replaced[:5]) + (f" and {len(replaced) - 5} more" if len(replaced) > 5 else "")
        logger.warning("--output_dir %s: replacing an earlier run's outputs of %s", folder, shown)
