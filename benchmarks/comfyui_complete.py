"""Panel completion of the toy FLUX through ComfyUI's KSampler with the IC-LoRA nodes: what a
ComfyUI user's workflow does (IC-LoRA Loader -> ModelSamplingFlux -> KSampler on a VAE latent
with the Panel Mask as its noise mask), for known_answer_comfyui.py.

ComfyUI's model detection only knows full-size FLUX shapes (heads of 128, 16 latent
channels), so the toy transformer is put into ComfyUI's own FLUX class at the toy's sizes,
its weights converted by ComfyUI's diffusers -> FLUX key map; the latent format is the toy
VAE's shift and scale. Everything else is ComfyUI's and the node pack's own code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "comfyui"))
from comfy_harness import load_comfyui  # noqa: E402


def comfy_flux(transformer, vae_config: dict):
    """ComfyUI's FLUX model (model_base.Flux) holding a diffusers FluxTransformer2DModel's weights."""
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    c = transformer.config
    hidden = c.num_attention_heads * c.attention_head_dim
    unet_config = {
        "image_model": "flux", "in_channels": c.in_channels // 4, "out_channels": c.out_channels // 4,
        "vec_in_dim": c.pooled_projection_dim, "context_in_dim": c.joint_attention_dim, "hidden_size": hidden,
        "mlp_ratio": 4.0, "num_heads": c.num_attention_heads, "depth": c.num_layers,
        "depth_single_blocks": c.num_single_layers, "axes_dim": list(c.axes_dims_rope), "theta": 10000,
        "patch_size": 2, "qkv_bias": True, "guidance_embed": c.guidance_embeds, "txt_ids_dims": [],
    }

    class ToyLatent(comfy.latent_formats.Flux):
        latent_channels = c.out_channels // 4

        def __init__(self):
            super().__init__()
            self.scale_factor = vae_config["scaling_factor"]
            self.shift_factor = vae_config["shift_factor"]

    model_config = comfy.supported_models.Flux(dict(unet_config))
    model_config.latent_format = ToyLatent()
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    weights = comfy.model_detection.convert_diffusers_mmdit(dict(transformer.state_dict()), "")
    base.load_model_weights(weights)
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def complete_in_comfyui(model_dir: Path, lora: Path, images: list[Path], args, prompt: str, hidden: list[int],
                        grid) -> list[np.ndarray]:
    """The `hidden` panels of every image completed in ComfyUI, one seed (args.seed) each, the
    visible pixels pasted back as iclora's inference (and the example workflow) does."""
    ns = load_comfyui()
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux
    from diffusers import FluxPipeline

    import folder_paths
    from iclora.inference.inpaint import composite

    pipe = FluxPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    model = comfy_flux(pipe.transformer, json.loads((Path(model_dir) / "vae" / "config.json").read_text()))
    folder_paths.add_model_folder_path("loras", str(Path(lora).parent.parent))
    name = f"{Path(lora).parent.name}/{Path(lora).name}/pytorch_lora_weights_comfyui.safetensors"
    model, _ = ns.pack.nodes.ICLoRALoader().load(model, name, 1.0)
    patched = sum(len(v) for v in model.patches.values())
    if patched == 0:
        raise RuntimeError(f"{name}: ComfyUI applied no LoRA layer")
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=512)
    cond = [[embeds, {"pooled_output": pooled}]]
    outputs = []
    for path in images:
        image = Image.open(path).convert("RGB")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None]  # (1, H, W, 3)
        (mask,) = ns.pack.nodes.ICLoRAPanelMask().mask(pixels, str(grid), " ".join(map(str, hidden)), 0,
                                                       "flux (16 px tokens)")
        (sampled,) = ModelSamplingFlux().patch(model, 1.15, 0.5, image.width, image.height)
        with torch.no_grad():
            raw = pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mode()
            (out,) = ns.nodes.KSampler().sample(sampled, args.seed, args.inference_steps, args.guidance_scale, "euler",
                                                "simple", cond, cond, {"samples": raw, "noise_mask": mask}, denoise=1.0)
            decoded = pipe.vae.decode(out["samples"]).sample
        result = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
        outputs.append(np.asarray(composite(result, image, mask)))
    return outputs
