"""Toy FLUX.2 [klein] base models for the known-answer benchmarks: the tiny FLUX.2 text side
(Qwen3, tokenizer, scheduler) around the toy VAE and a small Flux2Transformer2DModel.

    python benchmarks/fit_hard_toy.py --backend flux2     # fits the transformer (~15 min, 2 cores)
    python benchmarks/known_answer_hard.py --backend flux2 --conditioning context

The toy VAE (benchmarks/assets/toy_vae, fit_toy_vae.py) is an AutoencoderKL; FLUX.2's
pipelines read an AutoencoderKLFlux2, the same encoder and decoder plus a batch norm over
the 2x2-patchified latents whose running statistics normalise them. `flux2_vae` moves the
toy VAE's weights into one and measures those statistics on independent-panel images, so
normalised toy latents have about zero mean and unit variance per channel, as the real
model's do. The transformer (2 double + 4 single blocks of width 64, no guidance embedding)
reads the tiny Qwen3's three stacked hidden states.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # its sibling fit_toy_vae.py, also when loaded by location
TOY_VAE = HERE / "assets" / "toy_vae"


@torch.no_grad()
def flux2_vae(vae_dir: Path, n: int = 256, seed: int = 0):
    """The toy AutoencoderKL as an AutoencoderKLFlux2, its batch-norm statistics measured on
    `n` independent-panel images."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, Flux2KleinPipeline
    from fit_toy_vae import independent_panels

    source = AutoencoderKL.from_pretrained(vae_dir).eval()
    keys = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
            "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size", "use_quant_conv",
            "use_post_quant_conv", "mid_block_add_attention")
    vae = AutoencoderKLFlux2(**{k: source.config[k] for k in keys}).eval()
    missing, unexpected = vae.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any(not k.startswith("bn.") for k in missing):
        raise ValueError(f"{vae_dir}: not the toy VAE's layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    latents = source.encode(independent_panels(n, np.random.default_rng(seed))).latent_dist.mode()
    patched = Flux2KleinPipeline._patchify_latents(latents)  # (n, 4C, h/2, w/2)
    vae.bn.running_mean.copy_(patched.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(patched.var(dim=(0, 2, 3)))
    return vae


def toy_flux2_transformer(in_channels: int, text_dim: int, blocks: tuple[int, int] = (2, 4)):
    """`blocks`: (double-stream, single-stream) block counts; width 4 heads x 16."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=blocks[0], num_single_layers=blocks[1],
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=text_dim, timestep_guidance_channels=64,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )


def make_flux2_base_model(folder: Path, vae_dir: Path = TOY_VAE, transformer_dir: Path | None = None,
                          blocks: tuple[int, int] = (2, 4), init_seed: int = 0) -> Path:
    """A diffusers Flux2KleinPipeline folder: tiny-flux2's text encoder, tokenizer and
    scheduler, the toy VAE as an AutoencoderKLFlux2, and the toy transformer (fitted, from
    transformer_dir; or freshly initialised from `init_seed` with `blocks`)."""
    from diffusers import Flux2Transformer2DModel

    from iclora.backends.tiny import save_tiny_model
    from iclora.backends.tiny_flux2 import STACKED_LAYERS

    for path in [vae_dir] + ([transformer_dir] if transformer_dir else []):
        if not (Path(path) / "diffusion_pytorch_model.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no weights; run benchmarks/fit_toy_vae.py and fit_hard_toy.py first")
    save_tiny_model("tiny-flux2", folder)
    vae = flux2_vae(Path(vae_dir))
    shutil.rmtree(folder / "vae")
    vae.save_pretrained(folder / "vae")
    if transformer_dir:
        transformer = Flux2Transformer2DModel.from_pretrained(transformer_dir, torch_dtype=torch.float32)
    else:
        hidden = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
        torch.manual_seed(init_seed)
        transformer = toy_flux2_transformer(4 * vae.config.latent_channels, STACKED_LAYERS * hidden, tuple(blocks))
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(folder / "transformer")
    return folder
