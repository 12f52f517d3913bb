"""SDXL context completion in ComfyUI's real KSampler with the IC-LoRA Context node gives
the images of iclora's inference CLI (same seed, steps, scheduler, CFG), on iclora's tiny
random SDXL UNet in ComfyUI's own UNet class (its SGM layout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_harness import comfy, comfy_sdxl, comfyui_version, requires_comfyui  # noqa: F401 (comfy: a fixture)

pytestmark = requires_comfyui

STEPS, SEED, CFG, PROMPT = 4, 11, 5.0, "[TOP-LEFT] a red ball [BOTTOM-RIGHT] the same ball"
SIZE = 64  # 2x2 panels of 32 px (4 latent pixels each)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """iclora's tiny SDXL saved with the Euler schedule ComfyUI's `simple` scheduler gives
    (timesteps 999, 749, 499, 249: diffusers' `leading` spacing offset to end at 999, which
    also starts from noise * sqrt(sigma_max^2 + 1) as ComfyUI does at full denoise)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from iclora.backends.tiny import build_tiny_sdxl_components

    components = build_tiny_sdxl_components()
    components["scheduler"] = EulerDiscreteScheduler.from_config(
        components["scheduler"].config, timestep_spacing="leading", steps_offset=1000 // STEPS - 1)
    folder = tmp_path_factory.mktemp("sdxl") / "model"
    StableDiffusionXLPipeline(**components).save_pretrained(folder)
    return folder


def ours(folder, image_path):
    from iclora.inference.config import InferConfig
    from iclora.inference.inpaint import check_inputs, load_pipeline

    cfg = InferConfig(lora_path="none", prompt=PROMPT, input_image=str(image_path), backend="sdxl", base_model=str(folder),
                      conditioning="context", num_inference_steps=STEPS, guidance_scale=CFG)
    return load_pipeline(check_inputs(cfg))[1]


def composite_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def comfy_inputs(comfy, pipe, images, masks):
    """The model, positive / negative conditioning (the pipeline's own text encoding, with
    the size conditioning ComfyUI's SDXL reads) and the VAE latent with its noise mask."""
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True)
        pixels = pipe.image_processor.preprocess(images, height=SIZE, width=SIZE)
        raw = torch.cat([pipe.vae.encode(p[None]).latent_dist.mode() for p in pixels])
    sizes = {"width": SIZE, "height": SIZE, "target_width": SIZE, "target_height": SIZE}
    positive = [[embeds, {"pooled_output": pooled, **sizes}]]
    negative = [[negative, {"pooled_output": negative_pooled, **sizes}]]
    return comfy_sdxl(comfy, pipe.unet), positive, negative, {"samples": raw, "noise_mask": masks}


def ksampler(comfy, model, positive, negative, latent):
    (out,) = comfy.nodes.KSampler().sample(model, SEED, STEPS, CFG, "euler", "simple", positive, negative, latent, denoise=1.0)
    return out["samples"]


def panel_mask(comfy, panels: str) -> torch.Tensor:
    (mask,) = comfy.pack.nodes.ICLoRAPanelMask().mask(torch.zeros(1, SIZE, SIZE, 3), "2x2", panels, 0, "sdxl (8 px latents)")
    return mask


def test_sdxl_context_node_gives_the_cli_images(comfy, sdxl, tmp_path):
    from iclora.inference.inpaint import composite
    from iclora.inference.sdxl_ic_lora_inference import main

    image = composite_image(0)
    image.save(tmp_path / "input.png")
    main(["--base_model", str(sdxl), "--lora_path", "none", "--conditioning", "context", "--input_image",
          str(tmp_path / "input.png"), "--panels_to_inpaint", "2", "3", "--prompt", PROMPT, "--num_inference_steps",
          str(STEPS), "--guidance_scale", str(CFG), "--seed", str(SEED), "--output_dir", str(tmp_path / "out"), "--native_size"])
    cli = np.asarray(Image.open(tmp_path / "out" / "input_0.png"), dtype=np.int16)

    pipe = ours(sdxl, tmp_path / "input.png")
    mask = panel_mask(comfy, "2 3")
    model, positive, negative, latent = comfy_inputs(comfy, pipe, [image], mask)
    (context,) = comfy.pack.nodes.ICLoRAContext().apply(model, "none", "auto")
    samples = ksampler(comfy, context, positive, negative, latent)

    visible = (mask[:, None, ::8, ::8] < 0.5).expand_as(samples)
    assert torch.allclose(samples[visible], latent["samples"][visible], atol=1e-5)
    with torch.no_grad():
        decoded = pipe.vae.decode(samples).sample  # KSampler gives the VAE's own scale
    comfy_image = composite(pipe.image_processor.postprocess(decoded, output_type="pil")[0], image, mask)
    diff = np.abs(np.asarray(comfy_image, dtype=np.int16) - cli)
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (ComfyUI {comfyui_version()})"

    stock = ksampler(comfy, model, positive, negative, latent)  # the blend layout
    assert (stock - samples)[~visible].abs().max() > 1e-2


def test_sdxl_context_node_batch_of_two_different_masks(comfy, sdxl, tmp_path):
    images = [composite_image(0), composite_image(1)]
    images[0].save(tmp_path / "input.png")
    masks = torch.cat([panel_mask(comfy, "2 3"), panel_mask(comfy, "0 1")])
    pipe = ours(sdxl, tmp_path / "input.png")
    with torch.no_grad():
        expected = pipe(prompt=[PROMPT, PROMPT], image=images, mask_image=masks[:, None], height=SIZE, width=SIZE,
                        num_inference_steps=STEPS, guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED),
                        output_type="latent").images
    model, positive, negative, latent = comfy_inputs(comfy, pipe, images, masks)
    (context,) = comfy.pack.nodes.ICLoRAContext().apply(model, "none", "auto")
    samples = ksampler(comfy, context, positive, negative, latent) * pipe.vae.config.scaling_factor
    err = (samples - expected).abs().max().item()
    assert err < 2e-4 * expected.abs().max().item(), f"max latent difference {err} (ComfyUI {comfyui_version()})"


def test_context_node_refuses_an_inpainting_unet(comfy):
    from iclora.backends.tiny import build_tiny_sdxl_components

    model = comfy_sdxl(comfy, build_tiny_sdxl_components(in_channels=9)["unet"])
    with pytest.raises(ValueError, match="inpainting model"):
        comfy.pack.nodes.ICLoRAContext().apply(model, "none", "auto")
