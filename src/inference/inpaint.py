"""Shared panel-inpainting inference for every backend: one --input_image, its steps in order.

    check_inputs()   every user error, before any model is loaded or file written (planning.py)
    load_pipeline()  the backend with the LoRA loaded, its inpaint pipeline, the device set (here)
    generate()       the backend's diffusers inpaint pipeline at the working size (sizing.py),
                     --batch_size images a call, the VAE tiled or sliced as vae.py decides (generation.py)
    generate_all()   the same for many inputs (--input_dir), batched across inputs (generation.py)
    composite()      generated (resized back) and original pixels through the same (soft) mask
                     (generation.py)
    write_outputs()  composites, panels, comparison and JSON, each via temp name + rename
                     (output_files.py)

run() chains them; folder.py runs an --input_dir through the same steps. This module hands
the steps' names on, so callers import them from one place.

The denoising itself is diffusers': StableDiffusionXLInpaintPipeline (9-channel `concat`
UNets get mask + masked-image latents as input; 4-channel `blend` ones get latent
blending of the visible panels each step), FluxInpaintPipeline / FluxFillPipeline for
FLUX; with `context` conditioning the backend's SDXLContextPipeline / FluxContextPipeline
(the same components, a loop that feeds the visible panels clean at every step). We swap
its mask processor for one that does not binarize, so feathered masks stay soft through
the whole pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import hub
from ..backends import backend_spec
from ..compiling import COMPILE_OPTIONS
from ..cpu import set_cpu_threads
from ..logs import pipeline_progress
from .config import InferConfig
from .generation import batches, composite, generate, generate_all, pipeline_calls
from .guards import warn_replacing
from .memory_plan import inference_log
from .output_files import COMPARISON_GAP, comparison_image, resolved_settings, write_outputs
from .planning import Plan, check_inputs

logger = logging.getLogger(__name__)


def load_pipeline(plan: Plan):
    """The backend with the LoRA loaded, and its inpaint pipeline ready: every model in the
    run's dtype on the host (a quantized denoiser on the GPU), the device set; generation
    moves each onto it for its phase (memory_plan.py)."""
    from diffusers.image_processor import VaeImageProcessor

    from ..backends import load_backend

    cfg = plan.cfg
    cuda = torch.cuda.is_available()
    set_cpu_threads(plan.base_model, "cuda" if cuda else "cpu")
    native = {"fp16": torch.float16, "bf16": torch.bfloat16}[backend_spec(cfg.backend).preferred_mixed_precision]
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else (native if cuda else torch.float32)
    options = {"variant": cfg.variant}
    if cfg.quantize:
        options["quantize"] = cfg.quantize
    if dtype != torch.float32:
        # Loaded in it, quantized or not: no float32 copy of the text encoders on the host.
        options["dtype"] = dtype
    if plan.context_timestep:
        options["context_timestep"] = plan.context_timestep
    flag = "--base_model" if cfg.base_model else f"--lora_path {cfg.lora_path}: its base model"
    source = hub.model_source(plan.base_model, flag)  # before any output is written
    options["vae"] = vae_source(plan)
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
    else:
        # Nothing moves yet: generation places each part on the device for its phase
        # (memory_plan.py), so the text encoders and the denoiser never share it.
        backend.set_device(torch.device("cuda" if cuda else "cpu"))
    if cfg.compile:  # after the LoRA is loaded: the compiled blocks run its layers
        backend.compile_blocks(**COMPILE_OPTIONS)
    pipeline_progress(pipe, desc="denoising", leave=False)
    hint = backend_spec(cfg.backend).inference_hint  # settings the base is known to render poorly
    if hint and (line := hint(backend, pipe, cfg.guidance_scale)):
        logger.warning(line)
    return backend, pipe


def vae_source(plan: Plan) -> str | None:
    """Where --pretrained_vae (or the one recorded with the LoRA) loads from; an id neither
    cached nor reachable fails here, in one line, as the base model's does."""
    if plan.pretrained_vae is None:
        return None
    cfg = plan.cfg
    flag = "--pretrained_vae" if cfg.pretrained_vae else f"--lora_path {cfg.lora_path}: its --pretrained_vae"
    return hub.model_source(plan.pretrained_vae, flag)


def run(cfg: InferConfig) -> list[Path]:
    """One --input_image (folder.run_folder runs an --input_dir with this module's steps)."""
    if cfg.input_dir:
        raise ValueError("--input_dir: a folder runs through iclora.inference.folder.run_folder")
    plan = check_inputs(cfg)
    warn_replacing(Path(cfg.output_dir), [plan.stem])
    memory = inference_log(cfg.memory_log)
    backend, pipe = load_pipeline(plan)
    if memory is not None:
        memory.record("load", backend, 0)
    outputs, seeds = generate(plan, backend, pipe, memory)
    return write_outputs(plan, outputs, seeds, resolved_settings(plan, backend))


# The steps' public names, as the web app, the trainer's samples and the benchmarks import them.
__all__ = ["COMPARISON_GAP", "Plan", "batches", "check_inputs", "comparison_image", "composite",
           "generate", "generate_all", "load_pipeline", "pipeline_calls", "resolved_settings", "run", "write_outputs"]
