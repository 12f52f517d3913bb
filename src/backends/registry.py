"""What shared code knows of each backend before loading it: one `BackendSpec` per backend.

The trainer, inference, the commands and the web app read backend names, defaults and hints
from here, never from `if backend == ...` branches. A spec imports neither diffusers nor its
backend's module (`--backend sdxl` never imports FLUX code); `load()` imports the backend
class only when it is needed.

    from iclora.backends.registry import backend_names, backend_spec

    backend_spec("flux").infer_defaults["guidance_scale"]    # 3.5

A new backend registers its spec in a small module of its own (see sdxl_spec.py) and adds
one line to the list in backends/__init__.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

_SPECS: dict[str, "BackendSpec"] = {}


@dataclass(frozen=True)
class MemoryProfile:
    """What the memory estimate (prepare/memory.py) knows of a backend: its models and the
    activations fitted to the peaks measured on an H100 (benchmarks/RESULTS.md)."""

    parts: Callable[[], dict[str, Any]] = field(compare=False)
    """() -> {"denoiser": (subfolder, class), "text_encoders": [(subfolder, class)], "lora_targets": the LoRA's
    target modules, "extra_lora": (denoiser, conditioning) -> parameters trained in full, "shape": (denoiser,
    parameters) -> (its activations against the fitted model's, {blocks}), "shard_units": denoiser -> the blocks
    --distributed fsdp shards one by one; optionally "vae": the VAE's class (AutoencoderKL)}. Imports the model code."""
    activations: float
    """GiB of a training step's activations per unit (see text_tokens) per sample, 16-bit, checkpointed."""
    unchecked_activations: float | None = None
    """The same without gradient checkpointing (None: unmeasured, activations x NO_CHECKPOINTING_FACTOR)."""
    quantized_activations: float | None = None
    """The same with a quantized denoiser (None: as activations)."""
    text_tokens: int | None = None
    """None: the unit is a latent pixel; else a token, 2x2 latent patches plus this many text tokens."""
    per_token_modulation: bool = False
    """Whether context conditioning at t = 0 adds per-token modulation tensors (blocks 'double', 'single', 'width')."""
    modulation_tensors: Callable[[dict, bool], float] | None = field(default=None, compare=False)
    """({blocks}, checkpointing) -> how many (B, N, width) 16-bit per-token modulation tensors a step holds (None:
    FLUX.1's, 6 per double block and 3 per single block, one block's ~3x with checkpointing)."""
    extrapolated: str = ""
    """Where the activation figures come from when no row of this backend was measured ('' : measured); the
    memory line then says so ('activations extrapolated from FLUX.1') and marks its peak '~'."""
    vae_float32: bool = False
    """Whether the VAE stays float32 whatever the precision."""
    guidance_doubles_batch: bool = False
    """Whether classifier-free guidance runs the denoiser on twice the batch at inference."""
    suggest_quantize: bool = False
    """Whether --quantize nf4 is among the flags suggested to fit a memory budget."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    """The --backend value."""
    label: str
    """The model family's name in messages ('SDXL', 'FLUX.1')."""
    backend_class: str
    """'module:Class' of the backend (imported by `load()` only)."""
    train_defaults: Mapping[str, Any]
    """Training flags this backend's train command defaults to (model_id first; e.g. rank, conditioning)."""
    infer_defaults: Mapping[str, Any]
    """Inference flags this backend's infer command defaults to (num_inference_steps, guidance_scale)."""
    train_script: str
    """Module of the train command's script (src/training/train_*_ic_lora.py)."""
    infer_script: str
    """Module of the infer command's script (src/inference/*_ic_lora_inference.py)."""
    preferred_mixed_precision: str
    """Mixed precision on CUDA when --mixed_precision is not given ('fp16' or 'bf16')."""
    params_per_rank: int
    """Trainable LoRA parameters per unit of rank on the full-size model (the disk-space check)."""
    timestep_sampling: str = "uniform"
    """How noise levels are drawn when --timestep_sampling is not given."""
    timestep_shift: str = "none"
    """--timestep_shift auto on a new run."""
    resolution_shift: bool = False
    """Whether --timestep_shift resolution applies (the schedule depends on the image size)."""
    conditionings: tuple[str, ...] = ("concat", "blend", "context")
    """The --conditioning values the backend trains and runs."""
    concat_visible_loss_weight: float = 0.0
    """--visible_loss_weight default with --conditioning concat."""
    concat_trains_conv_in: bool = False
    """Whether concat trains the widened conv_in in full (--conv_in_learning_rate applies)."""
    lora_conv_targets: tuple[str, ...] = ()
    """The conv layers --lora_convs adds to the LoRA (PEFT target_modules names); () where there are none."""
    lora_convs: bool = False
    """--lora_convs on a new run that does not give it."""
    conv_params_per_rank: int = 0
    """What --lora_convs adds to params_per_rank."""
    max_token_lengths: tuple[int, ...] = (75, 150, 225)
    """The --max_token_length values the backend reads."""
    max_token_length_refusal: str = ""
    """The error line for any other --max_token_length."""
    caption_tokenizers: Callable[[str, int | None], list] | None = field(default=None, compare=False)
    """(model_id, --max_token_length) -> [(text encoder's name, its tokenizer, content tokens read)]: what the
    dry run counts each caption with. Loads tokenizers only."""
    inference_hint: Callable[[Any, Any, float], str | None] | None = field(default=None, compare=False)
    """(backend, pipeline, guidance_scale) -> a warning line for settings that give poor images, or None."""
    memory: MemoryProfile | None = None
    """What the memory estimates read (None: no measured activations, no estimate)."""
    lora_prefix: str = "transformer"
    """The key prefix of the denoiser's layers in a diffusers-format LoRA file ('unet.' / 'transformer.')."""
    lora_markers: str = ""
    """A regex found (re.search) in the LoRA module names only this backend's denoiser has: tells a LoRA file
    of this backend from another's under the same prefix (`iclora convert` without a recorded backend)."""
    merged_export: str = ""
    """'module:function' writing the base denoiser with a concat LoRA merged in (`iclora convert --export_unet`):
    (lora_path, base model, output folder, dtype) -> the folder written; '' where the backend has none."""
    comfyui_converter: str = ""
    """'module:function' writing the ComfyUI file from a diffusers-format LoRA (imported when converting):
    (modules {name: (lora_A, lora_B)}, scale, *, base, concat, lora_file) -> state dict."""

    @property
    def default_model(self) -> str:
        """The base model of training's --model_id and of inference without a recorded base."""
        return self.train_defaults["model_id"]

    def comfyui_file(self, modules, scale: float, **context) -> dict:
        """The ComfyUI file's tensors for a diffusers-format LoRA of this backend (see comfyui_converter)."""
        module, _, function = self.comfyui_converter.partition(":")
        return getattr(importlib.import_module(module), function)(modules, scale, **context)

    def export_merged(self, lora_path: str, base: str, folder, dtype) -> Any:
        """Write the base denoiser with a concat LoRA merged in (see merged_export)."""
        module, _, function = self.merged_export.partition(":")
        return getattr(importlib.import_module(module), function)(lora_path, base, folder, dtype)

    def load(self) -> type:
        """The backend class (imports its module: diffusers and the model code)."""
        module, _, cls = self.backend_class.partition(":")
        return getattr(importlib.import_module(module), cls)


def register(spec: BackendSpec) -> BackendSpec:
    """Make `spec.name` a --backend choice (a name registered again is replaced)."""
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _SPECS.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """The --backend choices, in registration order."""
    return tuple(_SPECS)


def backend_spec(name: str) -> BackendSpec:
    if name not in _SPECS:
        raise ValueError(f"--backend: unknown backend {name!r} (choose from {', '.join(_SPECS)})")
    return _SPECS[name]


class ByBackend(Mapping):
    """A read-only {backend name: spec attribute} view that follows the registry."""

    def __init__(self, attribute: str):
        self.attribute = attribute

    def __getitem__(self, name: str) -> Any:
        if name not in _SPECS:
            raise KeyError(name)
        return getattr(_SPECS[name], self.attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(_SPECS)

    def __len__(self) -> int:
        return len(_SPECS)

    def __repr__(self) -> str:
        return repr(dict(self))
