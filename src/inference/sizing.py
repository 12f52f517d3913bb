"""The size inference denoises at: the size training gives such a composite.

A LoRA learns its panels at the size training resized its composites to: the longer side
`--image_size` (or with `--bucket_by area`, about `image_size²` pixels), the other keeping
the aspect ratio, both rounded so every panel boundary falls on a latent pixel
(`panels.composite_size`, the training bucket; the rule is the LoRA's recorded `bucket_by`). Denoising a 2048 px
composite with a LoRA trained at 1024 would show it four times the area it learned (and
take four times the memory), so inference resizes the input to its bucket (the working
size), denoises there, and resizes the result back to the input's size; the visible panels
are then pasted from the original at full resolution (`generation.composite`), exactly where
the mask is 0. `--native_size` denoises at the input's own size instead (rounded to the
grid), as earlier versions did.

The working size is resolved from the flags and the LoRA's record before any model loads:

    --image_size N       the longer side N
    (recorded)           the image_size recorded in the LoRA's iclora_config.json
    (neither)            the backend's native size (SDXL, FLUX.1: 1024), for the bare base
                         and LoRAs from elsewhere
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..panels import Grid, composite_size, fit_to_grid, inpaint_mask


@dataclass(frozen=True)
class WorkingSize:
    """Where the pipeline runs: `size` (width, height), and whence its side came (for the JSON)."""

    size: tuple[int, int]
    source: str


def working_side(cfg, meta: dict, native: int) -> tuple[int, str]:
    """The longer side training would give the input, and what set it."""
    if cfg.image_size:
        return cfg.image_size, "--image_size"
    if meta.get("image_size"):
        return int(meta["image_size"]), "the LoRA's recorded image_size"
    return native, f"the base model's native size ({native}; no image_size recorded with the LoRA)"


def bucket_rule(meta: dict) -> str:
    """How the LoRA's training sized composites ('longest' for LoRAs that do not record it)."""
    return meta.get("bucket_by") or "longest"


def trained_aspect(meta: dict, grid: Grid) -> tuple[int, int]:
    """A (width, height) with the aspect a set from text takes: the LoRA's most common
    training bucket (a try-on 1x3 of 512x768 photos: 1536x768), else, for LoRAs that do not
    record their buckets or run on another grid, the grid's with square panels."""
    buckets = meta.get("buckets")
    if buckets and meta.get("grid") == str(grid):
        return int(buckets[0][0]), int(buckets[0][1])
    return grid.cols, grid.rows


def generated_size(cfg, grid: Grid, side: int, quantum: int, bucket_by: str = "longest",
                   aspect: tuple[int, int] | None = None) -> tuple[int, int]:
    """The output size of a set generated from text (no input): --width and --height when
    both are given; one of them with the other from `aspect` (default: the grid's, square
    panels); neither: the training bucket of `aspect` (SDXL, 1x3, side 1024: 1032x344)."""
    aspect_w, aspect_h = aspect or (grid.cols, grid.rows)
    if cfg.width and cfg.height:
        return cfg.width, cfg.height
    if cfg.width:
        return cfg.width, max(1, round(cfg.width * aspect_h / aspect_w))
    if cfg.height:
        return max(1, round(cfg.height * aspect_w / aspect_h)), cfg.height
    return composite_size(aspect_w, aspect_h, side, grid, quantum, bucket_by)


def working_size(cfg, meta: dict, size: tuple[int, int], grid: Grid, quantum: int, native: int) -> WorkingSize:
    """The size a composite of `size` (width, height) is denoised at."""
    if cfg.native_size:
        own = fit_to_grid(*size, grid, quantum)
        return WorkingSize(own, "--native_size: the input's own size, rounded to the grid")
    side, source = working_side(cfg, meta, native)
    rule = bucket_rule(meta)
    what = "the longer side" if rule == "longest" else "the side of a square of the same area (bucket_by area)"
    return WorkingSize(composite_size(*size, side, grid, quantum, rule), f"{source}, {what}")


def working_mask(mask: torch.Tensor, size: tuple[int, int], grid: Grid, panels: list[int] | None) -> torch.Tensor:
    """The pixel mask (1, H, W) at the working size (width, height), as (1, 1, h, w). Hard
    panel masks are drawn anew there, so panel boundaries stay exact (as training draws
    them); feathered and free-form masks are resampled (averaged where they shrink)."""
    width, height = size
    if mask.shape[-2:] == (height, width):
        return mask[None].clone()
    if panels is not None:
        return inpaint_mask(panels, grid, height, width)[None]
    shrinking = height < mask.shape[-2] or width < mask.shape[-1]
    resized = torch.nn.functional.interpolate(mask[None], size=(height, width), mode="bilinear",
                                              align_corners=False, antialias=shrinking)
    return resized.clamp(0, 1)  # (1, 1, h, w)
