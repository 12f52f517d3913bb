"""What shared code knows of the FLUX.2 [klein] backend (backends/flux2.py) before loading it."""

from __future__ import annotations

import json
from pathlib import Path

from .registry import BackendSpec, MemoryProfile, register

MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's default: Qwen3 tokens, chat template included
# The [klein] model cards' sampling for the step-distilled models (is_distilled in the
# pipeline's model_index.json): 4 steps, no classifier-free guidance.
DISTILLED_DEFAULTS = {"num_inference_steps": 4, "guidance_scale": 1.0}


def is_distilled(model_id: str) -> bool:
    """Whether the model's pipeline config says it is step-distilled, read from a local
    folder or the Hugging Face cache (False when it cannot be read: a base model's defaults)."""
    folder = Path(model_id).expanduser()
    try:
        if folder.is_dir():
            path = folder / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model_id, "model_index.json"))
        return bool(json.loads(path.read_text(encoding="utf-8")).get("is_distilled", False))
    except Exception:  # no such file, not a hub id, not cached offline
        return False


class TemplatedCount:
    """Counts a caption's Qwen3 tokens for the dry run (prepare/check.py): its own tokens, then
    as many more as the chat template adds around it, which the count takes off as specials."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        wrapped = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False)
        self.template = len(tokenizer(wrapped).input_ids)

    def __call__(self, text: str, truncation: bool = False):
        from types import SimpleNamespace

        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return SimpleNamespace(input_ids=ids + [self.tokenizer.pad_token_id] * self.template)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def caption_tokenizers(model_id: str, max_token_length: int | None) -> list[tuple[str, object, int]]:
    """Qwen3 reads --max_token_length tokens, the chat template's among them."""
    from .tiny import is_tiny, tiny_tokenizers

    if is_tiny(model_id):
        (tokenizer,) = tiny_tokenizers(model_id)
    else:
        from transformers import AutoTokenizer

        from ..hub import model_source

        tokenizer = AutoTokenizer.from_pretrained(model_source(model_id), subfolder="tokenizer")
    count = TemplatedCount(tokenizer)
    limit = (max_token_length or MAX_SEQUENCE_LENGTH) - count.template
    return [(f"text_encoder (Qwen3; the chat template takes {count.template} more)", count, limit)]


def memory_parts() -> dict:
    """The models the memory estimate builds on the meta device (prepare/memory.py): the
    transformer, Qwen3 as the backend loads it (the causal LM, lm_head included) and the VAE."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    from .flux2_lora import LORA_TARGET_MODULES
    from .flux_spec import shard_units

    def shape(transformer, parameters: int) -> tuple[float, dict]:
        cfg = transformer.config
        blocks = {"double": cfg.num_layers, "single": cfg.num_single_layers,
                  "width": cfg.num_attention_heads * cfg.attention_head_dim}
        # No FLUX.2 row is measured: FLUX.1-dev's activations per token (19 double + 38 single
        # blocks, width 3072) scaled by width x blocks, as a checkpointed step keeps one hidden
        # state per block and recomputes one block at a time. base-4B (5 + 20, 3072): 0.44 of
        # FLUX.1-dev's; base-9B (8 + 24, 4096): 0.75.
        return blocks["width"] * (blocks["double"] + blocks["single"]) / (3072 * 57), blocks

    return {"denoiser": ("transformer", Flux2Transformer2DModel), "text_encoders": [("text_encoder", Qwen3ForCausalLM)],
            "vae": AutoencoderKLFlux2, "lora_targets": LORA_TARGET_MODULES,
            "extra_lora": lambda transformer, conditioning: 0, "shape": shape, "shard_units": shard_units}


def _modulation_tensors(blocks: dict, checkpointing: bool) -> float:
    """FLUX.2 computes its modulation once for all blocks (flux2_context.py): per-token, one
    (B, N, 6 x width) tensor for the double blocks' image stream and one (B, N, 3 x width) for
    the single blocks, held through the whole step, checkpointed or not."""
    return 6 + 3


def base_model_of(argv: list[str]) -> str:
    """The base model an inference command line runs on: its --base_model, else the one its
    --lora_path records, else the default (a bad flag is reported by the command's parser)."""
    values = {}
    for i, arg in enumerate(argv):  # `--flag V` or `--flag=V`, the last one wins, as argparse reads them
        flag, _, value = arg.partition("=")
        if flag in ("--base_model", "--lora_path"):
            values[flag] = value if value else (argv[i + 1] if i + 1 < len(argv) else "")
    if values.get("--base_model"):
        return values["--base_model"]
    lora = values.get("--lora_path", "none")
    if lora.lower() != "none":
        from .lora_files import read_metadata

        try:
            if base := read_metadata(lora).get("base_model"):
                return base
        except (OSError, ValueError):
            pass
    return SPEC.default_model


SPEC = register(BackendSpec(
    name="flux2",
    label="FLUX.2 [klein]",
    backend_class="iclora.backends.flux2:Flux2Backend",
    train_defaults={
        "backend": "flux2",
        "model_id": "black-forest-labs/FLUX.2-klein-base-4B",  # Apache-2.0; base-9B by id
        "lora_rank": 16,
        "lora_alpha": 16,
        "conditioning": "context",
        # As FLUX.1's: every sample completes 1-3 panels from the others.
        "mask_probability": 1.0,
        "max_masked_panels": 3,
    },
    # The base models' pipeline defaults (true CFG with "" as the negative prompt); distilled
    # models get DISTILLED_DEFAULTS from the inference script.
    infer_defaults={"backend": "flux2", "num_inference_steps": 50, "guidance_scale": 4.0},
    train_script="iclora.training.train_flux2_ic_lora",
    infer_script="iclora.inference.flux2_ic_lora_inference",
    preferred_mixed_precision="bf16",
    params_per_rank=1_505_280,  # base-4B: 5 double + 20 single blocks, width 3072 (base-9B: 2_719_744)
    timestep_sampling="logit_normal",
    timestep_shift="none",
    resolution_shift=True,
    conditionings=("context", "blend", "reference"),  # no Fill model: concat is refused
    # Qwen3 tokens, chat template included; the first is the pipeline's own (the default).
    max_token_lengths=(MAX_SEQUENCE_LENGTH, 256, 128),
    caption_tokenizers=caption_tokenizers,
    max_token_length_refusal=f"--max_token_length: FLUX.2 reads {MAX_SEQUENCE_LENGTH}, 256 or 128 Qwen3 tokens "
                             "(chat template included)",
    # Parameters, LoRA and optimizer state from the configs; activations per token (2x2 latent
    # patches plus the 512 Qwen3 tokens) are FLUX.1's fitted figures (flux_spec.py: bf16
    # 7.2e-4 GiB, quantized 1.074e-3) scaled by `memory_parts`' shape (width x blocks), not
    # measured. True CFG runs the uncond pass apart (flux2_context.py): the batch is not doubled.
    memory=MemoryProfile(memory_parts, activations=7.2e-4, quantized_activations=1.074e-3, text_tokens=MAX_SEQUENCE_LENGTH,
                         per_token_modulation=True, modulation_tensors=_modulation_tensors, suggest_quantize=True,
                         extrapolated="activations extrapolated from FLUX.1"),
    # Single blocks with one fused q/k/v/MLP projection; feed-forwards with linear_in / linear_out.
    lora_markers=r"single_transformer_blocks\.\d+\.attn\.(?:to_qkv_mlp_proj|to_out)\b|\.ff(?:_context)?\.linear_",
    comfyui_converter="iclora.backends.flux2_lora:comfyui_file",
))
