"""Loading a FLUX.2 [klein] pipeline's components: a hub id, a local diffusers folder or
`tiny-flux2`; the transformer optionally bitsandbytes-quantized (flux2_lora.py: its LoRA)."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers import Flux2Transformer2DModel
from transformers import AutoTokenizer, Qwen3ForCausalLM

from .flux_loading import QUANTIZE_CONFIGS, prepare_quantized
from .tiny import TINY_MODELS, is_tiny


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
