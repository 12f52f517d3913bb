"""FLUX.1 context completion in ComfyUI's real KSampler with the IC-LoRA Context node gives
the images of iclora's inference CLI (same seed, steps, scheduler), on a tiny random FLUX
loaded through ComfyUI's own diffusion-model loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_harness import comfy, comfyui_version, requires_comfyui  # noqa: F401 (comfy: a fixture)

pytestmark = requires_comfyui

STEPS, SEED, GUIDANCE, PROMPT = 4, 7, 3.5, "[TOP-LEFT] a red ball [BOTTOM-RIGHT] the same ball"
SIZE = 64  # 2x2 panels of 32 px: whole FLUX tokens (16 px)


def comfy_flux_components():
    """iclora's tiny FLUX with the shapes ComfyUI's FLUX holds: heads of 128 channels and
    FLUX.1's 16 latent channels (64 per packed token). Its adaLN weights are scaled up so
    the timestep each token is modulated with changes the image (at the default init a
    random model barely reads it, and zero and shared modulation would look alike)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from iclora.backends.tiny import build_tiny_flux_components

    components = build_tiny_flux_components()
    old, vae = components["transformer"].config, components["vae"].config
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=1, joint_attention_dim=old.joint_attention_dim, pooled_projection_dim=old.pooled_projection_dim,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    ).eval()
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "timestep_embedder" in name or name.endswith("norm1.linear.weight") or name.endswith("norm.linear.weight"):
                param.mul_(8)
    components["transformer"] = transformer
    torch.manual_seed(0)
    components["vae"] = AutoencoderKL.from_config({**vae, "latent_channels": 16}).eval()
    return components


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from diffusers import FluxPipeline

    folder = tmp_path_factory.mktemp("flux") / "model"
    FluxPipeline(**comfy_flux_components()).save_pretrained(folder)
    return folder


def composite_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def ours(folder, mode="zero", image_path=None):
    """iclora's FluxContextPipeline as the inference CLI loads it."""
    from iclora.inference.config import InferConfig
    from iclora.inference.inpaint import check_inputs, load_pipeline

    cfg = InferConfig(lora_path="none", prompt=PROMPT, input_image=str(image_path), backend="flux", base_model=str(folder),
                      conditioning="context", context_timestep=mode, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    return load_pipeline(check_inputs(cfg))[1]


def comfy_inputs(comfy, pipe, images: list[Image.Image], masks: torch.Tensor):
    """What ComfyUI's graph hands KSampler: the transformer through the stock loader and
    ModelSamplingFlux, the conditioning (the pipeline's own text encoding: the text encoders
    are not under test), the VAE latent with its noise mask (B, H, W)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    model = comfy.comfy.sd.load_diffusion_model_state_dict(pipe.transformer.state_dict())
    (model,) = ModelSamplingFlux().patch(model, 1.15, 0.5, SIZE, SIZE)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=512)
        pixels = pipe.image_processor.preprocess(images, height=SIZE, width=SIZE)
        raw = torch.cat([pipe.vae.encode(p[None]).latent_dist.mode() for p in pixels])  # the posterior mean
    cond = [[embeds, {"pooled_output": pooled, "guidance": GUIDANCE}]]
    return model, cond, {"samples": raw, "noise_mask": masks}


def ksampler(comfy, model, cond, latent, seed=SEED):
    (out,) = comfy.nodes.KSampler().sample(model, seed, STEPS, 1.0, "euler", "simple", cond, cond, latent, denoise=1.0)
    return out["samples"]


def panel_mask(comfy, panels: str) -> torch.Tensor:
    (mask,) = comfy.pack.nodes.ICLoRAPanelMask().mask(torch.zeros(1, SIZE, SIZE, 3), "2x2", panels, 0, "flux (16 px tokens)")
    return mask  # (1, H, W)


def to_model_space(pipe, raw):
    return (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def test_flux_context_node_gives_the_cli_images(comfy, flux, tmp_path):
    from iclora.inference.flux_ic_lora_inference import main
    from iclora.inference.inpaint import composite

    image = composite_image(0)
    image.save(tmp_path / "input.png")
    main(["--base_model", str(flux), "--lora_path", "none", "--conditioning", "context", "--context_timestep", "zero",
          "--input_image", str(tmp_path / "input.png"), "--panels_to_inpaint", "2", "3", "--prompt", PROMPT,
          "--num_inference_steps", str(STEPS), "--guidance_scale", str(GUIDANCE), "--seed", str(SEED),
          "--output_dir", str(tmp_path / "out"), "--native_size"])
    cli = np.asarray(Image.open(tmp_path / "out" / "input_0.png"), dtype=np.int16)

    pipe = ours(flux, image_path=tmp_path / "input.png")
    mask = panel_mask(comfy, "2 3")
    model, cond, latent = comfy_inputs(comfy, pipe, [image], mask)
    (context,) = comfy.pack.nodes.ICLoRAContext().apply(model, "none", "auto")
    samples = ksampler(comfy, context, cond, latent)

    # Visible panels: the input's latent, untouched by sampling.
    visible = (mask[:, None, ::8, ::8] < 0.5).expand_as(samples)
    assert torch.allclose(samples[visible], latent["samples"][visible], atol=1e-5)
    # Masked panels: the CLI's image, decoded by the same VAE and pasted the CLI's way.
    with torch.no_grad():
        decoded = pipe.vae.decode(samples).sample
    comfy_image = composite(pipe.image_processor.postprocess(decoded, output_type="pil")[0], image, mask)
    diff = np.abs(np.asarray(comfy_image, dtype=np.int16) - cli)
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (ComfyUI {comfyui_version()})"

    # Stock sampling (the blend layout: visible panels re-noised every step) is far from it.
    stock = ksampler(comfy, model, cond, latent)
    assert (stock - samples)[~visible].abs().max() > 100 * (1 / 255)


def test_flux_context_node_batch_of_two_different_masks(comfy, flux, tmp_path):
    """A batch of two composites with different panels masked, one seed (ComfyUI draws the
    batch's noise from one generator, as the pipeline does when given one generator)."""
    images = [composite_image(0), composite_image(1)]
    images[0].save(tmp_path / "input.png")
    masks = torch.cat([panel_mask(comfy, "2 3"), panel_mask(comfy, "1")])
    for mode in ("zero", "shared"):
        pipe = ours(flux, mode, tmp_path / "input.png")
        with torch.no_grad():
            expected = pipe(prompt=[PROMPT, PROMPT], image=images, mask_image=masks[:, None], height=SIZE, width=SIZE,
                            num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                            generator=torch.Generator().manual_seed(SEED), output_type="latent").images
        model, cond, latent = comfy_inputs(comfy, pipe, images, masks)
        cond[0][0], cond[0][1]["pooled_output"] = cond[0][0][:1], cond[0][1]["pooled_output"][:1]
        (context,) = comfy.pack.nodes.ICLoRAContext().apply(model, "none", mode)
        samples = to_model_space(pipe, ksampler(comfy, context, cond, latent))
        err = (samples - expected).abs().max().item()
        assert err < 2e-4, f"{mode}: max latent difference {err} (ComfyUI {comfyui_version()})"
        if mode == "zero":
            zero = samples
    assert (zero - samples).abs().max() > 1e-2  # the per-token modulation matters on this model
