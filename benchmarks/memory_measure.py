"""One phase of train_memory.py: set a training step up, time it, read its memory, count it.

`run_ours` is the trainer's step (Trainer.setup's order, diffusion_loss + backward + clip +
optimizer step); `run_reference` is diffusers' dreambooth LoRA step at the same settings.
Both go through `measure`: median s/step after warm-up, CUDA memory peaks, and FLOPs of one
step and of its forward (FlopCounterMode). `matmul_peak` measures the MFU denominator.
Imported by benchmarks/train_memory.py (benchmarks/ is no package).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import platform
import statistics
import sys
import time
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from iclora.backends.registry import backend_spec
from iclora.compiling import COMPILE_OPTIONS
from iclora.training.config import TrainConfig
from memory_models import FAMILIES, SEED, make_backend  # a sibling in benchmarks/ (see train_memory.py)

GIB = 2**30
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
LR, WEIGHT_DECAY, MAX_GRAD_NORM = (TRAIN_DEFAULTS[k] for k in ("learning_rate", "weight_decay", "max_grad_norm"))
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


@dataclass(frozen=True)
class Setting:
    model: str  # sdxl | flux
    size: tuple[int, int]  # (width, height) in pixels
    batch_size: int
    rank: int
    checkpointing: bool
    adam8bit: bool
    precision: str  # fp16 | bf16 | no
    nf4: bool


@dataclass(frozen=True)
class RunOptions:
    """Everything besides the setting that decides what a worker runs."""

    tiny: bool
    device: str
    warmup: int
    steps: int
    lora_dropout: float
    compile: bool
    channels_last: bool
    reference: bool
    cpu_threads: int | None  # torch intra-op threads; None leaves torch's default


# ---- one phase: set up, time, count ---------------------------------------------------------


def fresh_accelerator(precision: str, device: torch.device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precisions fp16 needs a CUDA device (accelerate has no fp16 autocast on CPU): use bf16")
    AcceleratorState._reset_state(reset_partial_state=True)  # each setting has its own mixed precision
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")


def make_optimizer(params, adam8bit: bool):
    if adam8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=LR, weight_decay=WEIGHT_DECAY), "adamw8bit"
    try:
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True), "adamw-fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY), "adamw"


def make_inputs(family, config: dict, setting: Setting, device, dtype, masked_dtype) -> dict[str, Any]:
    """What the trainer hands `diffusion_loss`, at the real shapes: latents in the weight
    dtype, a 2x2 grid with three panels masked, cached text embeddings, the collated extras."""
    from iclora.panels import Grid, latent_mask, panel_mask

    width, height = setting.size
    b = setting.batch_size
    latents = torch.randn(b, *family.latent_shape(config, height, width), device=device, dtype=dtype)
    f = width // latents.shape[-1]  # pixels per contract latent pixel: 8, or 16 for FLUX.2's patchified latents
    pixel_mask = torch.stack([panel_mask([1, 2, 3], Grid.parse("2x2"), height, width)] * b).to(device)  # (B, 1, H, W)
    return {
        "latents": latents,  # (B, C, h, w)
        "mask": latent_mask(pixel_mask, f).to(dtype),  # (B, 1, h, w)
        "masked_latents": torch.randn(latents.shape, device=device, dtype=masked_dtype),
        "prompt_embeds": family.prompt_embeds(config, b, device, dtype),
        "batch": {"original_size": torch.tensor([[height, width]] * b), "crop_top_left": torch.zeros(b, 2, dtype=torch.long)},
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flop_formulas() -> dict:
    """FLOP formulas FlopCounterMode lacks: the fused NF4 matmul bitsandbytes runs in its
    forward (`bitsandbytes::gemm_4bit`, on every device; its backward is a plain matmul) and
    PyTorch's CPU flash attention. Without them NF4 forwards count as zero."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def gemm_4bit(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(a_shape) * shape_b[0]  # A (..., K) @ W(N, K).T

    def cpu_sdpa(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    def cpu_sdpa_backward(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)

    return {
        torch.ops.bitsandbytes.gemm_4bit: gemm_4bit,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward,
    }


def measure(device, warmup: int, steps: int, step: Callable[[int], torch.Tensor],
            forward: Callable[[int], torch.Tensor], eager: Callable[[], Any]) -> dict[str, Any]:
    """Time warm-up + steps (synchronised, as the trainer's per-step loss.item() is), read the
    memory peaks, then count the FLOPs of one more step and of its forward alone (autograd
    on, so the same kernels run: bitsandbytes takes another path under no_grad). `eager()`
    swaps a compiled module back for the count: FlopCounterMode sees eager ops only."""
    from torch.utils.flop_counter import FlopCounterMode

    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        loss = step(i).detach().float().item()
        _sync(device)
        times.append(time.perf_counter() - start)
    result: dict[str, Any] = {"times": times, "s_per_step": statistics.median(times[warmup:]), "loss": loss}
    if device.type == "cuda":
        result["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    formulas = flop_formulas()
    with eager():
        with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
            step(warmup + steps)
        result["step_flops"] = counter.get_total_flops()
        with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
            forward(warmup + steps + 1)  # with autograd on: the step's own forward kernels
        result["forward_flops"] = counter.get_total_flops()
    return result


@contextlib.contextmanager
def _eager_blocks(model: torch.nn.Module):
    """The blocks `nn.Module.compile` compiled run eager inside (as compile_repeated_blocks
    leaves them: the compiled call in `_compiled_call_impl`)."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if m._compiled_call_impl is not None]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in compiled:
            module._compiled_call_impl = call


def maybe_compile(model: torch.nn.Module, compile_blocks: Callable[[], Any], enabled: bool) -> Callable[[], Any]:
    """Regional compilation of `model` by `compile_blocks` when enabled (the trainer's
    --compile); returns the context in which its blocks run eager again."""
    if enabled:
        compile_blocks()
    return lambda: _eager_blocks(model)


def run_ours(setting: Setting, opts: RunOptions) -> dict[str, Any]:
    """The trainer's set-up (Trainer.setup order) and step (Trainer.train around diffusion_loss)."""
    from diffusers.optimization import get_scheduler

    from iclora.training.run_setup import parameter_groups
    from iclora.training.trainer import diffusion_loss, optimizer_step, step_generator

    family, device = FAMILIES[setting.model], torch.device(opts.device)
    accelerator = fresh_accelerator(setting.precision, device)
    dtype = WEIGHT_DTYPES[setting.precision]
    config = family.config(opts.tiny)
    backend = make_backend(family, family.build(config, device, dtype, setting.nf4))
    # The trainer's LoRA: SDXL's on the ResNet convs too (--lora_convs, its default), as the
    # reference step below (family.lora_targets).
    backend.add_lora(setting.rank, setting.rank, opts.lora_dropout, convs=backend_spec(backend.name).lora_convs)
    if setting.checkpointing:
        backend.enable_gradient_checkpointing()
    backend.to(device, dtype)
    backend.release_text_encoders()  # as with --cache_text_embeddings
    if opts.channels_last:
        backend.denoiser.to(memory_format=torch.channels_last)
    # The trainer's groups: SDXL concat's conv_in without weight decay.
    params = parameter_groups(backend, types.SimpleNamespace(conv_in_learning_rate=None))
    optimizer, optimizer_name = make_optimizer(params, setting.adam8bit)
    lr_scheduler = get_scheduler("constant", optimizer)
    backend.denoiser, optimizer, lr_scheduler = accelerator.prepare(backend.denoiser, optimizer, lr_scheduler)
    eager = maybe_compile(backend.denoiser, lambda: backend.compile_blocks(**COMPILE_OPTIONS), opts.compile)
    backend.denoiser.train()
    inputs = make_inputs(family, config, setting, device, dtype, backend.vae.dtype)
    skipped = 0

    def forward(i: int) -> torch.Tensor:
        return diffusion_loss(backend, inputs["latents"], inputs["mask"], inputs["masked_latents"],
                              inputs["prompt_embeds"], inputs["batch"], step_generator(SEED, i, 0), 0.0)

    def step(i: int) -> torch.Tensor:
        nonlocal skipped
        with accelerator.accumulate(backend.denoiser):
            loss = forward(i)
            optimizer_step(accelerator, optimizer, lr_scheduler, loss, MAX_GRAD_NORM)
        skipped += int(accelerator.optimizer_step_was_skipped)
        return loss

    result = measure(device, opts.warmup, opts.steps, step, forward, eager)
    result.update(optimizer=optimizer_name, skipped_steps=skipped)
    accelerator.free_memory()
    return result


def run_reference(setting: Setting, opts: RunOptions) -> dict[str, Any]:
    """diffusers' dreambooth LoRA step at equal settings: the architecture ours trains (after
    our backend's changes), our LoRA targets, rank/alpha/dropout, optimizer, precision,
    checkpointing; LoRA weights in float32 (cast_training_params) as ours."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    family, device = FAMILIES[setting.model], torch.device(opts.device)
    accelerator = fresh_accelerator(setting.precision, device)
    dtype = WEIGHT_DTYPES[setting.precision]
    config = family.config(opts.tiny)
    scheduler = family.reference_scheduler(family.stand_ins()["scheduler"])  # the real model's config

    ref = types.SimpleNamespace(model=family.build(family.reference_config(config), device, dtype, setting.nf4))
    ref.model.requires_grad_(False)
    if setting.nf4:  # as diffusers' FLUX LoRA scripts after a quantized load
        from iclora.backends.flux import prepare_quantized

        prepare_quantized(ref.model)
    if setting.checkpointing:
        ref.model.enable_gradient_checkpointing()
    ref.model.add_adapter(LoraConfig(r=setting.rank, lora_alpha=setting.rank, lora_dropout=opts.lora_dropout,
                                     init_lora_weights="gaussian", target_modules=family.lora_targets()))
    cast_training_params(ref.model, dtype=torch.float32)
    if opts.channels_last:
        ref.model.to(memory_format=torch.channels_last)
    params = [p for p in ref.model.parameters() if p.requires_grad]
    optimizer, optimizer_name = make_optimizer(params, setting.adam8bit)
    lr_scheduler = get_scheduler("constant", optimizer)
    ref.model, optimizer, lr_scheduler = accelerator.prepare(ref.model, optimizer, lr_scheduler)
    eager = maybe_compile(ref.model, lambda: ref.model.compile_repeated_blocks(**COMPILE_OPTIONS), opts.compile)
    ref.model.train()
    inputs = make_inputs(family, config, setting, device, dtype, torch.float32)  # (SDXL's VAE output dtype)
    skipped = 0

    def forward(i: int) -> torch.Tensor:
        return family.reference_loss(ref.model, scheduler, inputs, dtype)

    def step(i: int) -> torch.Tensor:
        nonlocal skipped
        loss = forward(i)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        skipped += int(accelerator.optimizer_step_was_skipped)
        return loss

    result = measure(device, opts.warmup, opts.steps, step, forward, eager)
    result.update(optimizer=optimizer_name, skipped_steps=skipped)
    accelerator.free_memory()
    return result


def _guard(phase: Callable[[], dict], device: torch.device) -> dict:
    """Run a phase; an out-of-memory becomes a result, and the memory is given back either way."""
    if device.type == "cuda" and torch.cuda.memory_allocated(device) > 64 * 2**20:
        print(f"warning: {torch.cuda.memory_allocated(device) / GIB:.2f} GiB still allocated from an earlier phase "
              "is counted in this one's peaks: use --isolate process", file=sys.stderr)
    try:
        return phase()
    except torch.cuda.OutOfMemoryError as error:
        return {"error": "OOM", "detail": str(error).splitlines()[0]}
    finally:
        _free(device)


def run_setting(setting: Setting, opts: RunOptions) -> dict[str, Any]:
    """Ours, then the reference, each from a freshly built model, in this process."""
    device = torch.device(opts.device)
    torch.manual_seed(SEED)
    result = {"setting": dataclasses.asdict(setting), "ours": _guard(lambda: run_ours(setting, opts), device)}
    if opts.reference:
        torch.manual_seed(SEED)
        result["reference"] = _guard(lambda: run_reference(setting, opts), device)
    return result


def matmul_peak(device: torch.device) -> dict[str, Any]:
    """Measured dense bf16 matmul throughput (FLOP/s): the MFU denominator. None off CUDA."""
    if device.type != "cuda":
        threads = torch.get_num_threads()
        name = f"CPU {platform.processor() or platform.machine()} ({threads} thread{'s' * (threads != 1)})"
        return {"peak_flops": None, "device_name": name}
    n, iters, best = 8192, 50, 0.0
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(5):
        torch.mm(a, b, out=out)
    for _ in range(5):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    del a, b, out
    _free(device)
    return {"peak_flops": best, "device_name": torch.cuda.get_device_name(device)}
