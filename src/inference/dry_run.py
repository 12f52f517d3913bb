"""--dry_run at inference: the plan and the memory it needs, with no weights loaded and
nothing written.

    python src/inference/flux_ic_lora_inference.py --lora_path output/final_model \
        --input_image composite.png --prompt "..." --panels_to_inpaint 2 --dry_run

Prints what a run would do: the base model and LoRA, each input with its working size
(sizing.py), the pipeline calls its images are made in (generation.pipeline_calls) and what
the VAE does in them (vae.py), then the memory estimate from the base model's configs built
on the meta device (prepare/memory.py), ending with one line

    memory: peak 9.6 GiB on the GPU (denoising), 21 GiB host RAM

The estimate is for a GPU run (the dtype a GPU run takes, unless --dtype says another),
whatever machine runs the dry run. When it does not fit --gpu_memory_gib, the flags that
would are named.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .. import hub
from ..backends import backend_class, backend_spec
from ..backends.lora_files import resolve_lora_file
from ..prepare.memory import Estimate, default_budget, estimable, model_sizes
from ..prepare.memory_inference import InferSettings, inference_estimate
from .config import InferConfig
from .generation import pipeline_calls
from .inpaint import vae_source
from .planning import Plan
from .vae import memory_settings

PRECISIONS = {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}  # --dtype -> the estimate's precision


@dataclass
class InferDryRun:
    plans: list[Plan]
    calls: list[list[tuple[int, int]]]  # (input index, image index) per pipeline call
    memory: Estimate | None  # None when the base model's configs cannot be read


def lora_parameters(lora_path: str) -> int:
    """Parameters in the LoRA file, read from its header (no tensor is loaded); 0 for 'none'."""
    from safetensors import safe_open

    if lora_path.lower() == "none":
        return 0
    total = 0
    with safe_open(str(resolve_lora_file(lora_path)), framework="pt") as file:
        for key in file.keys():
            count = 1
            for n in file.get_slice(key).get_shape():
                count *= n
            total += count
    return total


def settings_of(plans: list[Plan], calls: list[list[tuple[int, int]]], lora: int) -> InferSettings:
    """The estimate's settings for the largest pipeline call (pixels x images)."""
    cfg = plans[0].cfg
    largest = max(calls, key=lambda call: len(call) * _pixels(plans[call[0][0]]))
    width, height = plans[largest[0][0]].working.size
    batch = len(largest)
    vae = memory_settings(cfg.vae_tiling, width, height, batch)
    precision = PRECISIONS[cfg.dtype] if cfg.dtype else backend_class(cfg.backend).preferred_mixed_precision
    return InferSettings(height, width, batch, precision, cfg.quantize, cfg.guidance_scale, vae["tiling"],
                         vae["slicing"], cfg.cpu_offload, lora, plans[0].conditioning, plans[0].context_timestep)


def _pixels(plan: Plan) -> int:
    width, height = plan.working.size
    return width * height


def fit(sizes, s: InferSettings, budget: float) -> tuple[list[str], Estimate]:
    """The flags that bring the estimate under `budget` GiB, tried in this order (each kept
    when it lowers the estimate), and the estimate with them."""
    steps = []
    if not (s.tiling and s.slicing):
        steps.append(("--vae_tiling on", lambda s: replace(s, tiling=True, slicing=True)))
    if s.batch > 1:
        steps.append(("--batch_size 1", lambda s: replace(s, batch=1, slicing=True)))
    if backend_spec(sizes.backend).memory.suggest_quantize and not s.quantize:  # a backend bitsandbytes loads
        steps.append(("--quantize nf4", lambda s: replace(s, quantize="nf4")))
    if not s.cpu_offload:
        steps.append(("--cpu_offload", lambda s: replace(s, cpu_offload=True)))
    flags, current = [], inference_estimate(sizes, s)
    for flag, change in steps:
        if current.peak <= budget:
            break
        tried = inference_estimate(sizes, change(s))
        if tried.peak < current.peak:  # a flag that changes nothing here is not named
            s, current = change(s), tried
            flags.append(flag)
    return flags, current


def dry_run(cfg: InferConfig) -> InferDryRun:
    if cfg.input_dir:
        from .folder import check_folder

        plans = check_folder(cfg)
    else:
        from .planning import check_inputs

        plans = [check_inputs(cfg)]
    first = plans[0]
    # Before anything is printed: an id neither cached nor reachable fails in one line.
    flag = "--base_model" if cfg.base_model else f"--lora_path {cfg.lora_path}: its base model"
    source = hub.model_source(first.base_model, flag)
    vae_source(first)
    keys = [(plan.working.size, plan.image is None) for plan in plans]
    calls = pipeline_calls(keys, [list(range(plan.cfg.num_images)) for plan in plans], cfg.batch_size)
    lora = lora_parameters(cfg.lora_path)
    conditioning = f", {first.conditioning} conditioning" if first.conditioning else ""
    print(f"base model: {first.base_model} ({cfg.backend}{conditioning})")
    print(f"LoRA: {cfg.lora_path}" + (f" ({lora:,} parameters)" if lora else ""))
    for plan in plans:
        name = Path(plan.cfg.input_image).name if plan.image is not None else "(generated from the prompt)"
        width, height = plan.working.size
        print(f"input {name} {plan.size[0]}x{plan.size[1]}: working size {width}x{height} ({plan.working.source}), "
              f"panels {plan.panels}, {plan.cfg.num_images} image(s)")
    for i, call in enumerate(calls):
        width, height = plans[call[0][0]].working.size
        vae = memory_settings(cfg.vae_tiling, width, height, len(call))
        print(f"pipeline call {i + 1} of {len(calls)}: {len(call)} image(s) at {width}x{height}, "
              f"{cfg.num_inference_steps} steps; VAE tiling {'on' if vae['tiling'] else 'off'}, "
              f"slicing {'on' if vae['slicing'] else 'off'}")
    return InferDryRun(plans, calls, report(cfg, first, source, settings_of(plans, calls, lora)))


def report(cfg: InferConfig, plan: Plan, source: str, s: InferSettings) -> Estimate | None:
    """Print the estimate per phase, the flags that would make it fit --gpu_memory_gib when
    it does not, and the memory line last."""
    if not estimable(cfg.backend):
        print(f"memory: no estimate: --backend {cfg.backend} has no measured activations yet")
        return None
    try:
        sizes = model_sizes(cfg.backend, source, 1, plan.conditioning or "blend")
    except (OSError, ValueError) as error:
        print(f"memory: no estimate: the configs of {plan.base_model} cannot be read ({error})")
        return None
    budget = cfg.gpu_memory_gib if cfg.gpu_memory_gib is not None else default_budget()
    current = inference_estimate(sizes, s)
    print(f"memory per phase (GiB on the GPU, {s.width}x{s.height}, batch {s.batch}, estimated): "
          + ", ".join(f"{k} {v:.1f}" for k, v in current.gpu.items()))
    if current.peak > budget:
        flags, fitted = fit(sizes, s, budget)
        if fitted.peak <= budget:
            print(f"does not fit --gpu_memory_gib {budget:g}: add {' '.join(flags)} "
                  f"(estimate {fitted.peak:.1f} GiB, {fitted.peak_phase})")
        else:
            print(f"does not fit --gpu_memory_gib {budget:g}, nor with {' '.join(flags)} "
                  f"({fitted.peak:.1f} GiB): use a larger GPU")
    print(current.line())
    return current
