"""Where LoRA files live on disk, writing them so an interruption leaves no half file, and
checking that a loaded LoRA was applied in full."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers format (with adapter metadata)
COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"  # ComfyUI, A1111/Forge, kohya (SDXL)
CONV_IN_WEIGHT_NAME = "conv_in.safetensors"  # SDXL concat: the trained 9-channel conv_in
METADATA_NAME = "iclora_config.json"


def resolve_lora_file(path: str | Path) -> Path:
    """A LoRA folder (holding pytorch_lora_weights.safetensors) or one .safetensors file."""
    path = Path(path)
    if path.is_dir():
        file = path / LORA_WEIGHT_NAME
        if not file.is_file():
            hint = ""
            if (path / "trainable.safetensors").is_file():  # a checkpoint written before they held LoRA files
                hint = f" (an older checkpoint: python src/convert.py --lora_path {path} writes it)"
            raise FileNotFoundError(f"--lora_path {path}: folder has no {LORA_WEIGHT_NAME}{hint}")
        return file
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"--lora_path {path}: only .safetensors files are loaded")
        return path
    raise FileNotFoundError(f"--lora_path {path}: no such file or folder")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The training record written beside our LoRAs ({} for a foreign .safetensors file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = folder / METADATA_NAME
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
    except BaseException:  # a full disk: no half file stays behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it replaces `final` in one
    rename (an older `final` is moved aside first and removed after), on error it is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the result from everyone else
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def lora_layers(model: torch.nn.Module) -> dict[str, set[str]]:
    """{adapter name: names of the modules it was injected into} (PEFT LoRA layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for adapter in getattr(module, "lora_A", {}):
                found.setdefault(adapter, set()).add(name)
    return found


def check_applied(path: str | Path, expected: set[str], injected: set[str], model: str) -> None:
    """Refuse a LoRA none of whose layers landed in `model` (a silent run without LoRA);
    warn with counts when only some did."""
    if not expected:
        raise ValueError(f"--lora_path {path}: holds no LoRA layer for the {model}")
    applied = expected & injected
    if not applied:
        example = sorted(expected)[0]
        raise ValueError(
            f"--lora_path {path}: none of its {len(expected)} LoRA layers match the {model} (e.g. {example}): "
            "a LoRA for another model?"
        )
    if len(applied) < len(expected):
        missing = sorted(expected - injected)
        logger.warning("--lora_path %s: only %d of %d LoRA layers match the %s (not applied: %s, ...)",
                       path, len(applied), len(expected), model, missing[0])


@contextlib.contextmanager
def refuse_unreadable(path: str | Path, model: str) -> Iterator[None]:
    """diffusers' key converters fail on a LoRA for another model with assorted errors (and
    multi-line messages): one line naming the file instead."""
    try:
        yield
    except (ValueError, KeyError, IndexError, RuntimeError, AttributeError) as error:
        if str(error).startswith("--lora_path"):
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"--lora_path {path}: not a LoRA diffusers can apply to the {model} ({first})") from None


def check_conditioning(path: str | Path, conditioning: str) -> dict[str, Any]:
    """A concat LoRA carries trained input channels: refuse running it any other way. Returns
    the LoRA's training record."""
    meta = read_metadata(path)
    if meta.get("conditioning") == "concat" and conditioning != "concat":
        raise ValueError(
            f"--lora_path {path}: trained with --conditioning concat (mask and masked image as input "
            f"channels); it does not work with --conditioning {conditioning}"
        )
    return meta
