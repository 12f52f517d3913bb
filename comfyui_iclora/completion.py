"""The ComfyUI-free part of the IC-LoRA nodes: masks to tokens, token order, modulation
slices, the LoRA's training record, panel masks and composites. Only torch and PIL; the
nodes (nodes.py) and the sampling wrappers (sampling.py) call these, and the tests run
them without ComfyUI.

How FLUX.1 context completion maps onto ComfyUI's blocks: an image token is *visible* when
its whole 2x2 latent patch is visible (the rule of iclora's FluxContextPipeline); visible
tokens are modulated as timestep 0, masked ones at t. ComfyUI's FLUX blocks take per-token
modulation as slices `(start, end, k)` of the sequence, each reading row k of a (B, K, D)
`vec`; ordering a composite's tokens masked-first (RoPE ids moved with them, so attention
is unchanged) makes that two slices: `(0, n_masked, 0)` at t and `(n_masked, N, 1)` at 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .panels import Grid, feather, panel_box

CONFIG_NAME = "iclora_config.json"  # written beside every iclora LoRA file
CONTEXT_TIMESTEPS = ("zero", "shared")
TOKEN_PIXELS = 16  # a FLUX token: a 2x2 patch of 8x8-pixel latents
LATENT_PIXELS = 8  # an SDXL latent pixel


def binary_mask(denoise_mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI's denoise mask at latent size (B, 1|C, h, w), soft -> (B, 1, h, w) float
    0/1, 1 = regenerate: the threshold iclora's inference applies to its latent mask."""
    return (denoise_mask[:, :1] >= 0.5).float()


def token_aligned(mask: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, 1, h, w) 0/1 -> the same with every `patch` x `patch` token masked wherever any of
    its latent pixels is: the latent pixels FLUX denoises. Odd sizes are padded as ComfyUI's
    FLUX pads its input."""
    h, w = mask.shape[-2:]
    tokens = F.max_pool2d(mask, patch, ceil_mode=True)  # (B, 1, ceil(h/p), ceil(w/p))
    return tokens.repeat_interleave(patch, -2).repeat_interleave(patch, -1)[..., :h, :w]


def masked_tokens(mask: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, 1, h, w) 0/1 -> (B, N) bool, True for a token with any masked latent pixel, in
    ComfyUI's FLUX token order (row-major over the (h/p, w/p) patches)."""
    tokens = F.max_pool2d(mask.float(), patch, ceil_mode=True)  # (B, 1, h/p, w/p)
    return tokens.flatten(1) >= 0.5


def masked_first(masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One composite's (N,) bool -> (order, inverse, n_masked): `tokens[order]` puts the
    masked tokens first (each group in its original order), `out[inverse]` undoes it."""
    order = torch.argsort((~masked).to(torch.int8), stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse, int(masked.sum())


def modulation_slices(n_masked: int, n_tokens: int, offset: int = 0) -> list[tuple[int, int, int]]:
    """ComfyUI's `modulation_dims` for a masked-first sequence of `n_tokens` image tokens
    starting at `offset` (the text length in the single blocks): k = 0 (timestep t) for the
    masked tokens, k = 1 (timestep 0) for the visible ones. Empty slices are left out."""
    slices = [(offset, offset + n_masked, 0), (offset + n_masked, offset + n_tokens, 1)]
    return [s for s in slices if s[1] > s[0]]


def repeat_rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-image tensor (b, ...) for a model batch of `batch` rows: ComfyUI stacks the
    conditionings (cond, uncond, ...) of one latent batch, each a full copy of it."""
    if batch % tensor.shape[0]:
        raise ValueError(f"a model batch of {batch} rows is not a whole number of latent batches of {tensor.shape[0]}")
    return tensor.repeat(batch // tensor.shape[0], *[1] * (tensor.ndim - 1))


def read_lora_config(lora_file: str | Path | None) -> dict:
    """The training record beside a LoRA file ({} when there is none: a foreign LoRA)."""
    if not lora_file:
        return {}
    path = Path(lora_file).parent / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return record


def context_mode(record: dict, family: str, chosen: str = "auto") -> str:
    """How the visible panels are fed: 'zero' (FLUX: visible tokens at timestep 0) or 'shared'
    (clean, at the current t). `chosen` overrides; 'auto' takes the LoRA's record, else the
    family's training default (FLUX zero, SDXL shared). A record of another conditioning or
    model family is refused: those LoRAs need another workflow."""
    backend = record.get("backend")
    if backend and backend != family:
        raise ValueError(f"this LoRA was trained for {backend.upper()}, the model is {family.upper()}")
    conditioning = record.get("conditioning", "context")
    if conditioning == "concat":
        raise ValueError("this LoRA was trained with concat conditioning: run it with stock InpaintModelConditioning "
                         "on an inpainting model, without the IC-LoRA Context node")
    if conditioning == "blend":
        raise ValueError("this LoRA was trained with blend conditioning: run it with stock latent-blend inpainting "
                         "(SetLatentNoiseMask), without the IC-LoRA Context node")
    mode = record.get("context_timestep") if chosen == "auto" else chosen
    mode = mode or ("zero" if family == "flux" else "shared")
    if mode not in CONTEXT_TIMESTEPS:
        raise ValueError(f"context_timestep {mode!r}: expected one of {', '.join(CONTEXT_TIMESTEPS)}")
    if family == "sdxl" and mode == "zero":
        raise ValueError("context_timestep zero needs FLUX's per-token modulation; the SDXL UNet has one timestep")
    return mode


def parse_indices(text: str, grid: Grid) -> list[int]:
    """'2 3', '2,3' or 'all' -> sorted panel indices, each checked against the grid."""
    words = text.replace(",", " ").split()
    if [w.lower() for w in words] == ["all"]:
        return list(range(grid.num_panels))
    try:
        indices = sorted({int(w) for w in words})
    except ValueError:
        raise ValueError(f"panels: expected indices such as '2 3' or 'all', got {text!r}") from None
    if not indices:
        raise ValueError("panels: no panel given")
    bad = [i for i in indices if not 0 <= i < grid.num_panels]
    if bad:
        raise ValueError(f"panels: {bad[0]} is outside the {grid} grid (valid: 0..{grid.num_panels - 1})")
    return indices


def aligned_panel_mask(indices: list[int], grid: Grid, height: int, width: int, quantum: int,
                       gradient_width: int = 0) -> torch.Tensor:
    """(H, W) mask, 1 = regenerate: the listed panels with their edges on multiples of
    `quantum` pixels (16 = whole FLUX tokens, so no token straddles a panel edge), feathered
    over `gradient_width` pixels as iclora's --use_gradient_mask does. For an image whose
    panels are already multiples of `quantum` this is iclora's inference mask exactly."""
    cols, rows = -(-width // quantum), -(-height // quantum)  # the image in quanta, a partial one counted
    mask = torch.zeros(1, height, width)
    for index in indices:
        left, top, right, bottom = (v * quantum for v in panel_box(index, grid, cols, rows))
        mask[:, top:bottom, left:right] = 1.0
    return (feather(mask, gradient_width) if gradient_width > 0 else mask)[0]


def fit_panel(image: Image.Image, width: int, height: int, fit: str, background: tuple[int, int, int]) -> Image.Image:
    """`image` at width x height as iclora's compose command fits it: letterboxed (aspect
    kept, padded), centre-cropped, or stretched."""
    if fit == "crop":
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    if fit == "stretch":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    return ImageOps.pad(image, (width, height), Image.Resampling.LANCZOS, color=background)


def compose(panels: list[Image.Image], grid: Grid, panel_width: int, panel_height: int, fit: str,
            background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Panels (row-major) -> one composite of `grid`, each fitted to its panel box."""
    if len(panels) != grid.num_panels:
        raise ValueError(f"images: {len(panels)} image(s) for the {grid} grid's {grid.num_panels} panels")
    width, height = panel_width * grid.cols, panel_height * grid.rows
    canvas = Image.new("RGB", (width, height), background)
    for index, panel in enumerate(panels):
        left, top, right, bottom = panel_box(index, grid, width, height)
        canvas.paste(fit_panel(panel, right - left, bottom - top, fit, background), (left, top))
    return canvas


def split(image: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A composite (H, W, C) -> its panels (P, h, w, C), row-major. Where the grid does not
    divide the size, panels take the smallest panel's size (at most one pixel less)."""
    height, width = image.shape[:2]
    boxes = [panel_box(i, grid, width, height) for i in range(grid.num_panels)]
    w = min(r - left for left, _, r, _ in boxes)
    h = min(b - t for _, t, _, b in boxes)
    return torch.stack([image[t : t + h, left : left + w] for left, t, _, _ in boxes])
