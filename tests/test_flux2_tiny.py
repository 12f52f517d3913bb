"""The tiny FLUX.2 [klein] model: built offline in code, saved as a diffusers folder that the
stock Flux2KleinPipeline loads and runs, with a Qwen3 chat-template tokenizer.

    pytest tests/test_flux2_tiny.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import Flux2KleinPipeline

from iclora.backends.tiny import TINY_MODELS, save_tiny_model, tiny_tokenizers
from iclora.backends.tiny_flux2 import QWEN3_HIDDEN, STACKED_LAYERS


def test_saved_folder_loads_in_the_stock_pipeline_and_generates(tmp_path):
    save_tiny_model("tiny-flux2", tmp_path)
    built = TINY_MODELS["tiny-flux2"]()
    pipe = Flux2KleinPipeline.from_pretrained(tmp_path)
    for name in ("transformer", "vae", "text_encoder"):
        loaded = getattr(pipe, name).state_dict()
        for key, value in built[name].state_dict().items():
            assert torch.equal(loaded[key], value), (name, key)
    # The batch-norm statistics travel with the VAE and are not the identity.
    assert pipe.vae.bn.running_mean.abs().max() > 0.05
    assert not pipe.config.is_distilled  # a base model: CFG at 4 by default

    out = pipe(prompt="a red square", height=64, width=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_prompt_encoding_stacks_three_qwen3_layers_per_token():
    c = TINY_MODELS["tiny-flux2"]()
    embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(c["text_encoder"], c["tokenizer"], ["a cat"],
                                                          max_sequence_length=64)
    assert embeds.shape == (1, 64, STACKED_LAYERS * QWEN3_HIDDEN)
    assert c["transformer"].config.joint_attention_dim == embeds.shape[-1]


def test_tokenizer_reads_every_byte_and_applies_the_chat_template():
    (tokenizer,) = tiny_tokenizers("tiny-flux2")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "ein Würfel"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nein Würfel<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    padded = tokenizer("x", padding="max_length", max_length=4).input_ids
    assert padded[1:] == [tokenizer.pad_token_id] * 3
