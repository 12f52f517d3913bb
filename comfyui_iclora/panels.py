"""Panel geometry of a composite: the one place that knows where panels are.

A composite is a grid of `rows x cols` equal panels, indexed row-major:

    2x2:  0 | 1        1x3:  0 | 1 | 2
          --+--
          2 | 3

Training and inference both take boxes, masks and the random panel sampler from here, so
a panel index means the same thing everywhere. Masks are float tensors, 1 = regenerate,
0 = keep, shaped (1, H, W) for one image.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Grid:
    rows: int
    cols: int

    @classmethod
    def parse(cls, text: str | "Grid") -> "Grid":
        """'2x2', '1x3', ... (rows x cols)."""
        if isinstance(text, Grid):
            return text
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"--grid: expected ROWSxCOLS such as 2x2 or 1x3, got {text!r}")
        grid = cls(int(match.group(1)), int(match.group(2)))
        if grid.rows < 1 or grid.cols < 1 or grid.num_panels < 2:
            raise ValueError(f"--grid: a composite needs at least 2 panels, got {text!r}")
        return grid

    @property
    def num_panels(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


BUCKET_BY = ("longest", "area")


def bucket_scale(width: int, height: int, image_size: int, bucket_by: str = "longest") -> float:
    """How much a width x height composite is scaled to its training size: its longer side
    to `image_size` ('longest'), or its area to `image_size`² ('area': a 1x3 strip then
    trains at the pixels of a 2x2 composite, not at a third of them)."""
    if bucket_by not in BUCKET_BY:
        raise ValueError(f"bucket_by: expected one of {', '.join(BUCKET_BY)}, got {bucket_by!r}")
    return image_size / (max(width, height) if bucket_by == "longest" else math.sqrt(width * height))


def composite_size(width: int, height: int, image_size: int, grid: Grid, quantum: int,
                   bucket_by: str = "longest") -> tuple[int, int]:
    """Training size of a composite: scaled by `bucket_scale` keeping its aspect ratio, then
    both sides rounded so every panel boundary falls on a multiple of `quantum` pixels (a
    latent pixel for SDXL, a packed 2x2 latent patch for FLUX)."""
    scale = bucket_scale(width, height, image_size, bucket_by)
    return fit_to_grid(round(width * scale), round(height * scale), grid, quantum)


def fit_to_grid(width: int, height: int, grid: Grid, quantum: int) -> tuple[int, int]:
    """Nearest (width, height) whose panels are whole multiples of `quantum` pixels."""
    step_w, step_h = grid.cols * quantum, grid.rows * quantum
    return max(step_w, round(width / step_w) * step_w), max(step_h, round(height / step_h) * step_h)


def panel_box(index: int, grid: Grid, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of panel `index` in an image of width x height (pixels or
    latent pixels). Boundaries are rounded so the boxes tile the image exactly."""
    if not 0 <= index < grid.num_panels:
        raise ValueError(f"panel index {index} is outside the {grid} grid (0..{grid.num_panels - 1})")
    row, col = divmod(index, grid.cols)
    left, right = (col * width) // grid.cols, ((col + 1) * width) // grid.cols
    top, bottom = (row * height) // grid.rows, ((row + 1) * height) // grid.rows
    return left, top, right, bottom


def panel_mask(indices: list[int], grid: Grid, height: int, width: int) -> torch.Tensor:
    """Hard mask (1, H, W): 1 inside the listed panels."""
    mask = torch.zeros(1, height, width)
    for index in indices:
        left, top, right, bottom = panel_box(index, grid, width, height)
        mask[:, top:bottom, left:right] = 1.0
    return mask


def panel_masks(subsets: list[list[int]] | list[tuple[int, ...]], grid: Grid, height: int, width: int) -> torch.Tensor:
    """Hard masks (B, 1, H, W), one per subset of panels: `panel_mask` of each, stacked, built
    at once (each pixel looks its panel up; a few tensor ops per batch, not per panel)."""
    rows = _panel_of(grid.rows, height)  # (H,)
    cols = _panel_of(grid.cols, width)  # (W,)
    index = rows[:, None] * grid.cols + cols[None, :]  # (H, W): the panel of each pixel, row-major
    chosen = torch.tensor([[float(i in subset) for i in range(grid.num_panels)] for subset in subsets])  # (B, P)
    return chosen[:, index][:, None]  # (B, 1, H, W)


def _panel_of(count: int, size: int) -> torch.Tensor:
    """(size,): which of `count` panel rows (or columns) each pixel lies in, on panel_box's boundaries."""
    bounds = torch.tensor([(i * size) // count for i in range(1, count)])
    return torch.bucketize(torch.arange(size), bounds, right=True)


def feather(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Soften a hard mask (..., H, W) with a linear ramp `width` pixels wide centred on each
    edge between masked and kept regions. Image borders are not edges (replicate padding),
    so a masked panel stays fully masked up to the image border."""
    radius = max(int(width) // 2, 0)
    if radius == 0:
        return mask.clone()
    shape = mask.shape
    x = mask.reshape(-1, 1, *shape[-2:]).float()  # (N, 1, H, W)
    size = 2 * radius + 1
    x = F.avg_pool2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), (1, size), stride=1)
    x = F.avg_pool2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), (size, 1), stride=1)
    return x.reshape(shape)


def inpaint_mask(indices: list[int], grid: Grid, height: int, width: int, gradient_width: int = 0) -> torch.Tensor:
    """The pixel mask inference uses: hard panels, feathered when `gradient_width` > 0."""
    mask = panel_mask(indices, grid, height, width)
    return feather(mask, gradient_width) if gradient_width > 0 else mask


def latent_mask(mask: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Pixel mask (..., H, W) -> latent mask (..., H/f, W/f) by area averaging: exact 0/1 for
    panel masks whose boundaries fall on latent pixels, and a faithful average of soft ones."""
    shape = mask.shape
    x = mask.reshape(-1, 1, *shape[-2:]).float()
    x = F.avg_pool2d(x, scale_factor)
    return x.reshape(*shape[:-2], *x.shape[-2:])


def sample_masked_panels(
    num_panels: int, mask_probability: float, max_masked_panels: int, generator: torch.Generator
) -> list[int]:
    """The training-time panel sampler. With probability `mask_probability` mask k panels,
    k uniform in 1..max_masked_panels, chosen uniformly; at least one panel always stays
    visible. Otherwise mask none (the caller trains that as text -> whole image set)."""
    if torch.rand((), generator=generator).item() >= mask_probability:
        return []
    most = min(max_masked_panels, num_panels - 1)
    if most < 1:
        return []
    count = int(torch.randint(1, most + 1, (), generator=generator).item())
    return sorted(torch.randperm(num_panels, generator=generator)[:count].tolist())


def parse_panels(values: list[str] | list[int] | str, grid: Grid, flag: str = "--panels_to_inpaint") -> list[int]:
    """Indices from the command line: integers, or the single word 'all'."""
    if isinstance(values, (str, int)):
        values = [values]
    words = [str(v).strip().lower() for v in values]
    if words == ["all"]:
        return list(range(grid.num_panels))
    try:
        indices = [int(w) for w in words]
    except ValueError:
        raise ValueError(f"{flag}: expected panel indices or 'all', got {' '.join(words)}") from None
    if not indices:
        raise ValueError(f"{flag}: no panel given")
    for index in indices:
        if not 0 <= index < grid.num_panels:
            raise ValueError(f"{flag}: panel {index} is outside the {grid} grid (valid: 0..{grid.num_panels - 1})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{flag}: duplicate panel indices in {' '.join(words)}")
    return sorted(indices)


def split_panels(image, grid: Grid) -> list:
    """Crop a PIL image into its panels, row-major."""
    return [image.crop(panel_box(i, grid, image.width, image.height)) for i in range(grid.num_panels)]


def expected_masked_fraction(num_panels: int, mask_probability: float, max_masked_panels: int) -> float:
    """Mean share of panels masked per sample by `sample_masked_panels` (for tests and logs)."""
    most = min(max_masked_panels, num_panels - 1)
    if most < 1:
        return 0.0
    return mask_probability * (most + 1) / 2 / num_panels


__all__ = [
    "Grid", "BUCKET_BY", "bucket_scale", "composite_size", "fit_to_grid", "panel_box", "panel_mask", "panel_masks", "feather", "inpaint_mask",
    "latent_mask", "sample_masked_panels", "parse_panels", "split_panels", "expected_masked_fraction",
]
