"""Shared panel-inpainting inference for every backend.

    check_inputs()   every user error, before any model is loaded or file written (planning.py)
    build_mask()     panel indices (or a free-form mask) -> soft or hard pixel mask
    generate()       the backend's diffusers inpaint pipeline at the working size (sizing.py),
                     --batch_size images a call, the VAE tiled or sliced as vae.py decides (generation.py)
    generate_all()   the same for many inputs (--input_dir), batched across inputs (generation.py)
    composite()      generated (resized back) and original pixels through the same (soft) mask
                     (generation.py)
    write_outputs()  composites, panels, comparison and JSON, each via temp name + rename

The denoising itself is diffusers': StableDiffusionXLInpaintPipeline (9-channel `concat`
UNets get mask + masked-image latents as input; 4-channel `blend` ones get latent
blending of the visible panels each step), FluxInpaintPipeline / FluxFillPipeline for
FLUX; with `context` conditioning the backend's SDXLContextPipeline / FluxContextPipeline
(the same components, a loop that feeds the visible panels clean at every step). We swap
its mask processor for one that does not binarize, so feathered masks stay soft through
the whole pipeline.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import hub
from ..backends import backend_class
from ..compiling import COMPILE_OPTIONS
from ..cpu import set_cpu_threads
from ..logs import pipeline_progress
from ..panels import panel_box
from .config import InferConfig
from .generation import batches, composite, generate, generate_all, pipeline_calls
from .guards import warn_replacing
from .planning import Plan, check_inputs
from .vae import memory_record

logger = logging.getLogger(__name__)
# FLUX.1-Fill-dev's guidance embedding was distilled around 30 (its model card's value);
# the FLUX.1-dev default of 3.5 leaves Fill completions faint.
FILL_GUIDANCE_HINT = 10.0

COMPARISON_GAP = 4  # white pixels between tiles of the comparison image


def load_pipeline(plan: Plan):
    """The backend with the LoRA loaded, and its inpaint pipeline ready on the device."""
    from diffusers.image_processor import VaeImageProcessor

    from ..backends import load_backend

    cfg = plan.cfg
    cuda = torch.cuda.is_available()
    set_cpu_threads(plan.base_model, "cuda" if cuda else "cpu")
    native = {"fp16": torch.float16, "bf16": torch.bfloat16}[backend_class(cfg.backend).preferred_mixed_precision]
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else (native if cuda else torch.float32)
    options = {"variant": cfg.variant, "vae": plan.pretrained_vae}
    if cfg.quantize:
        options["quantize"] = cfg.quantize
    if dtype != torch.float32:
        # Loaded in it, quantized or not: no float32 copy of the text encoders on the host.
        options["dtype"] = dtype
    if plan.context_timestep:
        options["context_timestep"] = plan.context_timestep
    flag = "--base_model" if cfg.base_model else f"--lora_path {cfg.lora_path}: its base model"
    source = hub.model_source(plan.base_model, flag)  # before any output is written
    backend = load_backend(cfg.backend, source, plan.conditioning, max_token_length=plan.max_token_length, **options)
    backend.base_model = plan.base_model
    if cfg.lora_path.lower() != "none":
        backend.load_lora(Path(cfg.lora_path))
    pipe = backend.inpaint_pipeline()
    # Injected LoRA layers start in train mode, and their dropout (the trained lora_dropout)
    # would make every output random whatever the seed.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    # diffusers binarizes inpaint masks by default; a feathered mask must stay soft.
    pipe.mask_processor = VaeImageProcessor(
        vae_scale_factor=backend.vae_scale_factor, do_normalize=False, do_binarize=False, do_convert_grayscale=True
    )
    if backend.quantized:
        # bitsandbytes weights keep their own dtype and device: cast the other components only.
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module) and component is not backend.denoiser:
                component.to(dtype=dtype)
    else:
        pipe.to(dtype=dtype)
    if cfg.cpu_offload and cuda:
        pipe.enable_model_cpu_offload()
    elif cuda:
        pipe.to("cuda")
    if cfg.compile:  # after the LoRA is loaded: the compiled blocks run its layers
        backend.compile_blocks(**COMPILE_OPTIONS)
    pipeline_progress(pipe, desc="denoising", leave=False)
    transformer = getattr(pipe, "transformer", None)
    if (backend.conditioning == "concat" and transformer is not None and transformer.config.guidance_embeds
            and cfg.guidance_scale < FILL_GUIDANCE_HINT):
        logger.warning("--guidance_scale %g with a FLUX.1-Fill base: Fill was distilled for guidance ~30 "
                       "(pass --guidance_scale 30)", cfg.guidance_scale)
    return backend, pipe


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


def run(cfg: InferConfig) -> list[Path]:
    """One --input_image (folder.run_folder runs an --input_dir with this module's steps)."""
    if cfg.input_dir:
        raise ValueError("--input_dir: a folder runs through iclora.inference.folder.run_folder")
    plan = check_inputs(cfg)
    warn_replacing(Path(cfg.output_dir), [plan.stem])
    backend, pipe = load_pipeline(plan)
    outputs, seeds = generate(plan, backend, pipe)
    return write_outputs(plan, outputs, seeds, resolved_settings(plan, backend))


# The steps' public names, as the web app, the trainer's samples and the benchmarks import them.
__all__ = ["FILL_GUIDANCE_HINT", "Plan", "batches", "check_inputs", "composite", "generate", "generate_all",
           "load_pipeline", "pipeline_calls", "run"]
