"""Loading a FLUX.2 [klein] pipeline's components (a hub id, a local diffusers folder or
`tiny-flux2`; the transformer optionally bitsandbytes-quantized), and its LoRA files."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers import Flux2Transformer2DModel
from peft.utils import get_peft_model_state_dict
from transformers import AutoTokenizer, Qwen3ForCausalLM

from .flux_loading import QUANTIZE_CONFIGS, prepare_quantized
from .lora_files import (
    COMFYUI_WEIGHT_NAME, LORA_WEIGHT_NAME, atomic_save_file, cast_lora, check_applied, check_conditioning, lora_layers,
    refuse_unreadable, resolve_lora_file,
)
from .tiny import TINY_MODELS, is_tiny

# Attention and feed-forward of both block kinds, anchored to the block lists: the single
# blocks fuse q, k, v and the MLP input in `to_qkv_mlp_proj`, and a double block's
# `attn.to_out` is a ModuleList (a bare `to_out` target is refused by peft).
_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
           "ff_context.linear_out")
_SINGLE = ("attn.to_qkv_mlp_proj", "attn.to_out")
LORA_TARGET_MODULES = (
    r"(?:transformer_blocks\.\d+\.(?:" + "|".join(s.replace(".", r"\.") for s in _DOUBLE) + r"))"
    r"|(?:single_transformer_blocks\.\d+\.(?:" + "|".join(s.replace(".", r"\.") for s in _SINGLE) + r"))"
)


def load_components(model_id: str, variant: str | None, vae: str | None, quantize: str | None,
                    dtype: torch.dtype | None) -> tuple[dict[str, Any], bool]:
    """(components by name, whether the model is step-distilled) for Flux2Backend."""
    if is_tiny(model_id):
        if not model_id.startswith("tiny-flux2"):
            raise ValueError(f"--model_id {model_id} is not a FLUX.2 model")
        components = TINY_MODELS[model_id]()
        if vae:
            components["vae"] = AutoencoderKLFlux2.from_pretrained(vae)
        if quantize:
            with tempfile.TemporaryDirectory() as folder:  # bitsandbytes quantizes while loading
                components["transformer"].save_pretrained(folder)
                components["transformer"] = _load_transformer(folder, None, None, quantize)
        return components, False
    config = _pipeline_config(model_id)
    kw = {"variant": variant} if variant else {}
    weights = {**kw, "torch_dtype": dtype} if dtype else kw
    vae_dtype = {"torch_dtype": dtype} if dtype == torch.bfloat16 else {}
    components = {
        "transformer": _load_transformer(model_id, "transformer", variant, quantize, dtype),
        "vae": (AutoencoderKLFlux2.from_pretrained(vae, **vae_dtype) if vae
                else AutoencoderKLFlux2.from_pretrained(model_id, subfolder="vae", **kw, **vae_dtype)),
        # Qwen3 in the run's 16-bit dtype: 4B / 8B parameters in float32 would take 16 / 32 GB first.
        "text_encoder": Qwen3ForCausalLM.from_pretrained(model_id, subfolder="text_encoder", **weights),
        "tokenizer": AutoTokenizer.from_pretrained(model_id, subfolder="tokenizer"),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(model_id, subfolder="scheduler"),
    }
    return components, bool(config.get("is_distilled", False))


def _pipeline_config(model_id: str) -> dict:
    """Name the problem when --model_id is some other pipeline (an SDXL or FLUX.1 folder)."""
    try:
        config = DiffusionPipeline.load_config(model_id)
    except (OSError, ValueError):
        return {}  # no model_index.json: the component loaders report what is missing
    if not str(config.get("_class_name", "")).startswith("Flux2"):
        raise ValueError(f"--model_id {model_id} is not a FLUX.2 model (it is a {config.get('_class_name', 'unknown pipeline')})")
    return config


def _load_transformer(source: str, subfolder: str | None, variant: str | None, quantize: str | None,
                      dtype: torch.dtype | None = None):
    kw: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
    if variant:
        kw["variant"] = variant
    if not quantize:
        return Flux2Transformer2DModel.from_pretrained(source, **kw, **({"torch_dtype": dtype} if dtype else {}))
    return Flux2Transformer2DModel.from_pretrained(
        source, quantization_config=QUANTIZE_CONFIGS[quantize](), torch_dtype=torch.bfloat16, **kw
    )


# ---- LoRA files: diffusers' Flux2KleinPipeline format -------------------------------------

def save_lora(transformer, directory: Path, compat: bool = True, dtype: torch.dtype = torch.float16) -> None:
    """The trained LoRA as Flux2KleinPipeline saves it, its alpha in the adapter metadata."""
    lora = cast_lora(get_peft_model_state_dict(transformer), dtype)
    adapter_metadata = {**transformer.peft_config["default"].to_dict(), "lora_dropout": 0.0}
    Flux2KleinPipeline.save_lora_weights(Path(directory), transformer_lora_layers=lora,
                                         transformer_lora_adapter_metadata=adapter_metadata, weight_name=LORA_WEIGHT_NAME)
    if compat:
        atomic_save_file(cast_lora(comfyui_state(transformer), dtype), Path(directory) / COMFYUI_WEIGHT_NAME)


def comfyui_state(transformer) -> dict[str, torch.Tensor]:
    """diffusers keys with an `.alpha` per module (the scale ComfyUI reads)."""
    config = transformer.peft_config["default"]
    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer).items()}
    alphas = {k.replace(".lora_A.weight", ".alpha"): torch.tensor(float(config.lora_alpha))
              for k in state if k.endswith(".lora_A.weight")}
    return {**state, **alphas}


def load_lora(pipe, transformer, path: Path, conditioning: str) -> None:
    """Ours (a final_model/ or checkpoint folder, or one of its files) or a diffusers-format
    FLUX.2 LoRA; refuses one that would not be applied in full."""
    lora_file = resolve_lora_file(path)
    check_conditioning(path, conditioning)
    with refuse_unreadable(path, "FLUX.2 transformer"):
        converted = pipe.lora_state_dict(str(lora_file))
    expected = {k.removeprefix("transformer.").removesuffix(".lora_A.weight")
                for k in converted if k.startswith("transformer.") and k.endswith(".lora_A.weight")}
    if not expected:
        check_applied(path, expected, set(), "FLUX.2 transformer")
    before = set(lora_layers(transformer))
    with refuse_unreadable(path, "FLUX.2 transformer"):
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    injected = set().union(*[m for a, m in lora_layers(transformer).items() if a not in before])
    check_applied(path, expected, injected, "FLUX.2 transformer")
