"""SDXL prompts longer than CLIP's 77 tokens, the way kohya's sd-scripts reads them.

With `max_token_length` L = 75 k (k = 1, 2, 3) a prompt is tokenized to L content tokens
(plus BOS/EOS, padded), cut into k chunks of 75, and each chunk is encoded on its own as
`<BOS> 75 tokens <EOS or PAD>` by both CLIP text encoders. The hidden states are joined
back into one sequence of L + 2 states, `<BOS>` of the first chunk, the 75 middles of
every chunk, the last state of the final chunk (library/strategy_base.py `_get_input_ids`
and library/strategy_sdxl.py `_get_hidden_states_sdxl`). The pooled embedding is the
second encoder's projection of the first chunk. With k = 1 this is exactly diffusers'
`StableDiffusionXLPipeline.encode_prompt`, so 75 is the standard 77-token encoding.

Training and inference both call `encode_long_prompt`; inference hands the results to the
diffusers pipeline as `prompt_embeds` / `pooled_prompt_embeds` instead of the prompt text.
"""

from __future__ import annotations

import torch

CHUNK = 75  # content tokens per CLIP window (77 minus BOS and EOS)
DEFAULT_MAX_TOKEN_LENGTH = 150  # data/sample captions are 76 CLIP tokens: 75 cuts every one


def chunk_ids(tokenizer, prompts: list[str], max_token_length: int) -> torch.Tensor:
    """Token ids (B, k, 77): each prompt padded/truncated to L + 2 and cut into k windows
    that each start with BOS and end with EOS (or PAD after the prompt has ended)."""
    if max_token_length % CHUNK or max_token_length < CHUNK:
        raise ValueError(f"--max_token_length must be a multiple of {CHUNK}, got {max_token_length}")
    total = max_token_length + 2
    ids = tokenizer(prompts, padding="max_length", max_length=total, truncation=True, return_tensors="pt").input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, max_token_length + 1, CHUNK):
        chunk = torch.cat([ids[:, :1], ids[:, start : start + CHUNK], ids[:, -1:]], dim=1)  # (B, 77)
        # A window cut mid-prompt ends on a text token: end it with EOS, as CLIP was trained.
        open_end = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
        chunk[open_end, -1] = eos
        # A window after the prompt's end (only padding): <BOS> <EOS> <PAD> ..., not <BOS> <PAD>.
        empty = chunk[:, 1] == pad
        chunk[empty, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)  # (B, k, 77)


def _join_windows(hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*k, 77, D) -> (B, 75k + 2, D): first BOS, every window's middle, the last end."""
    windows = hidden.reshape(batch, -1, *hidden.shape[1:])  # (B, k, 77, D)
    middles = windows[:, :, 1:-1].reshape(batch, -1, hidden.shape[-1])  # (B, 75k, D)
    return torch.cat([windows[:, 0, :1], middles, windows[:, -1, -1:]], dim=1)


@torch.no_grad()
def encode_long_prompt(
    prompts: list[str], tokenizers: list, text_encoders: list, max_token_length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """{'prompt_embeds': (B, L + 2, D1 + D2), 'pooled_prompt_embeds': (B, D2_proj)} from
    both CLIP encoders' penultimate layers (as diffusers' SDXL pipelines with clip_skip None)."""
    batch = len(prompts)
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = chunk_ids(tokenizer, prompts, max_token_length)  # (B, k, 77)
        output = encoder(ids.reshape(-1, ids.shape[-1]).to(device), output_hidden_states=True)
        states.append(_join_windows(output.hidden_states[-2], batch))
        pooled = output[0].reshape(batch, -1, output[0].shape[-1])[:, 0]  # the last encoder's, first window
    return {"prompt_embeds": torch.cat(states, dim=-1), "pooled_prompt_embeds": pooled}


def token_count(tokenizer, prompt: str) -> int:
    """Content tokens of `prompt` (without BOS/EOS), untruncated."""
    specials = len(tokenizer("").input_ids)
    return len(tokenizer(prompt, truncation=False).input_ids) - specials
