"""FLUX.2's LoRA: the transformer layers it trains, and its files: saved as diffusers'
Flux2KleinPipeline saves them (plus a ComfyUI copy in kohya keys with `.alpha`), loaded from
ours or from foreign trainers' formats, refusing any that would not be applied in full.

What ComfyUI reads (comfy/lora.py `model_lora_keys_unet`; its FLUX.2 model is a subclass of
its FLUX one, so `comfy/utils.py` `flux_to_diffusers` maps the diffusers names too): the
LoRA scale comes only from a `<key>.alpha` tensor (alpha / rank, 1.0 without one: adapter
metadata is attached to the model but never read for the scale), and diffusers' FLUX.2
loader refuses `.alpha` keys beside `transformer.` keys. So the ComfyUI file is written in
the original (BFL) layout with kohya keys, `lora_unet_double_blocks_0_img_attn_qkv`, which
ComfyUI maps for every weight of its model and which diffusers' FLUX.2 loader converts too
(musubi-tuner writes FLUX.2 LoRAs this way); q, k and v go into the fused qkv weight as one
LoRA of three times the rank with a block-diagonal up matrix, the exact same update.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from diffusers import Flux2KleinPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from .lora_files import load_transformer_lora, save_transformer_lora
from .lora_formats import KOHYA_DOWN, KOHYA_UP, peft_modules

# diffusers' train_dreambooth_lora_flux2_klein.py trains by default the image stream's
# attention of the double blocks (to_q, to_k, to_v, to_out.0) and the single blocks' fused
# to_qkv_mlp_proj and their to_out. Added here, as its FLUX.1 script does by default: the
# text stream's attention (add_q/k/v_proj, to_add_out) and both feed-forwards. Anchored
# (PEFT full-matches a regex against module names): in the double blocks `attn.to_out` is a
# ModuleList (its Linear is `to_out.0`), in the single blocks a Linear; the transformer's
# own proj_out, norm_out, embedders and modulations are never trained.
DOUBLE_BLOCK_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
)
SINGLE_BLOCK_TARGETS = ("attn.to_qkv_mlp_proj", "attn.to_out")


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in names)


LORA_TARGET_MODULES = (
    rf"(?:transformer_blocks\.\d+\.(?:{_alternatives(DOUBLE_BLOCK_TARGETS)}))"
    rf"|(?:single_transformer_blocks\.\d+\.(?:{_alternatives(SINGLE_BLOCK_TARGETS)}))"
)

# diffusers module (in a block) -> (original BFL module, part of a fused q/k/v weight or None)
_DOUBLE_TO_BFL = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None),
}
_SINGLE_TO_BFL = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}

# The kohya module names diffusers' FLUX.2 conversion (_convert_kohya_flux2_lora_to_diffusers)
# applies; it drops any other with a warning, so those files are refused here.
_KOHYA_CONVERTED = re.compile(
    r"lora_unet_(?:double_blocks_\d+_(?:img|txt)_(?:attn_qkv|attn_proj|mlp_0|mlp_2)"
    r"|single_blocks_\d+_linear[12]|img_in|txt_in|time_in_in_layer|time_in_out_layer|final_layer_linear)"
)


def bfl_module(module: str) -> tuple[str, int | None]:
    """A trained diffusers module's name in the original FLUX.2 layout, and which third of
    a fused q/k/v weight it is (None for a whole weight)."""
    if match := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
        table, prefix = _DOUBLE_TO_BFL, f"double_blocks.{match[1]}."
    elif match := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
        table, prefix = _SINGLE_TO_BFL, f"single_blocks.{match[1]}."
    else:
        raise ValueError(f"no original FLUX.2 name for transformer module {module}")
    if match[2] not in table:
        raise ValueError(f"no original FLUX.2 name for transformer module {module}")
    name, part = table[match[2]]
    return prefix + name, part


def comfyui_state(transformer) -> dict[str, torch.Tensor]:
    """The trained LoRA in kohya keys of the original layout, each with the `.alpha` that
    makes alpha / rank the trained scale (see the module docstring)."""
    config = transformer.peft_config["default"]
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("LoRAs with per-layer rank or alpha patterns are not converted")
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    lora = get_peft_model_state_dict(transformer)
    return comfyui_file(peft_modules({f"transformer.{k}": v for k, v in lora.items()}, "transformer"), scale)


def comfyui_file(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float, **_) -> dict[str, torch.Tensor]:
    """The ComfyUI file's tensors from a diffusers-format LoRA's {module: (lora_A, lora_B)}
    at `scale` (what comfyui_state writes, and `iclora convert` from a diffusers file)."""
    grouped: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, factors in modules.items():
        name, part = bfl_module(module)
        grouped.setdefault(name, {})[part] = factors
    out: dict[str, torch.Tensor] = {}
    for name, parts in grouped.items():
        if None in parts:
            down, up = parts[None]
        else:  # q, k, v: stacked down matrices, block-diagonal up matrix
            order = sorted(parts)
            down = torch.cat([parts[p][0] for p in order])
            rows = parts[order[0]][1].shape[0]
            up = down.new_zeros(3 * rows, down.shape[0], dtype=parts[order[0]][1].dtype)
            column = 0
            for p in order:
                part_up = parts[p][1]
                up[p * rows:(p + 1) * rows, column:column + part_up.shape[1]] = part_up
                column += part_up.shape[1]
        key = "lora_unet_" + name.replace(".", "_")
        out[key + KOHYA_DOWN] = down.contiguous()
        out[key + KOHYA_UP] = up.contiguous()
        out[key + ".alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return out


def save_lora(transformer, directory: Path, compat: bool = True, dtype: torch.dtype = torch.float16) -> None:
    """The trained LoRA as diffusers' Flux2KleinPipeline saves it, and with `compat` the
    ComfyUI file beside it."""
    save_transformer_lora(Flux2KleinPipeline, transformer, directory, comfyui_state, compat, dtype)


def _refuse_dropped_keys(path, lora_file: Path) -> None:
    """Keys diffusers' FLUX.2 loader would drop without an error: a DoRA's magnitudes (it
    warns and loads a plain LoRA), kohya / musubi-tuner modules its conversion does not
    know (text encoder, modulation, norms), LoRAs for the text encoder in diffusers keys
    (its FLUX.2 pipelines load only the transformer's)."""
    with safe_open(str(lora_file), framework="pt") as f:
        keys = list(f.keys())
    dropped = [k for k in keys if "dora_scale" in k]
    if any(k.endswith(KOHYA_DOWN) for k in keys):
        stems = {k.split(".", 1)[0] for k in keys if k.endswith((KOHYA_DOWN, KOHYA_UP, ".alpha"))}
        dropped += sorted(s for s in stems if not _KOHYA_CONVERTED.fullmatch(s))
    elif any(k.startswith("transformer.") for k in keys):
        dropped += [k for k in keys if not k.startswith("transformer.") and ".lora" in k]
    if dropped:
        raise ValueError(
            f"--lora_path {path}: {len(dropped)} of its layers would not be applied to FLUX.2 "
            f"(e.g. {dropped[0]}): DoRA, text-encoder and modulation LoRAs are not supported"
        )


def load_lora(pipe, transformer, path: Path, conditioning: str) -> None:
    """Ours (a final_model/ or checkpoint folder, or one of its files), or foreign FLUX.2
    LoRAs (ai-toolkit, musubi-tuner / kohya, diffusers: diffusers converts the keys);
    refuses one that would not be applied in full."""
    load_transformer_lora(pipe, transformer, path, conditioning, "FLUX.2 transformer", _refuse_dropped_keys)
