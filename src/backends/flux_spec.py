"""What shared code knows of the FLUX.1 backend (backends/flux.py) before loading it."""

from __future__ import annotations

from .registry import BackendSpec, register
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
    # Single blocks with separate q/k/v and an MLP of their own; feed-forwards in diffusers' FeedForward.
    lora_markers=r"single_transformer_blocks\.\d+\.(?:proj_mlp|proj_out|attn\.to_[qkv])\b|\.ff(?:_context)?\.net\.",
    comfyui_converter="iclora.backends.lora_formats:flux_comfyui_file",
))
