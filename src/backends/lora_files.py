"""Where LoRA files live on disk, writing them so an interruption leaves no half file, and
checking that a loaded LoRA was applied in full."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
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


# --save_precision NAME -> the dtype LoRA files are written in
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


LORA_FACTOR = re.compile(r"\.lora_(A|B|down|up)\.")  # the low-rank factors, in diffusers / PEFT and kohya keys


def cast_lora(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A LoRA state dict to save, its low-rank factors in `dtype` (nearly all of its bytes).
    The rest stays float32: `.alpha` scalars (16 bits would round an alpha that is not a whole
    number) and the full-layer difference SDXL concat puts beside them for ComfyUI, which must
    add up to the float32 conv_in.safetensors exactly."""
    return {k: (v.detach().to(dtype) if LORA_FACTOR.search(k) else v.detach()).contiguous() for k, v in state.items()}


def save_transformer_lora(pipeline_class, transformer, directory: Path, comfyui_state, compat: bool = True,
                          dtype: torch.dtype = torch.float16) -> None:
    """A transformer's trained LoRA as the diffusers pipeline class saves it, and with
    `compat` the ComfyUI file (`comfyui_state(transformer)`) beside it."""
    from peft.utils import get_peft_model_state_dict

    lora = cast_lora(get_peft_model_state_dict(transformer), dtype)
    # The alpha must travel with the weights (else loaders assume alpha = rank); dropout
    # must not: load_lora_weights leaves the new dropout layers in train mode, so a
    # nonzero value would make inference random.
    adapter_metadata = {**transformer.peft_config["default"].to_dict(), "lora_dropout": 0.0}
    pipeline_class.save_lora_weights(
        Path(directory),
        transformer_lora_layers=lora,
        transformer_lora_adapter_metadata=adapter_metadata,
        weight_name=LORA_WEIGHT_NAME,
    )
    if compat:
        atomic_save_file(cast_lora(comfyui_state(transformer), dtype), Path(directory) / COMFYUI_WEIGHT_NAME)


def load_transformer_lora(pipe, transformer, path: str | Path, conditioning: str, model: str,
                          precheck=None) -> None:
    """A transformer LoRA through the pipeline's own loader (ours, or a foreign file whose keys
    diffusers converts); refuses one that would not be applied in full, naming `model`.
    `precheck(path, lora_file)` refuses what the loader would drop without an error."""
    lora_file = resolve_lora_file(path)
    check_conditioning(path, conditioning)
    if precheck is not None:
        precheck(path, lora_file)
    with refuse_unreadable(path, model):
        converted = pipe.lora_state_dict(str(lora_file))
    expected = {k.removeprefix("transformer.").removesuffix(".lora_A.weight")
                for k in converted if k.startswith("transformer.") and k.endswith(".lora_A.weight")}
    if not expected:  # diffusers would load nothing, or fail on the first foreign key
        check_applied(path, expected, set(), model)
    before = set(lora_layers(transformer))
    with refuse_unreadable(path, model):
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    injected = set().union(*[m for a, m in lora_layers(transformer).items() if a not in before])
    check_applied(path, expected, injected, model)


def umask_modes() -> tuple[int, int]:
    """(file mode, folder mode) that the user's umask gives anything new: 0o644 / 0o755 under
    the usual umask 022."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask, 0o777 & ~umask


def match_umask(path: str | Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes of a new file or
    folder. safetensors writes its files 0600 and mkdtemp its folders 0700, which would hide
    a LoRA from a ComfyUI or web server running as another user."""
    path = Path(path)
    file_mode, folder_mode = umask_modes()
    if path.is_file():
        os.chmod(path, file_mode)
        return
    os.chmod(path, folder_mode)
    for parent, folders, files in os.walk(path):
        for name in folders:
            os.chmod(os.path.join(parent, name), folder_mode)
        for name in files:
            os.chmod(os.path.join(parent, name), file_mode)


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
        match_umask(tmp)
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
    try:
        yield tmp
        match_umask(tmp)  # what was written inside (safetensors: 0600) and the folder (mkdtemp: 0700)
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
