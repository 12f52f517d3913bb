"""Fit a tiny AutoencoderKL to the toy composites, so the known-answer benchmark can judge pixels.

The tiny models' random VAE decodes to grey, so pixel errors through it mean nothing. This
script fits one with the tiny SDXL VAE's shape (iclora.backends.tiny: 4 blocks of widths
8/16/16/16, vae_scale_factor 8, 4 latent channels; only norm_num_groups differs, 1 instead
of 8) to the toy domain and saves it as a diffusers folder that replaces `vae/` in a saved
tiny-sdxl model:

    python benchmarks/fit_toy_vae.py                 # ~3.5 minutes on 2 CPU cores
    python benchmarks/fit_toy_vae.py --steps 20      # a quick smoke run

writes benchmarks/assets/toy_vae/{config.json, diffusion_pytorch_model.safetensors} and
prints the reconstruction error on the 32 distinct toy composites (8 colours x 4 shapes).

Trained from random init on CPU such a VAE stays near grey (STACK_NOTES). So it starts as
a near-linear codec instead: the encoder takes 8x8 patch means of the colour channels, the
decoder repeats them back, and training then only has to learn the edges. Every non-linear
piece of AutoencoderKL is neutralised at init:
- resnets and attention are residual: their last layer is zeroed, so they are identities;
- down/up-samplers become 2x2 means / nearest-neighbour copies;
- the output GroupNorm (one group) would subtract the image mean; carrying each colour
  channel twice, as +x and -x, beside two constant channels +K and -K, makes that mean 0
  and its std nearly independent of the image, and the SiLU after it cancels exactly in
  the difference of the two copies: SiLU(y) - SiLU(-y) = y. The constants enter as the
  bias of the last resnet before that norm, so no earlier layer reads them (their size
  would blow up those layers' gradients).
By default only the decoder is trained (Adam, lr 5e-5: larger rates wreck the init), so
the latents stay exact 8x8 colour means (latent channel 3 is unused, always 0).
The latent mean is folded into the encoder's quant_conv / decoder's post_quant_conv and
the latent std into `scaling_factor`, so scaled latents have mean ~0 and std ~1, as the
diffusion training expects.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from iclora.logs import setup_logging

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

from diffusers import AutoencoderKL  # noqa: E402
from PIL import Image  # noqa: E402

from iclora.backends.tiny import LATENT_CHANNELS, VAE_BLOCKS
from iclora.toy import BACKGROUND, PALETTE, SHAPES, make_sample, render_panel

OUT_DIR = Path(__file__).resolve().parent / "assets" / "toy_vae"
PANEL_SIZE = 64  # the benchmark's composites: 2x2 panels of 64 px = 128 x 128
K = 10.0  # constant channels that pin the output GroupNorms' statistics


def build_vae() -> AutoencoderKL:
    """The tiny SDXL VAE's architecture (iclora.backends.tiny._vae), one norm group."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS, layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=1, sample_size=128, force_upcast=False,
    )


def _zero_(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.zero_()


def _identity_1x1_(conv: torch.nn.Conv2d) -> None:
    conv.weight.zero_()
    conv.bias.zero_()
    k = conv.kernel_size[0] // 2
    for c in range(min(conv.in_channels, conv.out_channels)):
        conv.weight[c, c, k, k] = 1.0


def _neutralise_residuals_(model: torch.nn.Module) -> None:
    """Zero the last layer of every resnet and attention: each becomes x -> x (shortcut)."""
    for name, module in model.named_modules():
        if name.endswith("conv2") or name.endswith("to_out.0"):
            _zero_(module)
        if name.endswith("conv_shortcut"):
            _identity_1x1_(module)


def _plain_norm_(norm: torch.nn.GroupNorm) -> None:
    """Affine after the one-group norm: identity on the used channels, 0 elsewhere."""
    norm.weight.zero_()
    norm.bias.zero_()
    norm.weight[:8] = 1.0


@torch.no_grad()
def linear_codec_init(vae: AutoencoderKL) -> None:
    """Make the VAE an 8x8 patch-mean codec (see the module docstring)."""
    torch.manual_seed(0)
    enc, dec = vae.encoder, vae.decoder
    _neutralise_residuals_(vae)
    # Channel layout in both halves: 0-2 = +RGB, 3-5 = -RGB, 6 = +K, 7 = -K, rest 0.
    enc.conv_in.weight.zero_()
    enc.conv_in.bias.zero_()
    for c in range(3):
        enc.conv_in.weight[c, c, 1, 1] = 1.0
        enc.conv_in.weight[c + 3, c, 1, 1] = -1.0
    # The constants enter late, as the last resnet's bias: layers before that never read them.
    enc.mid_block.resnets[-1].conv2.bias[6], enc.mid_block.resnets[-1].conv2.bias[7] = K, -K
    for block in enc.down_blocks:
        for down in block.downsamplers or []:
            down.conv.weight.zero_()
            down.conv.bias.zero_()
            for c in range(down.conv.in_channels):  # taps (0,0),(0,1),(1,0),(1,1): a 2x2 mean
                down.conv.weight[c, c, :2, :2] = 0.25
    _plain_norm_(enc.conv_norm_out)
    # The norm divides by its std, ~sqrt(2 K^2 / channels); SiLU(y) - SiLU(-y) = y exactly.
    enc_sigma = K * (2 / enc.conv_norm_out.num_channels) ** 0.5
    enc.conv_out.weight.zero_()
    enc.conv_out.bias.zero_()
    for c in range(3):  # latent c = x_c / sigma
        enc.conv_out.weight[c, c, 1, 1] = 1.0
        enc.conv_out.weight[c, c + 3, 1, 1] = -1.0
    _identity_1x1_(vae.quant_conv)
    # logvar -12 (std e^-6, nearly deterministic) as a bias: a -12 *input* to quant_conv
    # would give its weights huge gradients.
    vae.quant_conv.bias[LATENT_CHANNELS:] = -12.0
    _identity_1x1_(vae.post_quant_conv)

    dec.conv_in.weight.zero_()
    dec.conv_in.bias.zero_()
    for c in range(3):  # back to pixel scale, again as +x and -x
        dec.conv_in.weight[c, c, 1, 1] = enc_sigma
        dec.conv_in.weight[c + 3, c, 1, 1] = -enc_sigma
    dec.up_blocks[-1].resnets[-1].conv2.bias[6], dec.up_blocks[-1].resnets[-1].conv2.bias[7] = K, -K
    for block in dec.up_blocks:
        for up in block.upsamplers or []:
            _identity_1x1_(up.conv)  # nearest-neighbour x2, then identity
    _plain_norm_(dec.conv_norm_out)
    dec_sigma = K * (2 / dec.conv_norm_out.num_channels) ** 0.5
    dec.conv_out.weight.zero_()
    dec.conv_out.bias.zero_()
    for c in range(3):
        dec.conv_out.weight[c, c, 1, 1] = dec_sigma
        dec.conv_out.weight[c, c + 3, 1, 1] = -dec_sigma


# ---- data -----------------------------------------------------------------------------------


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)  # (3, H, W)


def all_composites() -> torch.Tensor:
    """The 32 distinct 2x2 toy composites at PANEL_SIZE (one per colour x shape)."""
    images = {}
    rng = np.random.default_rng(0)
    while len(images) < len(PALETTE) * len(SHAPES):
        s = make_sample(rng, panel_size=PANEL_SIZE, grid=(2, 2))
        images.setdefault((s.colour, s.shape), to_tensor(s.image))
    return torch.stack([images[k] for k in sorted(images)])  # (32, 3, 128, 128)


def independent_panels(n: int, rng: np.random.Generator, grey: float = 0.0) -> torch.Tensor:
    """2x2 images whose panels are drawn independently: any colour, any shape, any of the
    toy's nine layouts; with probability `grey` a panel is flat mid-grey instead (what the
    inpainting pipelines encode for masked pixels)."""
    colours = list(PALETTE.values())
    out = []
    for _ in range(n):
        image = Image.new("RGB", (2 * PANEL_SIZE, 2 * PANEL_SIZE), BACKGROUND)
        for k in range(4):
            row, col = divmod(k, 2)
            if rng.random() < grey:
                panel = Image.new("RGB", (PANEL_SIZE, PANEL_SIZE), (128, 128, 128))
            else:
                colour = colours[int(rng.integers(len(colours)))]
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                panel = render_panel(colour, shape, int(rng.integers(9)), PANEL_SIZE, (3, 3))
            image.paste(panel, (col * PANEL_SIZE, row * PANEL_SIZE))
        out.append(to_tensor(image))
    return torch.stack(out)  # (n, 3, 128, 128)


def random_composites(n: int, rng: np.random.Generator) -> torch.Tensor:
    """Training images: half real composites, half independent panels (some grey), so the
    codec does not just memorise the 32 composites."""
    real = n // 2
    images = [to_tensor(make_sample(rng, panel_size=PANEL_SIZE).image) for _ in range(real)]
    return torch.cat([torch.stack(images), independent_panels(n - real, rng, grey=0.15)])  # (n, 3, 128, 128)


# ---- fitting and evaluation ------------------------------------------------------------------


def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.encode(x).latent_dist.mode()).sample


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, images: torch.Tensor) -> dict[str, float]:
    """Mean absolute error in 0-255 units over all pixels and over object pixels only."""
    rec = torch.cat([reconstruct(vae, images[i : i + 8]) for i in range(0, len(images), 8)])
    to255 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731 - as a uint8 image would be
    err = (to255(rec) - to255(images)).abs()  # (N, 3, H, W)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    obj = ((images - background).abs().amax(1, keepdim=True) > 1e-3).expand_as(err)
    return {"mae": err.mean().item(), "object_mae": err[obj].mean().item(), "p99": err.quantile(0.99).item()}


def fit(vae: AutoencoderKL, steps: int, batch_size: int, lr: float, seed: int, crop: int, train: str) -> None:
    """Adam on L1 + MSE. Small learning rates only: from the codec init every weight of a
    zeroed residual branch moves by ~lr on Adam's first steps, and with fan-ins of ~150
    that shifts the output by ~150 * lr per layer."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if train == "decoder":  # the encoder stays the exact patch-mean codec
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=lr)
    vae.train()
    for step in range(1, steps + 1):
        x = random_composites(batch_size, rng)  # (B, 3, 128, 128)
        top, left = (rng.integers(0, x.shape[-1] - crop + 1, 2) // 8 * 8).tolist()
        x = x[:, :, top : top + crop, left : left + crop]  # a crop: cheaper, same statistics
        rec = reconstruct(vae, x)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 500 == 0:
            print(f"step {step}  loss {loss.item():.4f}", flush=True)
    vae.eval()
    vae.requires_grad_(False)


@torch.no_grad()
def fold_latent_stats(vae: AutoencoderKL, images: torch.Tensor) -> tuple[list[float], float]:
    """Shift the latent mean into quant_conv / post_quant_conv (an exact reparametrisation)
    and set scaling_factor = 1 / std of the centred latents."""
    z = vae.encode(images).latent_dist.mode()  # (N, 4, h, w)
    mean = z.mean(dim=(0, 2, 3))  # (4,)
    vae.quant_conv.bias[:LATENT_CHANNELS] -= mean
    # post_quant_conv(z' + mean) = W z' + (W mean + b)
    w = vae.post_quant_conv.weight[:, :, 0, 0]  # (4, 4)
    vae.post_quant_conv.bias += w @ mean
    std = vae.encode(images).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return mean.tolist(), std


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(OUT_DIR), help="output folder (diffusers AutoencoderKL)")
    parser.add_argument("--steps", type=int, default=5000, help="Adam steps (~5 minutes on 2 CPU cores)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--crop", type=int, default=64, help="training crop side, px (multiple of 8)")
    parser.add_argument("--train", choices=["decoder", "all"], default="decoder", help="which half to fit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    vae = build_vae()
    linear_codec_init(vae)
    test = all_composites()
    before = reconstruction_error(vae, test)
    print(f"linear-codec init: {json.dumps({k: round(v, 2) for k, v in before.items()})}")
    start = time.monotonic()
    fit(vae, args.steps, args.batch_size, args.lr, args.seed, args.crop, args.train)
    seconds = time.monotonic() - start
    mean, std = fold_latent_stats(vae, test)
    after = reconstruction_error(vae, test)
    mixed = reconstruction_error(vae, independent_panels(64, np.random.default_rng(args.seed + 1)))
    print(f"after {args.steps} steps ({seconds:.0f} s): {json.dumps({k: round(v, 2) for k, v in after.items()})}")
    print(f"on 64 independent-panel images: {json.dumps({k: round(v, 2) for k, v in mixed.items()})}")
    print(f"latent mean folded {[round(m, 4) for m in mean]}, std {std:.4f} -> scaling_factor {1 / std:.4f}")
    vae.save_pretrained(args.out, safe_serialization=True)
    report = {"init": before, "fitted": after, "fitted_independent_panels": mixed, "seconds": round(seconds, 1),
              "scaling_factor": 1 / std, **{k: v for k, v in vars(args).items() if k != "out"}}
    (Path(args.out) / "fit_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out}")
    return report


if __name__ == "__main__":
    main()
