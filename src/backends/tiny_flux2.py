"""Tiny random FLUX.2 [klein] models, built in code, for tests and demos (see tiny.py).

They follow the real [klein] models' interfaces at ~2 MB: a Qwen3 causal LM whose hidden
states of layers 9, 18 and 27 the pipeline stacks per token (`text_encoder_out_layers`, a
*call* argument of Flux2KleinPipeline, so the tiny Qwen3 has the 28+ layers those indices
need, each 16 wide), a byte-level BPE tokenizer with a Qwen3-style chat template, a
32-channel-style AutoencoderKLFlux2 (here 4 latent channels; 2x2 patchified and batch-norm
normalised by the pipeline), and a 1 + 1 block Flux2Transformer2DModel without a guidance
embedding, as the base models.

    python -c "from iclora.backends.tiny import save_tiny_model as s; s('tiny-flux2', 'out/tiny-flux2')"
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

QWEN3_LAYERS = 28  # the pipeline reads hidden_states[9], [18], [27]
QWEN3_HIDDEN = 16
STACKED_LAYERS = 3  # Flux2KleinPipeline's text_encoder_out_layers=(9, 18, 27)
LATENT_CHANNELS = 4  # real [klein]: 32; the transformer sees 4x as many per 2x2 patch
VAE_BLOCKS = (8, 16, 16, 16)  # 3 downsamplings -> vae_scale_factor 8, as the real VAE
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's chat template, reduced to what prompt encoding uses: user turns, the generation
# prompt, and the empty think block that `enable_thinking=False` adds.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def qwen_tokenizer() -> Qwen2TokenizerFast:
    """Byte-level BPE with no merges (one token per byte) plus Qwen's specials, ids 256-260;
    <|endoftext|> pads, as in Qwen3."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {piece: i for i, piece in enumerate(alphabet + SPECIALS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return Qwen2TokenizerFast(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
    )


def build_tiny_flux2_components(seed: int = 0) -> dict[str, Any]:
    """Components for `Flux2KleinPipeline` (a base model: no guidance embedding, CFG at call)."""
    tokenizer = qwen_tokenizer()
    with _seeded(seed):
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=QWEN3_HIDDEN,
            intermediate_size=2 * QWEN3_HIDDEN,
            num_hidden_layers=QWEN3_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        ))
    with _seeded(seed):
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=STACKED_LAYERS * QWEN3_HIDDEN,  # stacked hidden states per token
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),  # (t, h, w, l): must sum to attention_head_dim
            guidance_embeds=False,  # as the [klein] base models
        )
    with _seeded(seed):
        vae = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
            block_out_channels=VAE_BLOCKS,
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=128,
        )
        # Real statistics are far from (0, 1): give the normalisation something to do.
        vae.bn.running_mean.copy_(0.2 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    # FLUX.2 [klein]'s scheduler_config.json; the pipeline passes its own mu (compute_empirical_mu).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
