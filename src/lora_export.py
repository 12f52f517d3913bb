"""Turn an existing LoRA into the files other programs load, and merge an SDXL concat LoRA
into a 9-channel UNet (what `src/convert.py` runs).

    convert()        <folder>/pytorch_lora_weights_comfyui.safetensors (or <stem>_comfyui for
                     a single file), from the diffusers-format file and its recorded alpha;
                     for a checkpoint of an older version (trainable weights only) all the
                     inference files, rebuilt through the backend
    export_unet()    <output_dir>/unet/: base UNet + LoRA merged + trained 9-channel conv_in
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file

from .backends.lora_files import (
    COMFYUI_WEIGHT_NAME,
    CONV_IN_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    METADATA_NAME,
    SAVE_DTYPES,
    atomic_save_file,
    atomic_write_text,
    cast_lora,
    match_umask,
    read_metadata,
    resolve_lora_file,
)
from .backends.lora_formats import guess_backend, peft_modules, peft_scale, read_lora_file
from .backends.registry import backend_names, backend_spec
from .hub import model_source

logger = logging.getLogger(__name__)
TRAINABLE_NAME, STATE_NAME = "trainable.safetensors", "trainer_state.json"  # a training checkpoint's
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ConvertConfig:
    """Write the LoRA file ComfyUI, A1111/Forge and kohya load in full (pytorch_lora_weights_comfyui.safetensors) for an existing LoRA; optionally merge an SDXL concat LoRA into a 9-channel UNet."""

    lora_path: str
    """An output folder (final_model/ or checkpoints/checkpoint-N, also one holding only trainable weights) or one diffusers-format .safetensors file."""
    output_dir: Optional[str] = None
    """Where the files go (default: beside the LoRA)."""
    base_model: Optional[str] = None
    """Base model id or folder (default: the one recorded in iclora_config.json). Read for an SDXL concat LoRA and --export_unet."""
    export_unet: bool = False
    """SDXL concat: also write unet/, the base UNet with the LoRA merged in and the trained 9-channel conv_in (StableDiffusionXLInpaintPipeline, ComfyUI's Load Diffusion Model)."""
    unet_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Weights dtype of the exported unet/."""
    backend: Optional[str] = None
    """The backend the LoRA is for (default: the one recorded in iclora_config.json, else told from its keys)."""
    save_precision: Optional[Literal["fp16", "bf16", "fp32"]] = None
    """Dtype of the LoRA files written (default: that of the LoRA read; from a checkpoint's trainable weights, fp16, or bf16
    when it trained in bf16)."""


def convert(cfg: ConvertConfig) -> list[Path]:
    """Write the ComfyUI/A1111/kohya file (and unet/ with --export_unet); returns what was written."""
    source = Path(cfg.lora_path)
    if source.is_dir() and not (source / LORA_WEIGHT_NAME).is_file() and (source / TRAINABLE_NAME).is_file():
        if cfg.export_unet:
            _check_exportable(json.loads((source / STATE_NAME).read_text())["run"])
        folder = Path(cfg.output_dir) if cfg.output_dir else source
        written = checkpoint_lora(source, folder, cfg.base_model, cfg.save_precision)
        if cfg.export_unet:
            written.append(export_unet(str(folder), read_metadata(folder)["base_model"], folder, DTYPES[cfg.unet_dtype]))
        return written
    lora_file = resolve_lora_file(cfg.lora_path)
    meta = read_metadata(cfg.lora_path)
    if cfg.export_unet:
        _check_exportable(meta)
    state, header = read_lora_file(lora_file)
    if cfg.backend and cfg.backend not in backend_names():
        raise ValueError(f"--backend: unknown backend {cfg.backend!r} (choose from {', '.join(backend_names())})")
    backend = cfg.backend or meta.get("backend") or guess_backend(state, f"--lora_path {lora_file}")
    if backend is None:
        raise ValueError(
            f"--lora_path {lora_file}: no diffusers-format keys (unet.* / transformer.*): already in another "
            "program's format?"
        )
    spec = backend_spec(backend)
    prefix = spec.lora_prefix
    scale = peft_scale(header, prefix)
    if scale is None:  # what diffusers assumes for a file without adapter metadata: alpha = rank
        logger.warning("%s records no LoRA alpha: written at scale 1 (alpha = rank), as diffusers loads it", lora_file)
        scale = 1.0
    modules = peft_modules(state, prefix)
    if not modules:
        raise ValueError(f"--lora_path {lora_file}: no LoRA layers under '{prefix}.'")
    base = cfg.base_model or meta.get("base_model")
    if base:  # before anything is written: an id the hub cannot serve fails here, in one line
        base = model_source(base, "--base_model" if cfg.base_model else f"--lora_path {cfg.lora_path}: its base model")
    concat = meta.get("conditioning") == "concat" or (lora_file.parent / CONV_IN_WEIGHT_NAME).is_file()
    out = spec.comfyui_file(modules, scale, base=base, concat=concat, lora_file=lora_file)

    folder = Path(cfg.output_dir) if cfg.output_dir else lora_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    name = COMFYUI_WEIGHT_NAME if Path(cfg.lora_path).is_dir() else f"{lora_file.stem}_comfyui.safetensors"
    dtype = SAVE_DTYPES[cfg.save_precision] if cfg.save_precision else next(iter(modules.values()))[0].dtype
    atomic_save_file(cast_lora(out, dtype), folder / name)
    written = [folder / name]
    if cfg.export_unet:
        written.append(export_unet(cfg.lora_path, base, folder, DTYPES[cfg.unet_dtype]))
    return written


def checkpoint_lora(checkpoint: Path, folder: Path, base_model: str | None, precision: str | None = None) -> list[Path]:
    """The inference files of a checkpoint written before checkpoints held them, rebuilt
    from its trainable weights and the run settings it records."""
    from .backends import load_backend

    state = json.loads((checkpoint / STATE_NAME).read_text())
    run = state["run"]
    dtype = SAVE_DTYPES[precision or ("bf16" if run.get("mixed_precision") == "bf16" else "fp16")]
    model_id = base_model or run["model_id"]
    backend = load_backend(run["backend"], model_source(model_id, "--base_model"), run["conditioning"])
    backend.base_model = model_id  # recorded as given, not as the cache folder it may load from
    backend.add_lora(run["lora_rank"], run["lora_alpha"], 0.0, convs=run.get("lora_convs", False))
    backend.load_trainable_state_dict(load_file(checkpoint / TRAINABLE_NAME))
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    backend.save_lora(folder, dtype=dtype)
    # What inference reads from a final model's record, as far as the checkpoint recorded it
    # (bucket_by since it exists; before, every run sized by the longer side).
    meta = {"backend": backend.name, "base_model": backend.base_model, "grid": run["grid"],
            "conditioning": backend.conditioning, "context_timestep": run.get("context_timestep"),
            "image_size": run["image_size"], "bucket_by": run.get("bucket_by") or "longest",
            "global_step": state["global_step"], "training_args": run}
    if run.get("max_token_length"):
        meta["max_token_length"] = run["max_token_length"]
    atomic_write_text(json.dumps(meta, indent=2), folder / METADATA_NAME)
    written = [folder / LORA_WEIGHT_NAME] + sorted(set(folder.iterdir()) - before - {folder / LORA_WEIGHT_NAME})
    for path in written:
        match_umask(path)  # diffusers' safetensors file is 0600
    return written


def _check_exportable(record: dict) -> None:
    """--export_unet: a concat LoRA of a backend that merges one into its denoiser (SDXL's 9-channel UNet)."""
    backend = record.get("backend")
    if not (backend in backend_names() and backend_spec(backend).merged_export and record.get("conditioning") == "concat"):
        labels = " / ".join(backend_spec(name).label for name in backend_names() if backend_spec(name).merged_export)
        raise ValueError(f"--export_unet is for {labels} concat LoRAs (FLUX.1-Fill and blend LoRAs load as LoRA files)")


def export_unet(lora_path: str, base: str | None, folder: Path, dtype: torch.dtype) -> Path:
    """<folder>/unet/: the base denoiser with the concat LoRA merged in and its trained
    conv_in (the backend's merged_export)."""
    record = read_metadata(lora_path)
    _check_exportable(record)
    if not base:
        raise ValueError(f"--lora_path {lora_path}: no base model recorded; give --base_model")
    return backend_spec(record["backend"]).export_merged(lora_path, base, folder, dtype)
