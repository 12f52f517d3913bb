"""What shared code knows of the FLUX.1 backend (backends/flux.py) before loading it."""

from __future__ import annotations

from .registry import BackendSpec, MemoryProfile, register
from .sdxl_spec import tokenizer_pair

T5_TOKENS = 511  # FLUX.1-dev's 512 T5 positions, minus EOS

# FLUX.1-Fill-dev's guidance embedding was distilled around 30 (its model card's value);
# the FLUX.1-dev default of 3.5 leaves Fill completions faint.
FILL_GUIDANCE_HINT = 10.0


def fill_guidance_hint(backend, pipe, guidance_scale: float) -> str | None:
    transformer = getattr(pipe, "transformer", None)
    if (backend.conditioning == "concat" and transformer is not None and transformer.config.guidance_embeds
            and guidance_scale < FILL_GUIDANCE_HINT):
        return (f"--guidance_scale {guidance_scale:g} with a FLUX.1-Fill base: Fill was distilled for guidance ~30 "
                "(pass --guidance_scale 30)")
    return None


def caption_tokenizers(model_id: str, max_token_length: int | None) -> list[tuple[str, object, int]]:
    # CLIP gives only the pooled vector; T5 carries the caption.
    first, second = tokenizer_pair(model_id)
    return [("text_encoder (CLIP, pooled)", first, 75), ("text_encoder_2 (T5)", second, T5_TOKENS)]


def shard_units(transformer) -> list:
    """The blocks --distributed fsdp shards one by one (FluxBackend.shard_units; FLUX.2's too)."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def memory_parts() -> dict:
    """The models the memory estimate builds on the meta device (prepare/memory.py)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from .flux_lora import LORA_TARGET_MODULES

    def shape(transformer, parameters: int) -> tuple[float, dict]:
        cfg = transformer.config
        blocks = {"double": cfg.num_layers, "single": cfg.num_single_layers,
                  "width": cfg.num_attention_heads * cfg.attention_head_dim}
        # A transformer's activations per token grow with its width times its depth (FLUX.1-dev's).
        return blocks["width"] * (blocks["double"] + blocks["single"]) / (3072 * 57), blocks

    return {"denoiser": ("transformer", FluxTransformer2DModel),
            "text_encoders": [("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel)],
            "lora_targets": LORA_TARGET_MODULES, "extra_lora": lambda transformer, conditioning: 0, "shape": shape,
            "shard_units": shard_units}


SPEC = register(BackendSpec(
    name="flux",
    label="FLUX.1",
    backend_class="iclora.backends.flux:FluxBackend",
    # The official IC-LoRA recipe (ali-vilab/In-Context-LoRA): FLUX.1-dev, rank 16, alpha 16.
    train_defaults={
        "backend": "flux",
        "model_id": "black-forest-labs/FLUX.1-dev",
        "lora_rank": 16,
        "lora_alpha": 16,
        "conditioning": "context",
        # Every sample completes 1-3 panels from the others: on the harder known-answer toy this
        # completes 13.5 colour error against 19.1 at the trainer's 0.7 / 2 (whole composites:
        # 20.2), and its text -> set samples agree with themselves as well (benchmarks/RESULTS.md).
        "mask_probability": 1.0,
        "max_masked_panels": 3,
    },
    infer_defaults={"backend": "flux", "num_inference_steps": 20, "guidance_scale": 3.5},
    train_script="iclora.training.train_flux_ic_lora",
    infer_script="iclora.inference.flux_ic_lora_inference",
    preferred_mixed_precision="bf16",
    params_per_rank=4_085_760,
    timestep_sampling="logit_normal",
    # Whether noise levels move as inference moves its schedule for the composite's size
    # (--timestep_shift). On the harder known-answer toy the shift did not win (colour error
    # 14.9 against 13.5 unshifted; benchmarks/RESULTS.md), so it stays an option.
    timestep_shift="none",
    resolution_shift=True,
    # FLUX.1-Fill's input layer is pretrained; visible-panel loss there measured no gain.
    concat_visible_loss_weight=0.0,
    max_token_lengths=(75,),
    max_token_length_refusal="--max_token_length is for --backend sdxl: FLUX reads 75 CLIP tokens (and 512 T5 tokens)",
    caption_tokenizers=caption_tokenizers,
    inference_hint=fill_guidance_hint,
    # Activations per token (image tokens of 2x2 latent patches plus T5's 512): FLUX.1-dev bf16
    # 1024² (4608 tokens), 26.69 GiB; NF4 1024² -> 1024x1536 (+2048 tokens), 11.51 -> 13.71 GiB.
    # Guidance is distilled into one pass; bitsandbytes loading is this backend's.
    memory=MemoryProfile(memory_parts, activations=7.2e-4, quantized_activations=1.074e-3, text_tokens=512,
                         per_token_modulation=True, suggest_quantize=True),
    # Single blocks with separate q/k/v and an MLP of their own; feed-forwards in diffusers' FeedForward.
    lora_markers=r"single_transformer_blocks\.\d+\.(?:proj_mlp|proj_out|attn\.to_[qkv])\b|\.ff(?:_context)?\.net\.",
    comfyui_converter="iclora.backends.lora_formats:flux_comfyui_file",
))
