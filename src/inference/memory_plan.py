"""Inference's memory plan: which models are on the device in each phase of a run.

    load           the backend and its LoRA loaded, every model on the host (a quantized
                   denoiser on the GPU, where bitsandbytes loads it)
    text encoding  every prompt of the run encoded at once (every input of --input_dir),
                   the text encoders alone on the device (a quantized denoiser leaves it
                   first); the embeddings are kept on the host and the encoders go back
                   to the host before anything else runs
    denoising      per pipeline call: the denoiser and the VAE on the device, the input
                   encoded by the VAE, then the denoising steps (recorded as the decode starts)
    VAE decode     per pipeline call: the result decoded

The VAE stays on the device from the first pipeline call on: its weights are small (84M
parameters, 0.16 GiB in 16-bit, for SDXL's and FLUX.1's) beside the denoiser's, its activations
come while the denoiser's are freed, and diffusers' pipelines encode the input and decode
the result inside one call. So the text encoders (T5-XXL: ~9 GiB in bf16) and the denoiser
are never on the device together, and the peak is the larger of the two phases rather than
their sum. With --cpu_offload diffusers moves each model itself (model offload): nothing is
placed here, and the record says every model rests on the host.

With --memory_log FILE, each phase is recorded as training records its phases
(training/memory_log.py): where each model is and in which dtype (backends/placement.py),
the peak reserved and allocated GPU memory since the record before (CUDA) and host RSS.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..training.memory_log import MemoryLog


def inference_log(path: str | None) -> MemoryLog | None:
    """A MemoryLog writing to `path` (--memory_log), or None without one. Made before the
    models load: the load's GPU peak is the first record's."""
    if path is None:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    log = MemoryLog(Path(path).parent, torch.device("cuda" if torch.cuda.is_available() else "cpu"), main=True)
    log.path = Path(path)
    return log


def offloaded(pipe) -> bool:
    """Whether diffusers' model offload moves the pipeline's models (--cpu_offload)."""
    return any(hasattr(c, "_hf_hook") for c in pipe.components.values() if isinstance(c, torch.nn.Module))


def encode_prompts(plans: list, backend, pipe, memory: MemoryLog | None = None) -> None:
    """Every plan's prompt arguments not given already, encoded once per distinct prompt
    while the text encoders are on the device (alone there), kept on the host. Encoders a
    caller placed on the device (training's sample sheets without a text cache) stay there."""
    missing = [plan for plan in plans if plan.prompt_arguments is None]
    if not missing:
        return
    planned = not offloaded(pipe)
    placed = backend.is_placed("text_encoders")
    if planned and not placed:
        if backend.is_placed("denoiser"):  # a quantized one, loaded onto the GPU
            backend.place("denoiser", False)
        backend.place("text_encoders", True)
    encoded: dict[tuple, dict] = {}
    with torch.no_grad():
        for plan in missing:
            cfg = plan.cfg
            key = (cfg.prompt, cfg.negative_prompt, cfg.guidance_scale)
            if key not in encoded:
                arguments = backend.encoded_pipeline_prompt(*key)
                encoded[key] = {k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in arguments.items()}
            plan.prompt_arguments = encoded[key]
    if memory is not None:
        memory.record("text encoding", backend, 0)
    if planned and not placed:
        backend.place("text_encoders", False)


def denoiser_on_device(backend, pipe) -> None:
    """The denoiser and the VAE onto the device for the pipeline calls."""
    if not offloaded(pipe):
        for part in ("denoiser", "vae"):
            if not backend.is_placed(part):
                backend.place(part, True)


@contextmanager
def call_records(backend, vae, memory: MemoryLog | None, call: int):
    """One pipeline call's records: "denoising" as the VAE starts decoding (the peak since
    the text encoding or the call before: the input's encoding and the steps), "VAE decode"
    after the call."""
    if memory is None:
        yield
        return
    decode = vae.decode  # the bound method: every pipeline decodes through it
    started = []

    def recorded(*args, **kwargs):
        if not started:
            started.append(True)
            memory.record("denoising", backend, call)
        return decode(*args, **kwargs)

    vae.decode = recorded
    try:
        yield
    finally:
        del vae.decode  # the class's own again
    memory.record("VAE decode", backend, call)
