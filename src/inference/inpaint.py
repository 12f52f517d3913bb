"""Shared panel-inpainting inference for every backend.

    check_inputs()   every user error, before any model is loaded or file written (planning.py)
    build_mask()     panel indices (or a free-form mask) -> soft or hard pixel mask
    generate()       the backend's diffusers inpaint pipeline at the working size (sizing.py),
                     --batch_size images a call, the VAE tiled or sliced as vae.py decides
    generate_all()   the same for many inputs (--input_dir), batched across inputs
    composite()      generated (resized back) and original pixels through the same (soft) mask
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

import inspect
import json
import logging
import re
import secrets
import time
from collections.abc import Hashable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import hub
from ..backends import backend_class
from ..compiling import COMPILE_OPTIONS
from ..cpu import set_cpu_threads
from ..logs import pipeline_progress, progress_bar
from ..panels import panel_box
from .config import InferConfig
from .guards import warn_replacing
from .planning import Plan, check_inputs
from .sizing import working_mask
from .vae import apply_memory_settings, memory_record, memory_settings

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


def generate(plan: Plan, backend, pipe) -> tuple[list[Image.Image], list[int]]:
    """One composite per seed, denoised at the working size and resized back to the input's
    size, visible pixels pasted back; the images made in pipeline calls of up to --batch_size
    each."""
    [(_, outputs, seeds, _)] = generate_all([plan], backend, pipe)
    return outputs, seeds


def generate_all(plans: list[Plan], backend, pipe) -> Iterator[tuple[int, list[Image.Image], list[int], float]]:
    """Every plan's composites, in pipeline calls of up to --batch_size images that may span
    plans (`pipeline_calls`). Yields (plan index, composites, seeds, seconds) as soon as a
    plan's last image is made; its seconds are its share of the calls it was in (each call's
    time split evenly over the call's images). The plans differ in their input, prompt and
    mask only (folder mode's): every other setting is read from the first.

    Every image has its own generator (seed, seed + 1, ...) and its own copy of the input in
    the call. diffusers' inpaint pipelines sample the input's VAE posterior (and the masked
    input's) with generator i for input i only: one input beside several generators would
    leave generators 1.. a draw short of what a one-image call draws, so their noise, and
    their images, would differ. With a copy each, image i of a batch is the image a batch of
    one makes with its seed, up to the float rounding of batched kernels."""
    seeds = [_seeds(plan.cfg) for plan in plans]
    # What the images of one call must share: the working size, and whether there is an input.
    keys = [(plan.working.size, plan.image is None) for plan in plans]
    ready: dict[int, PipelineInput] = {}  # the inputs of unfinished plans, made when first needed
    outputs: dict[int, list[Image.Image]] = {i: [] for i in range(len(plans))}
    seconds = [0.0] * len(plans)
    total = sum(map(len, seeds))
    with progress_bar(total=total, desc="images", unit="image", disable=total < 2) as progress:
        for call in pipeline_calls(keys, seeds, plans[0].cfg.batch_size):
            start = time.monotonic()
            for i, _ in call:
                if i not in ready:
                    ready[i] = pipeline_input(plans[i], backend)
            results = call_pipeline(backend, pipe, [ready[i] for i, _ in call], [seed for _, seed in call])
            for (i, _), result in zip(call, results, strict=True):
                plan = plans[i]
                outputs[i].append(composite(result.resize(plan.size, Image.Resampling.LANCZOS), plan.image, plan.mask))
            share = (time.monotonic() - start) / len(call)
            for i, _ in call:
                seconds[i] += share
            progress.update(len(call))
            for i in dict.fromkeys(i for i, _ in call):
                if len(outputs[i]) == len(seeds[i]):
                    del ready[i]
                    yield i, outputs.pop(i), seeds[i], seconds[i]


def _seeds(cfg: InferConfig) -> list[int]:
    first = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
    return [first + i for i in range(cfg.num_images)]


def pipeline_calls(keys: list[Hashable], seeds: list[list[int]], batch_size: int) -> list[list[tuple[int, int]]]:
    """The one place images are grouped into pipeline calls: every (input index, seed), in
    input and seed order, those of inputs with one key (what a call must share) together, in
    runs of up to `batch_size`. An input of another size lands in another call."""
    by_key: dict[Hashable, list[tuple[int, int]]] = {}
    for i, (key, input_seeds) in enumerate(zip(keys, seeds, strict=True)):
        by_key.setdefault(key, []).extend((i, seed) for seed in input_seeds)
    return [call for images in by_key.values() for call in batches(images, batch_size)]


def batches(items: list, size: int) -> list[list]:
    """`items` in consecutive runs of `size` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass
class PipelineInput:
    """A plan as its pipeline calls take it."""

    plan: Plan
    image: Image.Image  # at the working size (mid-grey without an input)
    mask: torch.Tensor  # (1, 1, h, w) at the working size, soft
    prompt: dict[str, Any]  # backend.pipeline_prompt's arguments


def pipeline_input(plan: Plan, backend) -> PipelineInput:
    cfg = plan.cfg
    size = plan.working.size  # (width, height)
    blank = Image.new("RGB", size, (127, 127, 127))
    image = plan.image.resize(size, Image.Resampling.LANCZOS) if plan.image else blank
    hard_panels = None if cfg.mask_image or cfg.use_gradient_mask else plan.panels
    mask = working_mask(plan.mask, size, plan.grid, hard_panels)
    prompt = plan.prompt_arguments
    if prompt is None:
        prompt = backend.pipeline_prompt(cfg.prompt, cfg.negative_prompt, cfg.guidance_scale)
    return PipelineInput(plan, image, mask, prompt)


def call_pipeline(backend, pipe, inputs: list[PipelineInput], seeds: list[int]) -> list[Image.Image]:
    """One pipeline call: image k from inputs[k] with seeds[k]. The images of one input share
    its prompt and mask, passed once with num_images_per_prompt (a one-input run's call);
    images of several inputs bring their own each, stacked image by image (the pipelines
    repeat a shorter batch of masks or prompts, which would mix the inputs up)."""
    cfg = inputs[0].plan.cfg
    parts = inputs[:1] if all(x is inputs[0] for x in inputs) else inputs
    width, height = inputs[0].image.size
    mask = torch.cat([x.mask for x in parts])  # (1 or B, 1, H, W)
    accepted = inspect.signature(pipe.__call__).parameters
    kwargs = {
        **stack_prompts([x.prompt for x in parts]),
        "mask_image": mask, "height": height, "width": width,
        "strength": cfg.strength, "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale, "output_type": "pil",
    }
    if cfg.negative_prompt is not None and not any(k.startswith("negative_prompt") and k in accepted for k in kwargs):
        raise ValueError(f"--negative_prompt is not supported by {type(pipe).__name__}")
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    apply_memory_settings(pipe.vae, memory_settings(cfg.vae_tiling, width, height, len(inputs)))
    visible = cfg.blend_visible and inputs[0].plan.image is not None
    reset = backend.visible_reset(pipe, [x.image for x in parts], mask, seeds) if visible else {}
    return pipe(image=[x.image for x in inputs], generator=generators, num_images_per_prompt=len(inputs) // len(parts),
                **kwargs, **reset).images


def stack_prompts(prompts: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompt arguments of several images as one call takes them: tensors (embeddings) stacked
    on the batch axis, texts as a list. One image's come back as they are."""
    if len(prompts) == 1:
        return prompts[0]
    stacked = {}
    for name in prompts[0]:
        values = [p[name] for p in prompts]
        if all(isinstance(v, torch.Tensor) for v in values):
            stacked[name] = torch.cat(values)  # (B, ...)
        elif all(isinstance(v, str) for v in values):
            stacked[name] = values
        else:
            raise TypeError(f"prompt argument {name}: cannot stack {sorted({type(v).__name__ for v in values})}")
    return stacked


def composite(generated: Image.Image, original: Image.Image | None, mask: torch.Tensor) -> Image.Image:
    """mask * generated + (1 - mask) * original, in pixel space, through the same soft mask.
    Where the mask is 0 the original pixels are kept exactly."""
    if original is None:
        return generated
    m = mask[0].numpy()[..., None]  # (H, W, 1)
    gen = np.asarray(generated, dtype=np.float32)
    orig = np.asarray(original, dtype=np.float32)
    out = np.where(m > 0, m * gen + (1 - m) * orig, orig)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


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
