"""What shared code knows of the SDXL backend (backends/sdxl.py) before loading it."""

from __future__ import annotations

from .registry import BackendSpec, register


def tokenizer_pair(model_id: str) -> tuple:
    """The tokenizers of text_encoder and text_encoder_2 (SDXL's and FLUX.1's layout)."""
    from .tiny import is_tiny, tiny_tokenizers

    if is_tiny(model_id):
        return tiny_tokenizers(model_id)
    from transformers import AutoTokenizer

    from ..hub import model_source

    source = model_source(model_id)
    return (AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
            AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2"))


def caption_tokenizers(model_id: str, max_token_length: int | None) -> list[tuple[str, object, int]]:
    from .sdxl_prompt import DEFAULT_MAX_TOKEN_LENGTH

    first, second = tokenizer_pair(model_id)
    limit = max_token_length or DEFAULT_MAX_TOKEN_LENGTH
    return [("text_encoder (CLIP)", first, limit), ("text_encoder_2 (CLIP)", second, limit)]


SPEC = register(BackendSpec(
    name="sdxl",
    label="SDXL",
    backend_class="iclora.backends.sdxl:SDXLBackend",
    train_defaults={"backend": "sdxl", "model_id": "stabilityai/stable-diffusion-xl-base-1.0", "lora_rank": 64,
                    "lora_alpha": 64},
    infer_defaults={"backend": "sdxl", "num_inference_steps": 50, "guidance_scale": 7.5},
    train_script="iclora.training.train_sdxl_ic_lora",
    infer_script="iclora.inference.sdxl_ic_lora_inference",
    preferred_mixed_precision="fp16",
    params_per_rank=2_616_320,
    timestep_sampling="uniform",
    # With concat the visible panels count half as much as the masked ones: on the harder
    # known-answer toy (benchmarks/RESULTS.md) the widened conv_in then reads the visible
    # colour far better.
    concat_visible_loss_weight=0.5,
    concat_trains_conv_in=True,
    caption_tokenizers=caption_tokenizers,
    lora_prefix="unet",
    comfyui_converter="iclora.backends.lora_formats:sdxl_comfyui_file",
))
