"""--compile: regional compilation of the denoiser, in training and in inference.

Only the blocks the denoiser repeats are compiled: SDXL's BasicTransformerBlock, FLUX's
double- and single-stream blocks (diffusers' `_repeated_blocks`, compiled by
`ModelMixin.compile_repeated_blocks`). Each block kind compiles once and every block of that
kind reuses the code (the weights are graph inputs): the tiny SDXL training step compiles
in ~35 s cold on 2 CPU cores, where compiling the whole model took ~4 minutes. Everything
between the blocks (embeddings, resnets, the per-token modulation's set-up) stays eager.

A backend's `compile_blocks` does it after the LoRA is injected (training) or loaded
(inference) and gradient checkpointing is set: the compiled blocks then run the LoRA layers
and run inside the checkpointed regions. Parameter names are untouched (no `_orig_mod.`
prefix), so checkpoints, resume and the saved LoRA files are the eager run's.

The first call of a compiled block compiles it; `CompiledBlocks` reports what that cost.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections import Counter
from typing import Any

import torch

logger = logging.getLogger(__name__)

# torch.compile's arguments for every compiled block. fallback_random: inductor draws random
# numbers (the LoRA dropout) from torch's generator in eager order instead of its own, so on
# the CPU a compiled run draws the eager run's dropout masks and trains the same numbers, to
# float rounding (without it: other masks, LoRA weights 8e-3 apart after 4 steps at lr 1e-3).
# On CUDA eager dropout has a kernel of its own, so the masks may differ there.
COMPILE_OPTIONS: dict[str, Any] = {"options": {"fallback_random": True}}


def unsupported(quantize: str | None, gradient_checkpointing: bool) -> str | None:
    """Why --compile cannot train with these settings, or None."""
    if quantize and gradient_checkpointing:
        # Measured with bitsandbytes 0.50 (4-bit, CPU): its layers cast their bias (int8: also
        # their weights) at their first call, so the checkpoint's recompute of a compiled block
        # traces other code than its forward saved tensors for.
        return (f"--compile with --quantize {quantize} and --gradient_checkpointing: bitsandbytes' quantized layers "
                "change their own state at their first call, so the checkpoint's recompute of a compiled block "
                "saves other tensors than its forward (torch.utils.checkpoint.CheckpointError); drop --compile or "
                "--gradient_checkpointing")
    return None


def check_compilable(device: torch.device | str) -> None:
    """Refuse --compile, before any model loads, where torch.compile's default backend has
    nothing to generate code with (inductor needs a C++ compiler on the CPU and triton on CUDA)."""
    kind = torch.device(device).type
    if kind == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("--compile needs triton on CUDA (torch.compile's inductor backend); pip install triton")
        return
    if kind != "cpu":
        return
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise ValueError("--compile on the CPU needs a C++ compiler (torch.compile's inductor backend found none: "
                         "install g++ or set CXX)") from None


def compiled_block_counts(module: torch.nn.Module) -> dict[str, int]:
    """How many submodules of each class `nn.Module.compile` (what compile_repeated_blocks
    calls) has compiled, e.g. {'BasicTransformerBlock': 70}."""
    compiled = (m for m in module.modules() if getattr(m, "_compiled_call_impl", None) is not None)
    return dict(Counter(type(m).__name__ for m in compiled))


class CompiledBlocks:
    """What a backend's `compile_blocks` compiled (`blocks`: count per block class) and the
    seconds of the denoiser's first call after it, compiling included (`first_call_seconds`,
    None until that call; forward hooks that remove themselves after it measure it)."""

    def __init__(self, blocks: dict[str, int], denoiser: torch.nn.Module):
        self.blocks = blocks
        self.first_call_seconds: float | None = None
        self._started = 0.0
        self._hooks = [denoiser.register_forward_pre_hook(self._start), denoiser.register_forward_hook(self._stop)]

    def _start(self, module, args) -> None:
        self._started = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        self.first_call_seconds = time.perf_counter() - self._started
        for hook in self._hooks:
            hook.remove()
        logger.info("--compile: the denoiser's first call took %.1f s, compiling its blocks included",
                    self.first_call_seconds)

    def record(self) -> dict[str, Any]:
        """For the inference JSON."""
        seconds = None if self.first_call_seconds is None else round(self.first_call_seconds, 3)
        return {"blocks": self.blocks, "first_call_seconds": seconds}
