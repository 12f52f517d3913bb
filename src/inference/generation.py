"""Generation: a Plan's composites from the backend's inpaint pipeline.

    generate()       one input's images at the working size (sizing.py), --batch_size images
                     a call, the VAE tiled or sliced as vae.py decides
    generate_all()   the same for many inputs (--input_dir), batched across inputs
    composite()      generated (resized back) and original pixels through the same (soft) mask

pipeline_calls() is the one place images are grouped into calls; call_pipeline() makes one.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..logs import progress_bar
from .config import InferConfig
from .memory_plan import call_records, denoiser_on_device, encode_prompts
from .planning import Plan
from .sizing import working_mask
from .vae import apply_memory_settings, memory_settings


def generate(plan: Plan, backend, pipe, memory=None) -> tuple[list[Image.Image], list[int]]:
    """One composite per seed, denoised at the working size and resized back to the input's
    size, visible pixels pasted back; the images made in pipeline calls of up to --batch_size
    each."""
    [(_, outputs, seeds, _)] = generate_all([plan], backend, pipe, memory)
    return outputs, seeds


def generate_all(plans: list[Plan], backend, pipe, memory=None) -> Iterator[tuple[int, list[Image.Image], list[int], float]]:
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
    one makes with its seed, up to the float rounding of batched kernels.

    The models move as memory_plan.py plans: every prompt encoded first, the text encoders
    then off the device, the denoiser and the VAE on it for the calls; `memory` (a
    training.memory_log.MemoryLog) records each phase."""
    seeds = [_seeds(plan.cfg) for plan in plans]
    encode_prompts(plans, backend, pipe, memory)
    denoiser_on_device(backend, pipe)
    # What the images of one call must share: the working size, and whether there is an input.
    keys = [(plan.working.size, plan.image is None) for plan in plans]
    ready: dict[int, PipelineInput] = {}  # the inputs of unfinished plans, made when first needed
    outputs: dict[int, list[Image.Image]] = {i: [] for i in range(len(plans))}
    seconds = [0.0] * len(plans)
    total = sum(map(len, seeds))
    with progress_bar(total=total, desc="images", unit="image", disable=total < 2) as progress:
        for number, call in enumerate(pipeline_calls(keys, seeds, plans[0].cfg.batch_size), 1):
            start = time.monotonic()
            for i, _ in call:
                if i not in ready:
                    ready[i] = pipeline_input(plans[i])
            with call_records(backend, pipe.vae, memory, number):
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
    prompt: dict[str, Any]  # backend.encoded_pipeline_prompt's arguments (embeddings, on the host)


def pipeline_input(plan: Plan) -> PipelineInput:
    cfg = plan.cfg
    size = plan.working.size  # (width, height)
    blank = Image.new("RGB", size, (127, 127, 127))
    image = plan.image.resize(size, Image.Resampling.LANCZOS) if plan.image else blank
    hard_panels = None if cfg.mask_image or cfg.use_gradient_mask else plan.panels
    mask = working_mask(plan.mask, size, plan.grid, hard_panels)
    return PipelineInput(plan, image, mask, plan.prompt_arguments)


def call_pipeline(backend, pipe, inputs: list[PipelineInput], seeds: list[int]) -> list[Image.Image]:
    """One pipeline call: image k from inputs[k] with seeds[k]. The images of one input share
    its mask, passed once (a one-input run's call); images of several inputs bring their own
    each, stacked image by image (the pipelines repeat a shorter batch of masks, which would
    mix the inputs up). The prompt embeddings come one row per image, on the pipeline's
    device (FLUX.1's pipelines neither repeat given embeddings per image nor move them)."""
    cfg = inputs[0].plan.cfg
    parts = inputs[:1] if all(x is inputs[0] for x in inputs) else inputs
    width, height = inputs[0].image.size
    mask = torch.cat([x.mask for x in parts])  # (1 or B, 1, H, W)
    accepted = inspect.signature(pipe.__call__).parameters
    device = pipe._execution_device
    prompts = {k: v.to(device) if isinstance(v, torch.Tensor) else v
               for k, v in stack_prompts([x.prompt for x in inputs]).items()}
    kwargs = {
        **prompts,
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
    return pipe(image=[x.image for x in inputs], generator=generators, **kwargs, **reset).images


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
