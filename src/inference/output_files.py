"""Output writing: what an inference run leaves in --output_dir, per input stem.

    write_outputs()      composites, panels, comparison and JSON, each via temp name + rename,
                         then the stem's files an earlier run wrote and this one did not removed
    comparison_image()   input | mask | output 1 | ... in one captioned row (--save_comparison)
    resolved_settings()  what the run resolved from the flags and the LoRA's record (the JSON's)
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..panels import panel_box
from .planning import Plan
from .vae import memory_record

COMPARISON_GAP = 4  # white pixels between tiles of the comparison image


def comparison_image(plan: Plan, outputs: list[Image.Image], seeds: list[int]) -> Image.Image:
    """input | mask | output 1 | ... in one row, under a caption row naming each tile."""
    width, height = plan.size
    mask = Image.fromarray((plan.mask[0].numpy() * 255).round().astype(np.uint8)).convert("RGB")
    tiles = [("input", plan.image or Image.new("RGB", plan.size, (0, 0, 0))), ("mask", mask)]
    tiles += [(f"output {i + 1} (seed {s})", img) for i, (img, s) in enumerate(zip(outputs, seeds))]
    caption_h, gap = max(16, height // 16), COMPARISON_GAP
    sheet = Image.new("RGB", (len(tiles) * (width + gap) - gap, height + caption_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for column, (label, tile) in enumerate(tiles):
        left = column * (width + gap)
        draw.text((left + 4, 2), label, fill=(0, 0, 0))
        sheet.paste(tile, (left, caption_h))
    return sheet


def write_outputs(plan: Plan, outputs: list[Image.Image], seeds: list[int], resolved: dict) -> list[Path]:
    """Write everything under temporary names first, then rename, so a failure leaves no
    partial set and no temporary file behind; then remove what an earlier run wrote for the
    same stem and this one did not (more --num_images, a comparison sheet), so the folder
    holds exactly the set the JSON record describes."""
    cfg = plan.cfg
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Image.Image | str] = {}
    for i, image in enumerate(outputs):
        files[f"{plan.stem}_{i}.png"] = image
        for k in plan.panels:
            files[f"{plan.stem}_{i}_panel{k}.png"] = image.crop(panel_box(k, plan.grid, *image.size))
    if cfg.save_comparison:
        files[f"{plan.stem}_comparison.png"] = comparison_image(plan, outputs, seeds)
    record = {
        "arguments": asdict(cfg),
        "resolved": resolved,
        "images": [{"file": f"{plan.stem}_{i}.png", "seed": s} for i, s in enumerate(seeds)],
    }
    files[f"{plan.stem}_inference.json"] = json.dumps(record, indent=2)
    temps = []
    try:
        for name, content in files.items():
            tmp = out_dir / f".{name}.tmp"
            temps.append((tmp, out_dir / name))  # before writing: a half-written one is removed too
            if isinstance(content, str):
                tmp.write_text(content)
            else:
                content.save(tmp, format="PNG")
    except BaseException as error:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):  # a full disk: one line naming the file, not a traceback
            raise OSError(f"--output_dir {out_dir}: could not write {name} ({error.strerror or error})") from None
        raise
    for tmp, final in temps:
        tmp.replace(final)
    written = {final.name for _, final in temps}
    for stale in out_dir.iterdir():
        if stale.name not in written and _output_of(stale.name, plan.stem):
            stale.unlink(missing_ok=True)
    return [final for _, final in temps]


def _output_of(name: str, stem: str) -> bool:
    """Whether `name` is a file write_outputs makes for inputs named `stem` (or its
    temporary file, left by a killed run): `<stem>_3.png`, `<stem>_3_panel2.png`,
    `<stem>_comparison.png`, `<stem>_inference.json`. Another input's `<stem>_x_0.png` is not."""
    pattern = rf"(\.)?{re.escape(stem)}_(?:\d+(?:_panel\d+)?\.png|comparison\.png|inference\.json)(?(1)\.tmp)"
    return re.fullmatch(pattern, name) is not None


def resolved_settings(plan: Plan, backend) -> dict:
    """What the run resolved from the flags and the LoRA's record (for the JSON)."""
    return {
        "backend": backend.name, "base_model": plan.base_model, "grid": str(plan.grid),
        "conditioning": backend.conditioning, "context_timestep": backend.context_timestep,
        "max_token_length": backend.max_token_length, "panels": plan.panels, "size": list(plan.size),
        "working_size": list(plan.working.size), "working_size_from": plan.working.source,
        "pretrained_vae": plan.pretrained_vae,
        "vae": memory_record(plan.cfg, plan.working.size),
        **({"compile": backend.compiled.record()} if backend.compiled is not None else {}),
    }
