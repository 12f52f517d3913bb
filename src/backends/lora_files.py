"""Where LoRA files live on disk, and writing them so an interruption leaves no half file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "iclora_config.json"


def resolve_lora_file(path: str | Path) -> Path:
    """A LoRA folder (holding pytorch_lora_weights.safetensors) or one .safetensors file."""
    path = Path(path)
    if path.is_dir():
        file = path / LORA_WEIGHT_NAME
        if not file.is_file():
            raise FileNotFoundError(f"--lora_path {path}: folder has no {LORA_WEIGHT_NAME}")
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
