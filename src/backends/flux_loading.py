"""Loading a FLUX.1 pipeline's components: from a hub id or a local diffusers folder, or a
built-in tiny model; the transformer optionally quantized by bitsandbytes (4-bit NF4 or
8-bit), and the QLoRA preparation training gives a quantized transformer."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    BitsAndBytesConfig,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
)
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .tiny import TINY_MODELS, is_tiny

QUANTIZE_CONFIGS = {
    "nf4": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    ),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}


def load_components(model_id: str, variant: str | None, vae: str | None, quantize: str | None,
                    dtype: torch.dtype | None) -> dict[str, Any]:
    """The pipeline's components by name (the arguments as FluxBackend.from_pretrained's)."""
    if is_tiny(model_id):
        if not model_id.startswith("tiny-flux") or model_id.startswith("tiny-flux2"):
            raise ValueError(f"--model_id {model_id} is not a FLUX.1 model")
        components = TINY_MODELS[model_id]()
        if vae:
            components["vae"] = AutoencoderKL.from_pretrained(vae)
        if quantize:
            with tempfile.TemporaryDirectory() as folder:  # bitsandbytes quantizes while loading
                components["transformer"].save_pretrained(folder)
                components["transformer"] = _load_transformer(folder, None, None, quantize)
    else:
        _check_is_flux(model_id)
        kw = {"variant": variant} if variant else {}
        # The text encoders load in the run's dtype whether or not the transformer is
        # quantized (T5-XXL in float32 alone would take ~19 GB of host memory); the VAE in
        # bf16 only (see FluxBackend.to).
        weights = {**kw, "torch_dtype": dtype} if dtype else kw
        vae_dtype = {"torch_dtype": dtype} if dtype == torch.bfloat16 else {}
        components = {
            "transformer": _load_transformer(model_id, "transformer", variant, quantize, dtype),
            "vae": (AutoencoderKL.from_pretrained(vae, **vae_dtype) if vae
                    else AutoencoderKL.from_pretrained(model_id, subfolder="vae", **kw, **vae_dtype)),
            "text_encoder": CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", **weights),
            "text_encoder_2": T5EncoderModel.from_pretrained(model_id, subfolder="text_encoder_2", **weights),
            "tokenizer": CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer"),
            "tokenizer_2": T5TokenizerFast.from_pretrained(model_id, subfolder="tokenizer_2"),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(model_id, subfolder="scheduler"),
        }
    return components


def prepare_quantized(transformer: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """QLoRA prep after a quantized load, as diffusers' FLUX LoRA scripts do it: freeze every
    weight, upcast the unquantized leftovers (norms, biases, embeddings) to float32."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)


def _load_transformer(source: str, subfolder: str | None, variant: str | None, quantize: str | None,
                      dtype: torch.dtype | None = None):
    kw: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
    if variant:
        kw["variant"] = variant
    if not quantize:
        return FluxTransformer2DModel.from_pretrained(source, **kw, **({"torch_dtype": dtype} if dtype else {}))
    # Computes in bf16; `add_lora` prepares it for training (float32 leftovers), inference
    # leaves it as loaded.
    return FluxTransformer2DModel.from_pretrained(
        source, quantization_config=QUANTIZE_CONFIGS[quantize](), torch_dtype=torch.bfloat16, **kw
    )


def _check_is_flux(model_id: str) -> None:
    """Name the problem when --model_id is some other pipeline (an SDXL folder, say)."""
    try:
        config = DiffusionPipeline.load_config(model_id)
    except (OSError, ValueError):
        return  # no model_index.json: the component loaders report what is missing
    if "transformer" not in config or not str(config.get("_class_name", "")).startswith("Flux"):
        raise ValueError(f"--model_id {model_id} is not a FLUX.1 model (it is a {config.get('_class_name', 'unknown pipeline')})")
