"""Input checking and planning: every user error found, and every setting resolved from the
flags and the LoRA's record, before any model is loaded or file written.

    check_inputs()   flags + LoRA record + input image (+ mask) -> Plan
    Plan             what the later steps (generation.py, output_files.py) read

The mask is built here at the input's own size (panel indices, or a free-form --mask_image,
feathered with --use_gradient_mask); generation.py scales it to the working size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..backends import backend_class
from ..backends.registry import ByBackend, backend_spec
from ..backends.lora_files import read_metadata, resolve_lora_file
from ..compiling import check_compilable
from ..images import open_rgb8
from ..panels import Grid, feather, inpaint_mask, panel_box, parse_panels
from .config import InferConfig
from .guards import crop_to, fit_input
from .sizing import WorkingSize, bucket_rule, generated_size, trained_aspect, working_side, working_size
from .vae import resolve_vae

# The base model when neither --base_model nor the LoRA names one: the backend's training default.
DEFAULT_BASES = ByBackend("default_model")


@dataclass
class Plan:
    """Everything resolved from the flags and the LoRA's record, before any model loads."""

    cfg: InferConfig
    base_model: str
    grid: Grid
    conditioning: str | None
    context_timestep: str | None
    panels: list[int]
    image: Image.Image | None  # the input at its own size (RGB)
    mask: torch.Tensor  # (1, H, W) at the input's own size, 1 = regenerate
    size: tuple[int, int]  # (width, height) of the output
    stem: str
    max_token_length: int = 75  # CLIP tokens read from the prompt, as in training
    working: WorkingSize | None = None  # where the pipeline runs (sizing.py); set by check_inputs
    pretrained_vae: str | None = None  # a VAE loaded instead of the base model's
    prompt_arguments: dict | None = None  # encoded already (training's sample sheets): no text encoder runs


def _open_image(path: str, flag: str, mode: str) -> Image.Image:
    try:
        return open_rgb8(path).convert(mode)  # 16-bit and transparent inputs as training reads them
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{flag} {path}: unreadable image ({error.__class__.__name__})") from None


def check_inputs(cfg: InferConfig) -> Plan:
    meta: dict = {}
    if cfg.lora_path.lower() != "none":
        resolve_lora_file(cfg.lora_path)
        meta = read_metadata(cfg.lora_path)
        if meta.get("backend") not in (None, cfg.backend):
            raise ValueError(f"--lora_path {cfg.lora_path}: trained for the {meta['backend']} backend, not {cfg.backend}")
    grid = Grid.parse(cfg.grid or meta.get("grid", "2x2"))
    base_model = cfg.base_model or meta.get("base_model") or DEFAULT_BASES[cfg.backend]
    conditioning = cfg.conditioning or meta.get("conditioning")
    context_timestep = cfg.context_timestep
    if context_timestep is None and conditioning == "context" and meta.get("conditioning") == "context":
        context_timestep = meta.get("context_timestep")
    if context_timestep and conditioning != "context":
        raise ValueError(f"--context_timestep {context_timestep} needs --conditioning context")
    # A LoRA recorded before long prompts, a foreign one and the bare base read what the stock
    # pipeline reads: the backend's first length (CLIP's 75; FLUX.2: Qwen3's 512).
    max_token_length = cfg.max_token_length or meta.get("max_token_length") or backend_spec(cfg.backend).max_token_lengths[0]
    pretrained_vae = resolve_vae(cfg.pretrained_vae, meta, cfg.lora_path)
    backend_cls = backend_class(cfg.backend)

    crop = None  # with --allow_crop: the size an input far from the grid's shape is cropped to
    words = [str(p).strip().lower() for p in cfg.panels_to_inpaint]
    panels = parse_panels(words, grid)
    image = _open_image(cfg.input_image, "--input_image", "RGB") if cfg.input_image else None
    if image is None:
        if cfg.mask_image:
            raise ValueError("--mask_image needs --input_image")
        if words != ["all"]:
            raise ValueError("--input_image is required unless --panels_to_inpaint all (text -> whole image set)")
        side, _ = working_side(cfg, meta, backend_cls.native_image_size)
        size = generated_size(cfg, grid, side, backend_cls.pixel_quantum, bucket_rule(meta), trained_aspect(meta, grid))
        stem = "generated"
    else:
        if words != ["all"] and len(panels) == grid.num_panels and not cfg.mask_image:
            raise ValueError(
                "--panels_to_inpaint masks every panel of the input: use --panels_to_inpaint all "
                "(with or without --input_image) to regenerate the whole composite"
            )
        original_size = image.size
        side, _ = working_side(cfg, meta, backend_cls.native_image_size)  # the size training would give it
        crop = fit_input(image, grid, backend_cls.pixel_quantum, side, bucket_rule(meta), cfg.allow_crop,
                         f"--input_image {cfg.input_image}")
        if crop:
            image = crop_to(image, crop)
        size = image.size
        stem = Path(cfg.input_image).stem

    width, height = size
    if cfg.mask_image:
        mask_image = _open_image(cfg.mask_image, "--mask_image", "L")
        if mask_image.size != original_size:
            raise ValueError(
                f"--mask_image {cfg.mask_image}: size {mask_image.width}x{mask_image.height} differs from "
                f"--input_image {original_size[0]}x{original_size[1]}"
            )
        if crop:
            mask_image = crop_to(mask_image, crop)
        mask = torch.from_numpy(np.asarray(mask_image, dtype=np.float32) / 255.0)[None]  # (1, H, W)
        if cfg.use_gradient_mask:
            mask = feather(mask, cfg.gradient_width)
        panels = [i for i in range(grid.num_panels) if _box_max(mask, grid, i) > 0]
        if not panels:
            raise ValueError(f"--mask_image {cfg.mask_image}: all black, nothing to regenerate (white = regenerate)")
    else:
        mask = inpaint_mask(panels, grid, height, width, cfg.gradient_width if cfg.use_gradient_mask else 0)
    _check_output_dir(Path(cfg.output_dir))
    _check_memory_log(cfg.memory_log)
    if cfg.compile:
        check_compilable("cuda" if torch.cuda.is_available() else "cpu")
    working = working_size(cfg, meta, size, grid, backend_cls.pixel_quantum, backend_cls.native_image_size)
    return Plan(cfg, base_model, grid, conditioning, context_timestep, panels, image, mask, size, stem,
                max_token_length=max_token_length, working=working, pretrained_vae=pretrained_vae)


def _check_output_dir(folder: Path, flag: str = "--output_dir") -> None:
    """Fail before any model loads if the outputs could not be written."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{flag} {folder}: {existing} is not writable")


def _check_memory_log(path: str | None) -> None:
    if path is None:
        return
    if Path(path).is_dir():
        raise ValueError(f"--memory_log {path}: a folder; give the JSON file to write")
    _check_output_dir(Path(path).absolute().parent, f"--memory_log {path}: its folder")


def _box_max(mask: torch.Tensor, grid: Grid, index: int) -> float:
    left, top, right, bottom = panel_box(index, grid, mask.shape[-1], mask.shape[-2])
    return float(mask[:, top:bottom, left:right].max())

