"""LoRA files for the programs people run LoRAs in, from the diffusers/PEFT state dict.

What each program reads (ComfyUI: comfy/lora.py `model_lora_keys_unet` + `load_lora`):

    SDXL   ComfyUI maps diffusers/PEFT attention keys only in the old `processor.to_q`
           spelling, so every attention LoRA of a diffusers file is dropped there ("lora key
           not loaded"). kohya keys load everywhere: `lora_unet_<module>` with `.lora_down`,
           `.lora_up` and `.alpha`, the module named in the original (SGM) UNet layout that
           kohya sd-scripts trains SDXL on and A1111/Forge name their layers by
           (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`). Scale = alpha / rank.
    FLUX.1 ComfyUI maps `transformer.<module>.lora_A/B` keys (q/k/v into slices of its fused
           qkv) but reads the scale only from a `<module>.alpha` key, never from safetensors
           metadata; diffusers refuses a file holding both, so this is a separate file.
    FLUX.2 kohya keys of the original layout with `.alpha` (backends/flux2_lora.py).

Each backend's spec names its writer (BackendSpec.comfyui_converter) and the layer names that
tell its files from another backend's (lora_markers): `iclora convert` reads them, not names.

Same-shape full-weight differences travel as `<module>.diff` / `.diff_b` (ComfyUI, A1111):
that is how a trained 9-channel conv_in on the 9-channel SDXL inpainting base gets there.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

PEFT_DOWN, PEFT_UP = ".lora_A.weight", ".lora_B.weight"
KOHYA_DOWN, KOHYA_UP = ".lora_down.weight", ".lora_up.weight"


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a .safetensors file and its header metadata."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def peft_scale(metadata: dict[str, str], prefix: str) -> float | None:
    """LoRA scale (alpha / rank, or alpha / sqrt(rank) for rsLoRA) recorded in a diffusers
    file's `lora_adapter_metadata` for `prefix` ('unet' / 'transformer'); None without it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = {k.removeprefix(f"{prefix}."): v for k, v in json.loads(raw).items() if k.startswith(f"{prefix}.")}
    if "r" not in config or "lora_alpha" not in config:
        return None
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("LoRAs with per-layer rank or alpha patterns are not converted")
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def peft_modules(state: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (lora_A, lora_B)} of a diffusers/PEFT state dict under `prefix.`."""
    modules = {}
    for key, down in state.items():
        if key.startswith(f"{prefix}.") and key.endswith(PEFT_DOWN):
            module = key[len(prefix) + 1 : -len(PEFT_DOWN)]
            up = state.get(f"{prefix}.{module}{PEFT_UP}")
            if up is None:
                raise ValueError(f"{key} has no matching lora_B")
            modules[module] = (down, up)
    return modules


# ---- SDXL ---------------------------------------------------------------------------------

# A diffusers ResNet block's layers in the SGM layout (ComfyUI's UNET_MAP_RESNET, kohya's names).
SGM_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
                     "time_emb_proj": "emb_layers.1"}


def sdxl_sgm_name(module: str, layers_per_block: int) -> str:
    """A diffusers UNet module name in the original SDXL (SGM) layout, the inverse of the
    renumbering in diffusers' `_maybe_map_sgm_blocks_to_diffusers` and ComfyUI's
    `unet_to_diffusers`: down block b, layer l -> input_blocks.(1 + b (L+1) + l), its ResNet
    at .0 and its attention at .1; the mid block's ResNets -> middle_block.0 / .2, its attention
    -> middle_block.1; up block b, layer l -> output_blocks.(b (L+1) + l), ResNet .0, attention .1.
    ResNet layers take their SGM names (conv1 -> in_layers.2, conv2 -> out_layers.3, ...)."""
    if module == "conv_in":
        return "input_blocks.0.0"
    per_block = layers_per_block + 1
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", module):
        side, b, kind, l, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        block = f"input_blocks.{1 + b * per_block + l}" if side == "down" else f"output_blocks.{b * per_block + l}"
        resnet_slot = 0
    elif match := re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", module):
        kind, l, rest = match[1], int(match[2]), match[3]
        block, resnet_slot = "middle_block", 2 * l  # ResNet, attention, ResNet
    else:
        raise ValueError(f"no SGM name for UNet module {module} (attention blocks, ResNet blocks and conv_in are "
                         "converted)")
    if kind == "attentions":
        return f"{block}.1.{rest}"
    if rest not in SGM_RESNET_LAYERS:
        raise ValueError(f"no SGM name for UNet module {module} (of a ResNet block, {', '.join(SGM_RESNET_LAYERS)} "
                         "are converted)")
    return f"{block}.{resnet_slot}.{SGM_RESNET_LAYERS[rest]}"


def kohya_name(sgm: str) -> str:
    return "lora_unet_" + sgm.replace(".", "_")


def sdxl_kohya_state(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    layers_per_block: int,
    conv_in_diff: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """kohya-key SDXL LoRA: per module lora_down (= lora_A), lora_up (= lora_B) and the alpha
    that makes alpha / rank the trained scale; plus conv_in as a same-shape (weight, bias)
    difference against the base, when given."""
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in modules.items():
        name = kohya_name(sdxl_sgm_name(module, layers_per_block))
        out[name + KOHYA_DOWN] = down.contiguous()
        out[name + KOHYA_UP] = up.contiguous()
        out[name + ".alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    if conv_in_diff is not None:
        name = kohya_name(sdxl_sgm_name("conv_in", layers_per_block))
        out[name + ".diff"] = conv_in_diff[0].contiguous()
        out[name + ".diff_b"] = conv_in_diff[1].contiguous()
    return out


CONV_IN_DIFF_KEYS = (kohya_name("input_blocks.0.0") + ".diff", kohya_name("input_blocks.0.0") + ".diff_b")


# ---- FLUX ---------------------------------------------------------------------------------

def flux_comfyui_state(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    """`transformer.<module>.lora_A/B.weight` plus `transformer.<module>.alpha` (= scale * rank),
    the one place ComfyUI reads a FLUX LoRA's scale from."""
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in modules.items():
        out[f"transformer.{module}{PEFT_DOWN}"] = down.contiguous()
        out[f"transformer.{module}{PEFT_UP}"] = up.contiguous()
        out[f"transformer.{module}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return out


def flux_comfyui_file(modules, scale: float, **_) -> dict[str, torch.Tensor]:
    """FLUX.1's ComfyUI file for `iclora convert` (see BackendSpec.comfyui_converter)."""
    return flux_comfyui_state(modules, scale)


def sdxl_comfyui_file(modules, scale: float, *, base: str | None, concat: bool, lora_file: Path,
                      **_) -> dict[str, torch.Tensor]:
    """SDXL's kohya file for `iclora convert`: the layout of the base UNet (its layers per
    block), and for a concat LoRA on the 9-channel base its trained conv_in as a difference."""
    import logging

    from .lora_files import CONV_IN_WEIGHT_NAME

    unet = _base_unet(base, config_only=not concat) if base else None
    layers = SDXL_LAYERS_PER_BLOCK if unet is None else unet["config"]["layers_per_block"]
    conv_diff = None
    if concat:
        if unet is None:
            raise ValueError(f"--lora_path {lora_file}: a concat LoRA; name its base with --base_model")
        if unet["config"]["in_channels"] == 9:
            trained = read_lora_file(lora_file.parent / CONV_IN_WEIGHT_NAME)[0]
            conv_diff = (trained["conv_in.weight"].float() - unet["conv_in.weight"].float(),
                         trained["conv_in.bias"].float() - unet["conv_in.bias"].float())
        else:
            logging.getLogger(__name__).warning(
                "%s: a concat LoRA on a 4-channel base; no LoRA file carries its 9-channel conv_in into ComfyUI "
                "(use --export_unet)", lora_file,
            )
    return sdxl_kohya_state(modules, scale, layers, conv_diff)


SDXL_LAYERS_PER_BLOCK = 2  # stabilityai/stable-diffusion-xl-base-1.0 and its inpainting model


def _base_unet(base: str, config_only: bool) -> dict:
    """The base UNet's config and (unless config_only) its conv_in weights."""
    from diffusers import UNet2DConditionModel

    from .tiny import TINY_MODELS, is_tiny

    if is_tiny(base):
        unet = TINY_MODELS[base]()["unet"]
    elif config_only:
        return {"config": UNet2DConditionModel.load_config(base, subfolder="unet")}
    else:
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    return {"config": dict(unet.config), "conv_in.weight": unet.conv_in.weight.detach(), "conv_in.bias": unet.conv_in.bias.detach()}


# ---- which backend a file is for -------------------------------------------------------------

def guess_backend(state: dict[str, Any], where: str) -> str | None:
    """The backend of a diffusers-format file from its keys: the one whose layer prefix it
    uses, or among several with that prefix the one whose own module names it has
    (BackendSpec.lora_markers); None when no backend's prefix is there. A file that fits
    several is an error naming `where` (the flag and file)."""
    from .registry import backend_names, backend_spec

    specs = [backend_spec(name) for name in backend_names()]
    candidates = [spec for spec in specs if any(k.startswith(spec.lora_prefix + ".") for k in state)]
    if len(candidates) > 1:
        prefixes = {spec.lora_prefix for spec in candidates}
        modules = [k for p in prefixes for k in peft_modules(state, p)]
        marked = [spec for spec in candidates if spec.lora_markers
                  and any(re.search(spec.lora_markers, m) for m in modules)]
        if len(marked) != 1:
            labels = " or ".join(spec.label for spec in (marked or candidates))
            raise ValueError(f"{where}: its layers fit {labels}: convert it from its output folder (with "
                             "iclora_config.json) or pass --backend")
        candidates = marked
    return candidates[0].name if candidates else None
