"""Tiny random SDXL, FLUX.1 and FLUX.2 [klein] models, built in code, for tests and demos.

No weights can be downloaded here, so every test and demo runs on these. They follow the
real models' *interfaces* (two text encoders, SDXL time ids, FLUX 2x2 packing, a VAE that
downsamples by 8, the real schedulers' configs) at a few MB, so the code under test takes
exactly the paths it takes with the real checkpoints. Their outputs are noise: assert on
shapes and on latents, never on how an image looks.

    python -c "from iclora.backends.tiny import save_tiny_model as s; s('tiny-sdxl', 'out/tiny-sdxl')"
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from os import PathLike
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    Flux2KleinPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .tiny_flux2 import build_tiny_flux2_components, qwen_tokenizer

CLIP_MAX_LENGTH = 77  # CLIP's position table; SDXL and FLUX both truncate prompts to it.
T5_MAX_LENGTH = 512  # FLUX.1-dev's max_sequence_length.
VAE_BLOCKS = (8, 16, 16, 16)  # 4 blocks -> 3 downsamplings -> vae_scale_factor 8, as the real VAEs
LATENT_CHANNELS = 4  # Real FLUX has 16; 4 keeps the fill transformer's input at 288, not 384.


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed module init without disturbing the caller's global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- tokenizers -------------------------------------------------------------------------


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level CLIP BPE with no merges: every byte is one token.

    CLIP's BPE appends "</w>" to the last piece of each word, so, like the real vocabulary,
    it needs each byte twice (bare and with "</w>"); without the second half every word's
    last letter becomes <|endoftext|>, which CLIP would then pool at. Ids: 0-511 bytes,
    512 bos, 513 eos (= pad), as in the real one where the specials come last.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level characters
    pieces = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={p: i for i, p in enumerate(pieces)}, merges=[], model_max_length=CLIP_MAX_LENGTH
    )


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer over printable ASCII, one piece per character.

    T5's fixed layout is <pad>=0, </s>=1, <unk>=2; "▁" marks word starts (Metaspace).
    Sentinels (<extra_id_*>) are for span corruption, which text conditioning never uses.
    """
    chars = [chr(c) for c in range(33, 127)]
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab = specials + [("▁", -1.0)] + [(c, -1.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_config(tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int) -> CLIPTextConfig:
    # CLIP pools the hidden state at the first eos id (any id but the legacy 2), so the
    # config's ids must be the tokenizer's or the pooled embedding reads a random position.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,  # SDXL reads hidden_states[-2]: needs at least two layers.
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _vae(**overrides: Any) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=128,
        # Tiny models run in float32; the upcast path only re-casts and warns on every inpaint call.
        force_upcast=False,
        **overrides,
    )


# --- SDXL ----------------------------------------------------------------------------------


def build_tiny_sdxl_components(seed: int = 0, in_channels: int = 4) -> dict[str, Any]:
    """Components for `StableDiffusionXLPipeline` (in_channels=4) or its inpaint pipeline (9).

    Shapes follow diffusers' own SDXL tests; the two text encoders get different widths
    (32 and 64, like 768 and 1280 in the real model) so that mixing them up fails loudly.
    """
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    te1_dim, te2_dim, te2_proj, time_dim = 32, 64, 32, 8
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=16,  # default 128 px generations, as 128 latents give SDXL's 1024 px
            in_channels=in_channels,
            out_channels=LATENT_CHANNELS,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),  # diffusers' legacy name: it is the number of heads
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=te1_dim + te2_dim,  # SDXL concatenates both encoders' states
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # 6 time ids (original size, crop, target size) + the pooled text_encoder_2 output
            projection_class_embeddings_input_dim=6 * time_dim + te2_proj,
        )
    with _seeded(seed):
        vae = _vae(scaling_factor=0.13025)  # SDXL VAE's factor
    with _seeded(seed):
        text_encoder = CLIPTextModel(_clip_config(tokenizer, te1_dim, te1_dim))
    with _seeded(seed):
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, te2_dim, te2_proj))
    # SDXL base's scheduler_config.json, minus the fields that are defaults.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


# --- FLUX.1 -------------------------------------------------------------------------------


def build_tiny_flux_components(seed: int = 0, fill: bool = False) -> dict[str, Any]:
    """Components for `FluxPipeline`, or with fill=True for `FluxFillPipeline`.

    FLUX packs latents into 2x2 patches, so the transformer sees 4 * latent_channels per
    token. FLUX-Fill concatenates to that the packed masked-image latents (same width) and
    the packed mask, whose 8x8 pixel blocks become channels: 4 * vae_scale_factor**2.
    """
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    clip_dim, t5_dim = 32, 32
    packed = 4 * LATENT_CHANNELS
    vae_scale_factor = 2 ** (len(VAE_BLOCKS) - 1)
    in_channels = packed + packed + 4 * vae_scale_factor**2 if fill else packed
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=in_channels,
            out_channels=packed,  # Fill predicts only the latent part of its wide input
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,  # T5 hidden states are the text tokens
            pooled_projection_dim=clip_dim,  # FLUX pools CLIPTextModel (no projection head)
            guidance_embeds=True,  # as FLUX.1-dev (distilled guidance)
            axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
        )
    with _seeded(seed):
        # FLUX's VAE has no quant convs and shifts latents before scaling (its real factors).
        vae = _vae(
            shift_factor=0.1159,
            scaling_factor=0.3611,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    with _seeded(seed):
        text_encoder = CLIPTextModel(_clip_config(tokenizer, clip_dim, clip_dim))
    with _seeded(seed):
        t5_config = T5Config(
            vocab_size=len(tokenizer_2),
            d_model=t5_dim,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1 / FLUX's T5-XXL
            dropout_rate=0.0,  # the real 0.1 would make a text encoder in train mode random
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
            is_encoder_decoder=False,
        )
        text_encoder_2 = T5EncoderModel(t5_config)
    # FLUX.1-dev's scheduler_config.json: resolution-dependent shift (mu from sequence length).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


# --- registry and saving ------------------------------------------------------------------

# Called with no arguments they give the seed-0 models; each also accepts `seed=`.
TINY_MODELS: dict[str, Callable[..., dict[str, Any]]] = {
    "tiny-sdxl": build_tiny_sdxl_components,
    "tiny-sdxl-inpaint": functools.partial(build_tiny_sdxl_components, in_channels=9),
    "tiny-flux": build_tiny_flux_components,
    "tiny-flux-fill": functools.partial(build_tiny_flux_components, fill=True),
    "tiny-flux2": build_tiny_flux2_components,  # FLUX.2 [klein] base (tiny_flux2.py)
}

_PIPELINES: dict[str, type] = {
    "tiny-sdxl": StableDiffusionXLPipeline,
    "tiny-sdxl-inpaint": StableDiffusionXLInpaintPipeline,
    "tiny-flux": FluxPipeline,
    "tiny-flux-fill": FluxFillPipeline,
    "tiny-flux2": Flux2KleinPipeline,
}


def is_tiny(model_id: str) -> bool:
    """Whether `model_id` names one of the in-code models rather than a path or hub id."""
    return model_id in TINY_MODELS


def save_tiny_model(name: str, path: str | PathLike[str], seed: int = 0) -> None:
    """Save a tiny model as a diffusers pipeline folder, loadable offline with from_pretrained."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")
    pipe = _PIPELINES[name](**TINY_MODELS[name](seed=seed))
    pipe.save_pretrained(path)


def tiny_tokenizers(name: str) -> list:
    """The tokenizers of tiny model `name`, without building its models (for data checks)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")
    if name.startswith("tiny-flux2"):
        return [qwen_tokenizer()]  # FLUX.2 has one text encoder, Qwen3
    return [_clip_tokenizer(), _clip_tokenizer() if name.startswith("tiny-sdxl") else _t5_tokenizer()]
