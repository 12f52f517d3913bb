"""The IC-LoRA nodes (ComfyUI's classic node API: INPUT_TYPES, RETURN_TYPES, FUNCTION)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image, ImageColor

import comfy.model_base
import comfy.sd
import comfy.utils
import folder_paths

from .completion import (CONTEXT_TIMESTEPS, LATENT_PIXELS, TOKEN_PIXELS, aligned_panel_mask, compose, context_mode,
                         parse_indices, read_lora_config, split)
from .panels import Grid
from .sampling import add_context_wrappers

logger = logging.getLogger(__name__)
CATEGORY = "iclora"
ALIGN = {"flux (16 px tokens)": TOKEN_PIXELS, "sdxl (8 px latents)": LATENT_PIXELS}


def model_family(model) -> str:
    """'flux' (FLUX.1) or 'sdxl' for a MODEL the context node can run; anything else,
    inpainting / Fill models included, is refused with the reason."""
    base = model.model
    if type(base) is comfy.model_base.Flux:
        net = base.diffusion_model
        if net.img_in.weight.shape[1] // net.patch_size**2 > base.model_config.unet_config["out_channels"]:
            raise ValueError("IC-LoRA Context: this FLUX model takes extra input channels (FLUX.1-Fill, or a Control "
                             "LoRA): its visible panels already enter as its mask + image input. Run a concat LoRA on it "
                             "with stock InpaintModelConditioning, without this node")
        return "flux"
    if type(base) is comfy.model_base.SDXL:
        if base.concat_keys or base.diffusion_model.input_blocks[0][0].in_channels != 4:
            raise ValueError("IC-LoRA Context: this SDXL model is an inpainting model (9 input channels): run a concat "
                             "LoRA on it with stock InpaintModelConditioning, without this node")
        return "sdxl"
    raise ValueError(f"IC-LoRA Context runs SDXL and FLUX.1 models, not {type(base).__name__}")


def _lora_choices() -> list[str]:
    return ["none"] + folder_paths.get_filename_list("loras")


def _record(lora_name: str) -> dict:
    return {} if lora_name == "none" else read_lora_config(folder_paths.get_full_path_or_raise("loras", lora_name))


class ICLoRAContext:
    """MODEL -> MODEL that samples with the visible panels clean, as iclora's `context`
    conditioning trains them. Needs a latent with a noise mask (SetLatentNoiseMask, or
    InpaintModelConditioning with noise_mask) whose masked part is what is regenerated."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (_lora_choices(), {"tooltip": "the IC-LoRA whose iclora_config.json picks the mode; none: "
                                                       "the model family's default (FLUX zero, SDXL shared)"}),
            "context_timestep": (["auto", *CONTEXT_TIMESTEPS], {"tooltip": "auto: as the LoRA was trained"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, lora_name, context_timestep):
        family = model_family(model)
        mode = context_mode(_record(lora_name), family, context_timestep)
        return (add_context_wrappers(model, family, mode),)


class ICLoRALoader:
    """Load an IC-LoRA onto a MODEL and set it up as it was trained: with `context`
    conditioning the context node's sampling too. Also gives the LoRA's grid."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "grid")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model, lora_name, strength):
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        record = read_lora_config(path)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
        if record.get("conditioning") == "context":
            family = model_family(model)
            model = add_context_wrappers(model, family, context_mode(record, family))
        elif not record:
            logger.info("IC-LoRA Loader: %s has no iclora_config.json beside it: loaded as a plain LoRA", lora_name)
        return (model, str(record.get("grid", "2x2")))


class ICLoRAPanelMask:
    """Panel indices on a grid -> MASK (1 = regenerate) the size of the image, feathered as
    iclora's --use_gradient_mask, panel edges on whole FLUX tokens (16 px) by default."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "grid": ("STRING", {"default": "2x2"}),
            "panels": ("STRING", {"default": "2 3", "tooltip": "row-major from 0 (top-left), or 'all'"}),
            "gradient_width": ("INT", {"default": 0, "min": 0, "max": 1024}),
            "align": (list(ALIGN),),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "mask"
    CATEGORY = CATEGORY

    def mask(self, image, grid, panels, gradient_width, align):
        grid = Grid.parse(grid)
        batch, height, width = image.shape[:3]
        mask = aligned_panel_mask(parse_indices(panels, grid), grid, height, width, ALIGN[align], gradient_width)
        return (mask[None].repeat(batch, 1, 1),)  # (B, H, W)


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(image.cpu().numpy() * 255), 0, 255).astype(np.uint8)).convert("RGB")


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)  # (H, W, 3)


class ICLoRACompose:
    """A batch of panel images (row-major) -> one composite on the grid, each panel fitted
    as iclora's compose command fits it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE",),
            "grid": ("STRING", {"default": "2x2"}),
            "panel_width": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 16}),
            "panel_height": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 16}),
            "fit": (["letterbox", "crop", "stretch"],),
            "background": ("STRING", {"default": "white"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "compose"
    CATEGORY = CATEGORY

    def compose(self, images, grid, panel_width, panel_height, fit, background):
        try:
            colour = ImageColor.getrgb(background)[:3]
        except ValueError:
            raise ValueError(f"background: not a colour name or #rrggbb: {background!r}") from None
        panels = [_to_pil(image) for image in images]
        return (_from_pil(compose(panels, Grid.parse(grid), panel_width, panel_height, fit, colour))[None],)


class ICLoRASplit:
    """A composite (or a batch of them) -> its panels, row-major, composite after composite."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "grid": ("STRING", {"default": "2x2"})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "split"
    CATEGORY = CATEGORY

    def split(self, image, grid):
        grid = Grid.parse(grid)
        return (torch.cat([split(composite, grid) for composite in image]),)


NODE_CLASS_MAPPINGS = {
    "ICLoRAContext": ICLoRAContext,
    "ICLoRALoader": ICLoRALoader,
    "ICLoRAPanelMask": ICLoRAPanelMask,
    "ICLoRACompose": ICLoRACompose,
    "ICLoRASplit": ICLoRASplit,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ICLoRAContext": "IC-LoRA Context",
    "ICLoRALoader": "IC-LoRA Loader",
    "ICLoRAPanelMask": "IC-LoRA Panel Mask",
    "ICLoRACompose": "IC-LoRA Compose",
    "ICLoRASplit": "IC-LoRA Split",
}
